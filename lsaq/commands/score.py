"""``lsaq calibrate`` (a calibration set as a directory) and ``lsaq score`` (per-layer importance, a JSON record)."""

from __future__ import annotations

import argparse
import sys

from lsaq.methods import DEFAULT_K, DEFAULT_METHOD


def model_and_calibration_args(p: argparse.ArgumentParser) -> None:
    """The options `lsaq score` and `lsaq measure` share: the model, its calibration set, batching, --out."""
    p.add_argument("--model", default=None, help="local HF directory, .gguf file or hub id (default: SmolLM2-135M)")
    p.add_argument("--revision", default=None, help="hub revision (hub ids only)")
    p.add_argument("--samples", type=int, default=32, help="calibration sequences (default 32)")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per sequence (default 512)")
    p.add_argument("--calib", default=None,
                   help="calibration source: a .txt/.raw/.jsonl file, a dataset NAME[:CONFIG[:SPLIT]], or 'generated' "
                        "(sampled from the model itself). Default: WikiText-2 valid from the shared folder or "
                        "$LSAQ_CALIB, else the hub, else generated")
    p.add_argument("--calib-dir", default=None, help="a calibration set written by `lsaq calibrate` (instead of --calib)")
    p.add_argument("--seed", type=int, default=0, help="calibration sampling seed (default 0)")
    p.add_argument("--batch-size", type=int, default=4, help="sequences per forward pass (default 4)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow model code from the hub (off by default)")
    compute_device_arg(p)
    p.add_argument("--out", required=True, help="output JSON path")


def compute_device_arg(p: argparse.ArgumentParser) -> None:
    """``--compute-device`` and ``--max-memory``, for every command that walks the model."""
    p.add_argument("--compute-device", default="auto", metavar="DEVICE",
                   help="auto (default: the NVIDIA GPU with the most free memory that holds a layer, in 16 bits; "
                        "else the CPU in float32), cpu, or cuda:N")
    p.add_argument("--max-memory", default=None, metavar="SIZE",
                   help="host memory this run may use, e.g. 8GiB: refused before any work when one layer's step "
                        "needs more (default: no limit)")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("score", help="rank decoder layers by importance (LSAQ jaccard, LWQ cosine or measured sensitivity)")
    model_and_calibration_args(p)
    p.add_argument("--method", default=DEFAULT_METHOD.value,
                   help=f"jaccard (LSAQ), cosine (LWQ) or sensitivity (KL with one layer INT4; ~L/2x slower); "
                        f"default {DEFAULT_METHOD.value}, the study's winner")
    p.add_argument("--k", type=int, default=DEFAULT_K, help=f"top-k token set size for jaccard (default {DEFAULT_K})")
    p.set_defaults(func=run)

    m = sub.add_parser("measure", help="measure each layer's loss (KL to the float model) at every precision, once "
                                       "for every device's plan (lsaq plan --loss ... --strategy measured)")
    model_and_calibration_args(m)
    m.add_argument("--probes", default="int8,int4",
                   help="comma-separated: int8, int4 (per-channel), int4-g<group size> (default int8,int4)")
    m.add_argument("--quantizer", default="rtn",
                   help="whose codes each probe measures: rtn, or gptq (on the calibration set's activations); "
                        "measure with the quantizer the builds use (default rtn)")
    m.add_argument("--group-size", default=None,
                   help="also measure INT4 in groups of this size, or 'auto': the largest size dividing every input "
                        "width (for lsaq plan --group-size auto)")
    m.add_argument("--kl-stride", type=int, default=1,
                   help="KL at every N-th position only: fewer LM-head projections (default 1: every position)")
    m.set_defaults(func=run_measure)

    c = sub.add_parser("calibrate", help="draw a calibration set (token windows) for a model into a directory")
    c.add_argument("--model", default=None, help="local HF directory, .gguf file or hub id (default: SmolLM2-135M)")
    c.add_argument("--revision", default=None, help="hub revision (hub ids only)")
    c.add_argument("--calib", default=None, help="source, as for `lsaq score --calib` (default: the same order)")
    c.add_argument("--samples", type=int, default=32, help="sequences (default 32)")
    c.add_argument("--seq-len", type=int, default=512, help="tokens per sequence (default 512)")
    c.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    c.add_argument("--out", required=True, help="directory to write (calibration.json + tokens.safetensors)")
    c.set_defaults(func=run_calibrate)


def run_calibrate(args: argparse.Namespace) -> int:
    from lsaq.calibration.sets import calibrate, calibration_memory

    info = calibrate(args.model, args.out, source=args.calib, samples=args.samples, seq_len=args.seq_len,
                     seed=args.seed, revision=args.revision)
    print(f"wrote {args.out}: {info.samples} x {info.seq_len} tokens from {info.source} ({info.kind}) "
          f"[{info.hash[:12]}]")
    memory = calibration_memory(args.out)
    if memory is not None:
        print(f"calibrated {memory.describe()}")
    return 0


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from lsaq.importance.stage import score

    bars: list[tqdm] = []  # opened at the first scored batch, so it does not sit under loading and calibration

    def progress(n: int) -> None:
        if not bars:  # one walk over the decoder layers
            bars.append(tqdm(total=None, desc=f"{args.method} scoring", unit="layer", file=sys.stderr))
        bars[0].update(n)

    try:
        rec = score(args.model, args.out, method=args.method, k=args.k, source=args.calib,
                    calibration=args.calib_dir, samples=args.samples, seq_len=args.seq_len, seed=args.seed,
                    batch_size=args.batch_size, revision=args.revision, trust_remote_code=args.trust_remote_code,
                    compute_device=args.compute_device, max_memory=args.max_memory, progress=progress)
    finally:
        for bar in bars:
            bar.close()
    print(format_ranking(rec))
    print(f"wrote {args.out} ({rec.num_layers} layers, {rec.wall_time_s:.1f}s scoring {rec.memory.describe()})")
    return 0


def run_measure(args: argparse.Namespace) -> int:
    from lsaq.importance.stage import measure
    from lsaq.units import format_bytes

    rec = measure(args.model, args.out, probes=[p for p in args.probes.split(",") if p], quantizer=args.quantizer,
                  group_size=args.group_size, stride=args.kl_stride, source=args.calib,
                  calibration=args.calib_dir, samples=args.samples, seq_len=args.seq_len, seed=args.seed,
                  batch_size=args.batch_size, revision=args.revision, trust_remote_code=args.trust_remote_code,
                  compute_device=args.compute_device, max_memory=args.max_memory)
    print("layer  " + "  ".join(f"{p:>10}" for p in rec.probes))
    for i, row in enumerate(rec.loss):
        print(f"{i:5d}  " + "  ".join(f"{v:10.3e}" for v in row))
    cost = rec.cost
    print(f"wrote {args.out} ({rec.num_layers} layers x {len(rec.probes)} probes in {rec.seconds:.1f}s = "
          f"{rec.cost_ratio:.1f} forward passes; {cost.get('layer_loads')} layer loads, {cost.get('layer_runs')} "
          f"layer runs, {format_bytes(cost.get('hidden_bytes_on_disk', 0))} of hidden states on disk; "
          f"{rec.memory.describe()})")
    return 0


def format_ranking(rec, top: int | None = None) -> str:
    """A short ranked table: rank, layer, importance, std."""
    k = f", k={rec.k}" if rec.k is not None else ""
    lines = [
        f"{rec.model.id} ({rec.model.architecture}, {rec.num_layers} layers) method={rec.method}{k} "
        f"calib={rec.calibration.samples}x{rec.calibration.seq_len} [{rec.calibration.hash[:12]}]",
        f"{'rank':>4} {'layer':>5} {'importance':>10} {'std':>8}",
    ]
    for rank, i in enumerate(rec.ranking[:top] if top else rec.ranking, 1):
        lines.append(f"{rank:>4} {i:>5} {rec.importance[i]:>10.4f} {rec.std[i]:>8.4f}")
    return "\n".join(lines)
