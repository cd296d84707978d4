"""Runtime benchmark on the default model: quantization throughput, decode speed, first-token latency, peak RSS.

    .venv/bin/python benchmarks/bench_runtime.py [--model PATH] [--new-tokens 32] [--prompt-tokens 64]

All in one run, each configuration in its own subprocess so that peak RSS is its own:
float32 and bfloat16 (the float model), all-INT8, all-INT4 (per-channel) and a mixed plan (lsaq rule on
cosine importance, 200 MiB budget), each loaded the way users run it (`lsaq.load_quantized`), with bf16
activations and again with fp32 activations (`/fp32`: CPUs without native bf16, such as AVX2-only ones, run
bf16 matmuls slowly). Decode ratios are against bfloat16 and float32 measured in the same run. Then the
4096x4096 kernel table from bench_kernels.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
# name -> (weights, activation dtype); quantized artifacts are loaded with lsaq.load_quantized at that dtype.
CONFIGS = {
    "float32": ("float", "float32"), "bfloat16": ("float", "bfloat16"),
    "int8": ("int8", "bfloat16"), "int4": ("int4", "bfloat16"), "mixed": ("mixed", "bfloat16"),
    "int8/fp32": ("int8", "float32"), "int4/fp32": ("int4", "float32"), "mixed/fp32": ("mixed", "float32"),
}


def peak_rss_mib() -> float:
    """This process's resident high-water mark. VmHWM belongs to the address space, so it starts afresh at
    exec; ru_maxrss would carry over the parent's peak into the child."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _one(args: argparse.Namespace) -> dict:
    """Measure one configuration in this process; print a JSON line."""
    from lsaq.models.loading import load_model
    from lsaq.quantization.artifact import resident_bytes
    from lsaq.quantization.reader import load_quantized

    start = time.perf_counter()
    weights, act = CONFIGS[args.one]
    if weights == "float":
        loaded = load_model(args.model)
        loaded.model.to(getattr(torch, act))
    else:
        loaded = load_quantized(Path(args.workdir) / weights, dtype=getattr(torch, act))
    load_s = time.perf_counter() - start
    model, tok = loaded.model, loaded.tokenizer
    text = "The history of the city begins in the early middle ages, when a small settlement grew " * 20
    ids = tok(text, return_tensors="pt")["input_ids"][:, : args.prompt_tokens]
    with torch.inference_mode():
        model(input_ids=ids[:, :8])  # warm-up
        t0 = time.perf_counter()
        out = model(input_ids=ids, use_cache=True)
        first = time.perf_counter() - t0
        past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
        t0 = time.perf_counter()
        for _ in range(args.new_tokens):  # greedy decode, one token at a time on the KV cache
            out = model(input_ids=nxt, past_key_values=past, use_cache=True)
            past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
        decode = time.perf_counter() - t0
    return {
        "config": args.one, "load_s": load_s, "first_token_s": first, "decode_tok_s": args.new_tokens / decode,
        "weights_mib": resident_bytes(model) / 2**20,
        "peak_rss_mib": peak_rss_mib(),
    }


def _build_artifacts(args: argparse.Namespace, workdir: Path) -> list[str]:
    """Write the INT8 / INT4 / mixed artifacts; return quantization throughput lines."""
    from lsaq.calibration.sets import load_calibration
    from lsaq.importance.scoring import score_importance
    from lsaq.models.families import model_shape
    from lsaq.models.identity import ModelRef
    from lsaq.models.loading import load_model
    from lsaq.models.parts import decoder_parts
    from lsaq.planning.devices import DeviceProfile
    from lsaq.planning.planner import PlanOptions, make_plan
    from lsaq.precision import Precision
    from lsaq.quantization.artifact import write_artifact
    from lsaq.quantization.primitives import QuantizedWeight

    loaded = load_model(args.model)
    info = loaded.info
    shape = model_shape(info.config)
    # Quantization throughput vs a plain copy of the same float bytes (fp32 weights of all decoder linears).
    weights = [m.weight.detach() for layer in decoder_parts(loaded.model).layers
               for m in layer.modules() if isinstance(m, torch.nn.Linear)]
    nbytes = sum(w.numel() * w.element_size() for w in weights)
    dst = [torch.empty_like(w) for w in weights]
    for d, w in zip(dst, weights):  # touch the destination pages once so the copy is not timing page faults
        d.copy_(w)
    t0 = time.perf_counter()
    for d, w in zip(dst, weights):
        d.copy_(w)
    copy_s = time.perf_counter() - t0
    lines = [f"memory copy of {nbytes / 1e9:.3f} GB float32 weights: {nbytes / 1e9 / copy_s:6.2f} GB/s"]
    for precision, group in ((Precision.INT8, None), (Precision.INT4, None), (Precision.INT4, 128)):
        t0 = time.perf_counter()
        for w in weights:
            QuantizedWeight.quantize(w, precision, group)
        s = time.perf_counter() - t0
        name = f"{precision.value}{'' if group is None else f' g{group}'}"
        lines.append(f"quantize {name:<9} {nbytes / 1e9 / s:6.2f} GB/s = {copy_s / s:5.1%} of memory copy")
    calib = load_calibration(loaded.tokenizer, None, samples=4, seq_len=128, model=loaded)
    imp = score_importance(loaded.model, info, calib, "cosine")
    device = DeviceProfile(name="budget-200MiB", memory=200 * 2**20, kind=None, reserve=0, origin="--budget")
    base = make_plan(shape, imp.importance, device, PlanOptions(context=512),
                     model=ModelRef.from_info(info))
    plans = {"int8": dataclasses.replace(base, precisions=(Precision.INT8,) * shape.num_layers),
             "int4": dataclasses.replace(base, precisions=(Precision.INT4,) * shape.num_layers),
             "mixed": base}
    for name, plan in plans.items():
        fresh = load_model(args.model)
        write_artifact(fresh, plan, workdir / name)
        c = plan.counts
        lines.append(f"artifact {name:<6} fp16/int8/int4 = {c['fp16']}/{c['int8']}/{c['int4']}, "
                     f"avg bits {plan.avg_bits['quantizable_linears']:.2f}, weights {plan.breakdown.weights / 2**20:.1f} MiB")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--one", choices=CONFIGS, help=argparse.SUPPRESS)
    ap.add_argument("--workdir", help=argparse.SUPPRESS)
    ap.add_argument("--skip-kernels", action="store_true")
    args = ap.parse_args()
    if args.one:
        print(json.dumps(_one(args)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        for line in _build_artifacts(args, workdir):
            print(line)
        rows = []
        for config in CONFIGS:
            cmd = [sys.executable, __file__, "--one", config, "--workdir", tmp,
                   "--new-tokens", str(args.new_tokens), "--prompt-tokens", str(args.prompt_tokens)]
            if args.model:
                cmd += ["--model", args.model]
            res = subprocess.run(cmd, capture_output=True, text=True, env=os.environ | {"TQDM_DISABLE": "1"})
            if res.returncode != 0:
                raise SystemExit(f"{config} failed:\n{res.stderr[-3000:]}")
            rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
    bf16 = next(r for r in rows if r["config"] == "bfloat16")
    fp32 = next(r for r in rows if r["config"] == "float32")
    print(f"\nprompt {args.prompt_tokens} tokens, {args.new_tokens} new tokens, torch threads {torch.get_num_threads()}")
    print(f"{'config':<10} {'weights MiB':>11} {'peak RSS MiB':>12} {'first token s':>13} {'decode tok/s':>12} {'vs bf16':>8} {'vs fp32':>8}")
    for r in rows:
        print(f"{r['config']:<10} {r['weights_mib']:>11.1f} {r['peak_rss_mib']:>12.0f} {r['first_token_s']:>13.3f} "
              f"{r['decode_tok_s']:>12.1f} {r['decode_tok_s'] / bf16['decode_tok_s']:>7.2f}x "
              f"{r['decode_tok_s'] / fp32['decode_tok_s']:>7.2f}x")
    if not args.skip_kernels:
        print("\n4096x4096 kernels (benchmarks/bench_kernels.py):", flush=True)
        subprocess.run([sys.executable, str(HERE / "bench_kernels.py")], check=True)


if __name__ == "__main__":
    main()
