"""Scoring a 7B on a 24 GiB machine: peak memory and time of the layer-streaming stages at 2, 8 and 32 layers.

For each depth, a random-weight checkpoint of Llama-2-7B's widths (hidden 4096, MLP 11008, vocabulary 32000) is
written in bf16, one decoder layer per shard with an index (:func:`lsaq.engine.synthetic.write_random_checkpoint`;
13.5 GB at 32 layers, in a temporary folder, removed afterwards). Then, each in its own process, as a user runs
them: ``lsaq calibrate`` (2 x 128 tokens from text; only the tokenizer is loaded), ``lsaq score`` with the
cosine and jaccard methods on that calibration set, and ``lsaq quantize`` of an all-INT4 plan (groups of 128) with
round to nearest, and with GPTQ on the same calibration set at depths up to ``--gptq-layers`` (2: about two
minutes per layer here); ``lsaq eval`` of the round-to-nearest build: its fidelity to the float checkpoint (one
512-token window of the calibration text, both models walked side by side) and the perplexity of the float
checkpoint (one 512-token window); ``lsaq measure`` (the measured loss, INT8 and INT4 probes, one walk carrying a
branch per layer and probe) at depths up to ``--measure-layers`` (8). Reported per stage: wall time, time per
layer, the process's peak resident memory (its ``VmHWM``), and from each command's memory line where it computed
and torch's peak GPU allocation (``--compute-device``, default ``auto``: a GPU when there is one, as a user runs
it; ``benchmarks/gpu_check.sh`` runs this bench on the GPU).

Targets: peak RSS at 32 layers / at 2 layers <= 1.25 for every stage (memory does not grow with depth), and
within 4 GiB at 32 layers (a whole float32 7B is 27 GB), 6 GiB for evaluation and the measured loss; GPTQ within
4 GiB at 2 layers. ``--config llama-3-70b`` (2 layers and the full 128k vocabulary: 7.6 GB of shards): every stage
within 10 GiB.

    .venv/bin/python benchmarks/bench_scale.py [--layers 2 8 32] [--config llama-2-7b] [--dir /big/tmp]
    .venv/bin/python benchmarks/bench_scale.py --config llama-3-70b --layers 2 --gptq-layers 0 --measure-layers 0
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from importlib import resources
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GIB = 2**30
RATIO_TARGET, PEAK_TARGET_GIB = 1.25, {"eval fidelity": 6.0, "eval perplexity": 6.0, "measure": 6.0}
DEFAULT_PEAK_TARGET_GIB = 4.0
# Per config, one target for every stage instead: a Llama-3-70B layer is 3.4 GB in float32 and its embedding and
# head 2.1 GB each in bf16 (a 128k vocabulary at width 8192).
CONFIG_TARGET_GIB = {"llama-3-70b": 10.0}
# Runs lsaq's CLI and prints the process's peak RSS in KiB as the last line: VmHWM of its own memory map
# (getrusage's ru_maxrss would also count this process's memory at fork time, which Linux carries across exec).
RUN = ("import sys; from lsaq.cli import main; rc = main(sys.argv[1:]); "
       "print('peak_kib', next(l for l in open('/proc/self/status') if l.startswith('VmHWM:')).split()[1]); "
       "sys.exit(rc)")


# The memory line every walking command prints last: "... on cuda:0 (bfloat16), peak host memory 2.59 GiB, GPU 3 GiB"
WHERE = re.compile(r"on (\S+) \((\w+)\), peak host memory [^,\n]+(?:, GPU ([\d.]+ \w+))?")


def stage(argv: list[str]) -> tuple[float, float, str, str]:
    """(wall seconds, peak RSS GiB, where it computed, torch's peak GPU allocation or "-") of ``lsaq ARGV`` in its
    own process; exits on failure."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", RUN, "-q", *argv], capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"lsaq {' '.join(argv)} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    kib = int(proc.stdout.strip().splitlines()[-1].split()[1])
    found = WHERE.search(proc.stdout)
    where = f"{found.group(1)} {found.group(2)}" if found else "-"
    return wall, kib * 1024 / GIB, where, (found.group(3) or "-") if found else "-"


def calibration_text(folder: Path) -> Path:
    """WikiText-2 validation from ../shared when present, else this repository's README (any text will do: the
    weights are random)."""
    from lsaq.paths import shared_dir

    shared = shared_dir()
    wiki = shared / "data/wikitext-2-raw/wiki.valid.raw" if shared else None
    if wiki is not None and wiki.is_file():
        return wiki
    text = folder / "text.txt"
    text.write_text((ROOT / "README.md").read_text())
    return text


def main() -> None:
    from lsaq.engine.synthetic import write_random_checkpoint

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, nargs="+", default=[2, 8, 32])
    ap.add_argument("--config", default="llama-2-7b", help="a shipped config name (lsaq/data/configs)")
    ap.add_argument("--samples", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--dir", default=None, help="scratch folder (default: the system's temporary folder)")
    ap.add_argument("--gptq-layers", type=int, default=2,
                    help="run GPTQ only at depths up to this (about two minutes per layer here)")
    ap.add_argument("--measure-layers", type=int, default=8,
                    help="run the measured loss only at depths up to this (its layer runs grow as L^2)")
    ap.add_argument("--compute-device", default="auto",
                    help="where the walking stages compute: auto (default: a GPU when there is one), cpu, cuda:N")
    args = ap.parse_args()
    config = json.loads(resources.files("lsaq").joinpath(f"data/configs/{args.config}.json").read_text())
    rows: list[tuple[int, float, str, float, float, str, str]] = []
    device = ["--compute-device", args.compute_device]
    for layers in args.layers:
        scratch = Path(tempfile.mkdtemp(prefix="lsaq-bench-scale-", dir=args.dir))
        try:
            model = scratch / "model"
            start = time.perf_counter()
            write_random_checkpoint(config, model, layers=layers)
            written = time.perf_counter() - start
            size = sum(f.stat().st_size for f in model.glob("*.safetensors")) / 1e9
            print(f"{layers} layers: wrote {size:.2f} GB of bf16 shards in {written:.0f} s", flush=True)
            calib = scratch / "calib"
            text = calibration_text(scratch)
            plan = scratch / "plan.json"
            art = scratch / "art"
            quantize = ["quantize", *device, "--plan", str(plan), "--model", str(model), "--out"]
            window = ["--ppl-source", str(text), "--seq-len", "512"]
            runs = {
                "calibrate": ["calibrate", "--model", str(model), "--calib", str(text), "--samples",
                              str(args.samples), "--seq-len", str(args.seq_len), "--out", str(calib)],
                **{f"score {m}": ["score", *device, "--model", str(model), "--method", m, "--calib-dir", str(calib),
                                  "--out", str(scratch / f"{m}.json")] for m in ("cosine", "jaccard")},
                # every layer INT4 in groups of 128 (the plan is set-up, not measured)
                "plan": ["plan", "--importance", str(scratch / "cosine.json"), "--strategy", "int4", "--group-size",
                         "128", "--budget", "1000GB", "--out", str(plan)],
                "quantize rtn": [*quantize, str(art)],
                **({"quantize gptq": [*quantize, str(scratch / "gptq"), "--quantizer", "gptq", "--calibration",
                                      str(calib)]} if layers <= args.gptq_layers else {}),
                "eval fidelity": ["eval", *device, str(art), "--baseline-model", str(model), *window,
                                  "--fidelity-windows", "1", "--fidelity-seq-len", "512"],
                "eval perplexity": ["eval", *device, str(model), "--ppl", *window, "--max-windows", "1"],
                **({"measure": ["measure", *device, "--model", str(model), "--calib-dir", str(calib), "--probes",
                                "int8,int4", "--out", str(scratch / "loss.json")]} if layers <= args.measure_layers
                   else {}),
            }
            for name, argv in runs.items():
                wall, peak, where, gpu = stage(argv)
                shutil.rmtree(scratch / "gptq", ignore_errors=True)
                if name == "plan":
                    continue
                rows.append((layers, size, name, wall, peak, where, gpu))
                print(f"  {name:14s} {wall:7.1f} s  {wall / layers:6.2f} s/layer  peak RSS {peak:.2f} GiB  on {where}"
                      f"  peak GPU {gpu}", flush=True)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    print(f"\n{args.config} widths, {args.samples} x {args.seq_len} tokens, one process per stage:\n")
    print("| layers | checkpoint (bf16) | stage | computed on | wall | per layer | peak RSS | peak GPU |")
    print("|---|---|---|---|---|---|---|---|")
    for layers, size, name, wall, peak, where, gpu in rows:
        print(f"| {layers} | {size:.2f} GB | {name} | {where} | {wall:.1f} s | {wall / layers:.2f} s | {peak:.2f} GiB "
              f"| {gpu} |")
    deepest, shallowest = max(args.layers), min(args.layers)
    ok = True
    for name in dict.fromkeys(r[2] for r in rows):
        peaks = {r[0]: r[4] for r in rows if r[2] == name}
        walls = {r[0]: r[3] for r in rows if r[2] == name}
        deep, shallow = max(peaks), min(peaks)
        ratio = peaks[deep] / peaks[shallow]
        target = CONFIG_TARGET_GIB.get(args.config, PEAK_TARGET_GIB.get(name, DEFAULT_PEAK_TARGET_GIB))
        within = ratio <= RATIO_TARGET and peaks[deep] <= target
        ok &= within
        if deep == deepest:
            print(f"{name}: peak RSS {deep} / {shallow} layers = {ratio:.2f} (target <= {RATIO_TARGET}); "
                  f"{peaks[deep]:.2f} GiB at {deep} layers (target <= {target} GiB): "
                  f"{'met' if within else 'MISSED'}")
        elif name == "measure":  # run at shallow depths only; its layer runs grow as L^2, its loads as L
            print(f"{name}: peak RSS {deep} / {shallow} layers = {ratio:.2f} (target <= {RATIO_TARGET}); "
                  f"{peaks[deep]:.2f} GiB at {deep} layers (target <= {target} GiB): {'met' if within else 'MISSED'}")
        else:  # run at shallow depths only (GPTQ): its time per layer extrapolated to the deepest
            print(f"{name}: {peaks[deep]:.2f} GiB at {deep} layers (target <= {target} GiB): "
                  f"{'met' if within else 'MISSED'}; {walls[deep] / deep:.0f} s per layer, about "
                  f"{walls[deep] / deep * deepest / 60:.0f} min at {deepest} layers")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
