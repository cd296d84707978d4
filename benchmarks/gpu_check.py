"""Every model stage on the device ``--compute-device auto`` picks, against the same stage on the CPU.

A random-weight Llama of small widths (4 layers, hidden 256, bf16 shards with an index, written here and removed
afterwards) goes through each stage twice, once with ``compute_device="auto"`` and once with ``"cpu"``, through
lsaq's stage functions (no Prefect), and the results are compared within these tolerances:

* importance (``cosine``, ``jaccard``) and the measured layer loss (INT8 and INT4 probes): on a GPU ``auto``
  computes in bfloat16, on the CPU in float32, so scores agree to bfloat16's rounding carried through the layers
  (:data:`TOLERANCE`, absolute on the scores, relative to the largest loss for the measured loss);
* round-to-nearest quantization reads the weights in float32 on any device: its artifact's files are the CPU's to
  the byte;
* GPTQ's codes depend on the order of floating-point sums: its build's fidelity (KL to the float model) agrees
  within :data:`GPTQ_KL_REL`;
* evaluation computes in float32 on any device: the round-to-nearest build's fidelity (mean KL, top-1 agreement)
  and perplexity agree to float32 rounding (:data:`EVAL_REL`, relative).

Each stage's record says where it computed and its peak host and GPU memory; they are printed. Exit status 0 when
every comparison holds. On a machine without a GPU ``auto`` is the CPU and every comparison is exact.

    .venv/bin/python benchmarks/gpu_check.py [--dir SCRATCH]
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import shutil
import sys
import tempfile
import time
from importlib import resources
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# bfloat16 vs float32 through the 4 random layers, measured on the CPU with `auto` forced to bfloat16: cosine
# 5.8e-5, jaccard 2.0e-3, measured loss 0.19% of the largest; about 25 times that, for the GPU's own kernels.
TOLERANCE = {"cosine": 0.002, "jaccard": 0.05, "measure": 0.05}
GPTQ_KL_REL = 0.2
# float32 on both: logits agree to ~1e-6, and a mean KL of ~1e-3 nats is a small difference of log-probabilities
EVAL_REL = {"kl": 1e-3, "ppl": 1e-4}
WIDTHS = {"hidden_size": 256, "intermediate_size": 768, "num_attention_heads": 4, "num_key_value_heads": 4,
          "vocab_size": 128, "max_position_embeddings": 512}


def check_model(folder: Path) -> Path:
    """A random Llama of :data:`WIDTHS` and 4 layers in ``folder`` (a character tokenizer beside it)."""
    from lsaq.engine.synthetic import write_random_checkpoint

    config = json.loads(resources.files("lsaq").joinpath("data/configs/llama-2-7b.json").read_text())
    return write_random_checkpoint(config | WIDTHS, folder, layers=4)


def text_file(folder: Path) -> Path:
    """Text to calibrate and evaluate on: this repository's README (the weights are random; any text will do)."""
    text = folder / "text.txt"
    text.write_text((ROOT / "README.md").read_text())
    return text


def mixed_plan(model: Path, importance: Any) -> Any:
    """A plan for ``model`` whose layers are FP16, INT8, INT4 and INT4 (groups of 128): every packed module."""
    import lsaq
    from lsaq.planning.memory import WeightPolicy
    from lsaq.planning.planner import PlanOptions, Strategy
    from lsaq.precision import Precision

    options = PlanOptions(context=128, strategy=Strategy.INT4).with_policy(WeightPolicy(group_size=128))
    base = lsaq.plan(lsaq.DeviceRequest(budget="1000GB"), importance=importance, options=options)
    return dataclasses.replace(base, precisions=(Precision.FP16, Precision.INT8, Precision.INT4, Precision.INT4))


def files_digest(folder: Path) -> dict[str, str]:
    """sha256 of every safetensors file in ``folder``."""
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(folder.glob("*.safetensors"))}


def run_both(name: str, stage: Callable[[str], Any], rows: list[list[str]]) -> tuple[Any, Any]:
    """``stage(device)`` for ``auto`` and ``cpu``; a row of where each ran, its time and memory."""
    out = []
    for device in ("auto", "cpu"):
        start = time.perf_counter()
        record = stage(device)
        memory = getattr(record, "memory", None)
        rows.append([name, device, f"{time.perf_counter() - start:.1f} s",
                     memory.describe() if memory is not None else "-"])
        print(f"  {name} ({device}): {rows[-1][2]}, {rows[-1][3]}", flush=True)
        out.append(record)
    return out[0], out[1]


def compare(name: str, ok: bool, detail: str, results: list[tuple[str, bool, str]]) -> None:
    results.append((name, ok, detail))
    print(f"  {'ok  ' if ok else 'FAIL'} {name}: {detail}", flush=True)


def check(scratch: Path) -> bool:
    """Run every stage on ``auto`` and on the CPU in ``scratch``; True when every comparison holds."""
    import lsaq
    from lsaq.eval.options import EvalOptions

    model = check_model(scratch / "model")
    text = text_file(scratch)
    calib = scratch / "calib"
    lsaq.calibrate(str(model), calib, source=str(text), samples=4, seq_len=128)
    rows: list[list[str]] = []
    results: list[tuple[str, bool, str]] = []
    common = dict(calibration=calib, batch_size=2)
    for method in ("cosine", "jaccard"):
        gpu, cpu = run_both(f"score {method}", lambda d: lsaq.score(str(model), method=method, compute_device=d,
                                                                     **common), rows)
        diff = max(abs(a - b) for a, b in zip(gpu.importance, cpu.importance))
        compare(f"score {method}", diff <= TOLERANCE[method], f"max |difference| {diff:.2e} "
                f"(tolerance {TOLERANCE[method]})", results)
    gpu, cpu = run_both("measure", lambda d: lsaq.measure(str(model), probes=("int8", "int4"), compute_device=d,
                                                          **common), rows)
    largest = max(max(row) for row in cpu.loss)
    diff = max(abs(a - b) for ga, ca in zip(gpu.loss, cpu.loss) for a, b in zip(ga, ca)) / largest
    compare("measure", diff <= TOLERANCE["measure"], f"max |difference| {diff:.2%} of the largest loss "
            f"(tolerance {TOLERANCE['measure']:.0%})", results)

    plan = mixed_plan(model, cpu_importance := lsaq.score(str(model), method="cosine", compute_device="cpu",
                                                          **common))
    del cpu_importance
    arts = {}
    for quantizer in ("rtn", "gptq"):
        arts[quantizer] = run_both(f"quantize {quantizer}", lambda d: lsaq.quantize(
            plan, scratch / f"{quantizer}-{d}", model=str(model), quantizer=quantizer,
            calibration=calib if quantizer == "gptq" else None, compute_device=d), rows)
    same = files_digest(scratch / "rtn-auto") == files_digest(scratch / "rtn-cpu")
    compare("quantize rtn", same, "artifact files identical" if same else "artifact files differ", results)

    options = EvalOptions(ppl=True, ppl_source=str(text), seq_len=128, max_windows=4, fidelity_windows=4,
                          fidelity_seq_len=128)
    evals = {}
    for quantizer in ("rtn", "gptq"):
        evals[quantizer] = run_both(f"eval {quantizer}", lambda d: lsaq.evaluate(
            scratch / f"{quantizer}-cpu", options=options, baseline=str(model), compute_device=d), rows)
    gpu, cpu = evals["rtn"]
    kl = abs(gpu.fidelity.kl_mean - cpu.fidelity.kl_mean) / cpu.fidelity.kl_mean
    top1 = abs(gpu.fidelity.top1_agreement - cpu.fidelity.top1_agreement)
    ppl = abs(gpu.quantized["perplexity"]["ppl"] - cpu.quantized["perplexity"]["ppl"]) / cpu.quantized["perplexity"][
        "ppl"]
    compare("eval", kl <= EVAL_REL["kl"] and ppl <= EVAL_REL["ppl"] and top1 <= 0.01,
            f"mean KL {kl:.1e} and perplexity {ppl:.1e} relative (tolerances {EVAL_REL['kl']}, {EVAL_REL['ppl']}); "
            f"top-1 agreement {top1:.3f} apart (tolerance 0.01)", results)
    gptq_kl = {d: lsaq.evaluate(scratch / f"gptq-{d}", options=EvalOptions(fidelity_windows=4, fidelity_seq_len=128,
                                                                            ppl_source=str(text)),
                                baseline=str(model), compute_device="cpu").fidelity.kl_mean for d in ("auto", "cpu")}
    rel = abs(gptq_kl["auto"] - gptq_kl["cpu"]) / gptq_kl["cpu"]
    compare("quantize gptq", rel <= GPTQ_KL_REL, f"build's mean KL {gptq_kl['auto']:.3e} (auto) vs "
            f"{gptq_kl['cpu']:.3e} (cpu), {rel:.1%} apart (tolerance {GPTQ_KL_REL:.0%})", results)

    print("\n| stage | compute device asked | wall | where it ran, peak memory |\n|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    failed = [name for name, ok, _ in results if not ok]
    print(f"\n{len(results) - len(failed)} of {len(results)} comparisons hold"
          + (f"; failed: {', '.join(failed)}" if failed else ""))
    return not failed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default=None, help="scratch folder (default: the system's temporary folder)")
    args = ap.parse_args()
    import torch

    cuda = f"CUDA: {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else "no CUDA"
    print(f"torch {torch.__version__}, {cuda}", flush=True)
    scratch = Path(tempfile.mkdtemp(prefix="lsaq-gpu-check-", dir=args.dir))
    try:
        ok = check(scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
