"""The LSAQ vs LWQ study: which layer ranking gives the best quantized model at the same memory?

    .venv/bin/python benchmarks/study_methods.py --out out/study [--model PATH] [--bits 4.5,5.5,6.5,7.5]

For a model (default: the embedded SmolLM2-135M) it scores layer importance with ``jaccard`` (LSAQ, k=10),
``cosine`` (LWQ) and ``sensitivity`` (measured: KL divergence with only that layer INT4), plus 3 random rankings;
sweeps k for ``jaccard``; then for every budget in average bits per decoder-linear weight builds a plan from each
ranking (the LSAQ demotion rule, and the exact knapsack for the two main methods) and the best uniform precision
that fits, quantizes, and measures WikiText-2 test perplexity (and task accuracy with ``--tasks``). It reports
each method's Spearman correlation with the measured sensitivity and writes ``study.json``, ``study.md`` and the
plots ``ppl_vs_bits.png`` and ``importance.png`` into ``--out``.

Quantized weights are the exact dequantized codes of :class:`lsaq.quantization.primitives.QuantizedWeight` swapped into one float32
copy of the model (every distinct plan evaluated once), i.e. the product lsaq's packed modules compute on their
dequantize path; one plan is re-checked through the real packed runtime (``lsaq.quantization.apply.quantize_model``).
Importance records are cached in ``--out/importance/`` and reused when their settings match.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from lsaq import __version__
from lsaq.eval.harness import evaluate_tasks
from lsaq.eval.perplexity import default_ppl_source, read_eval_text, tokenize_eval_windows, window_nll
from lsaq.importance.calibration import load_calibration
from lsaq.importance.record import LayerImportance
from lsaq.importance.scoring import score_importance
from lsaq.importance.similarity import spearman
from lsaq.methods import DEFAULT_K, ImportanceRef
from lsaq.models.families import model_shape
from lsaq.models.identity import ModelRef
from lsaq.models.loading import LoadedModel, load_model
from lsaq.models.parts import decoder_parts
from lsaq.models.shapes import ModelShape
from lsaq.planning.devices import DeviceProfile, MemoryKind
from lsaq.planning.memory import layer_linear_bytes
from lsaq.planning.planner import Plan, PlanOptions, budget_for, make_plan
from lsaq.precision import Precision
from lsaq.quantization.artifact import load_quantized, write_artifact
from lsaq.quantization.primitives import QuantizedWeight
from lsaq.records import atomic_write_bytes, atomic_write_json

SCHEMA, VERSION = "lsaq.study", 1
MAIN = ("jaccard", "cosine", "sensitivity")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------- importance


def importance(loaded: LoadedModel, out: Path, method: str, k: int | None, samples: int, seq_len: int,
               source: str | None) -> LayerImportance:
    """Score, or reuse ``out/importance/<name>.json`` when it was scored with the same settings."""
    name = f"{method}-k{k}-{samples}x{seq_len}" if method == "jaccard" else f"{method}-{samples}x{seq_len}"
    path = out / "importance" / f"{name}.json"
    if path.is_file():
        rec = LayerImportance.load(path)
        cal = rec.calibration
        if (rec.model.content_hash, rec.method, rec.k, cal["samples"], cal["seq_len"], cal["seed"]) == (
            loaded.info.content_hash, method, k if method == "jaccard" else None, samples, seq_len, 0
        ):
            log(f"importance {name}: reusing {path}")
            return rec
    calib = load_calibration(loaded.tokenizer, source, samples=samples, seq_len=seq_len, seed=0)
    log(f"importance {name}: scoring")
    rec = score_importance(loaded.model, loaded.info, calib, method, k if k is not None else DEFAULT_K)
    rec.save(path)
    log(f"importance {name}: {rec.wall_time_s:.0f}s, ranking {rec.ranking[:8]}...")
    return rec


# ------------------------------------------------------------------------------------------------ plans


def budget_plan(shape: ModelShape, model: ModelRef, scores: Sequence[float], bits: float, strategy: str,
                ref: ImportanceRef) -> Plan:
    """A plan whose decoder linears get at most ``bits`` per weight on average (a pseudo-device of that size)."""
    options = PlanOptions(context=2048, strategy=strategy)
    capacity = math.floor(bits * shape.num_layers * shape.linear_params_per_layer / 8)
    device = DeviceProfile(name=f"study-{bits}bits", memory=budget_for(shape, options).fixed + capacity,
                           kind=MemoryKind.SYSTEM, reserve=0, notes="study budget", origin="--budget")
    return make_plan(shape, scores, device, options, model=model, importance_ref=ref)


def best_uniform(shape: ModelShape, bits: float) -> Precision:
    """The highest precision whose all-layers storage fits ``bits`` per weight."""
    n = shape.num_layers * shape.linear_params_per_layer
    for p in Precision:
        if shape.num_layers * layer_linear_bytes(shape, p) * 8 <= bits * n:
            return p
    raise ValueError(f"not even all-int4 fits {bits} bits per weight")


# ------------------------------------------------------------------------------------------- evaluation


class WeightBank:
    """Every decoder linear's weight at each precision (fp16 round trip, INT8, INT4 codes dequantized)."""

    def __init__(self, loaded: LoadedModel, shape: ModelShape):
        self.layers = decoder_parts(loaded.model).layers
        self.names = [lin.name for lin in shape.layer_linears]
        self.bank: dict[tuple[int, str, Precision | None], torch.Tensor] = {}
        with torch.inference_mode():
            for i, layer in enumerate(self.layers):
                for name in self.names:
                    w = layer.get_submodule(name).weight.data  # [out, in] float32
                    self.bank[i, name, None] = w  # the original, restored by apply(None)
                    self.bank[i, name, Precision.FP16] = w.half().float()
                    for p in (Precision.INT8, Precision.INT4):
                        self.bank[i, name, p] = QuantizedWeight.quantize(w, p).dequantize(torch.float32)

    def apply(self, precisions: Sequence[Precision] | None) -> None:
        """Swap in the weights of ``precisions`` (one per layer); ``None`` restores the original floats."""
        for i, p in enumerate(precisions or [None] * len(self.layers)):
            for name in self.names:
                self.layers[i].get_submodule(name).weight.data = self.bank[i, name, p]


def ppl_of(model: torch.nn.Module, windows: torch.Tensor, batch: int = 2) -> float:
    """exp(mean NLL) over ``windows`` ``[W, L]``, the protocol of :func:`lsaq.eval.perplexity.perplexity`."""
    total = sum(float(window_nll(model, windows[i : i + batch]).sum()) for i in range(0, windows.shape[0], batch))
    nll = total / (windows.shape[0] * (windows.shape[1] - 1))
    return math.exp(nll) if nll < 709 else math.inf


def task_metrics(model: torch.nn.Module, tokenizer: Any, tasks: list[str], limit: int) -> dict[str, float]:
    res = evaluate_tasks(model, tokenizer, tasks, limit=limit)
    out = {}
    for name, r in res.items():
        for m in ("acc", "acc_norm"):
            if m in r.metrics:
                out[f"{name}/{m}"] = r.metrics[m]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model path (default: the embedded SmolLM2-135M)")
    ap.add_argument("--out", default="out/study")
    ap.add_argument("--bits", default="4.5,5.5,6.5,7.5", help="budgets, average bits per decoder-linear weight")
    ap.add_argument("--samples", type=int, default=32, help="calibration sequences for jaccard/cosine")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--calib", default=None, help="calibration source (default WikiText-2 valid)")
    ap.add_argument("--sensitivity-samples", type=int, default=8)
    ap.add_argument("--ks", default="1,5,10,20,50", help="k sweep for jaccard")
    ap.add_argument("--k-samples", type=int, default=8, help="calibration sequences per k of the sweep")
    ap.add_argument("--random-seeds", type=int, default=3)
    ap.add_argument("--ppl-source", default=None, help="default: WikiText-2 raw test (shared/data), else the hub")
    ap.add_argument("--ppl-seq-len", type=int, default=2048)
    ap.add_argument("--ppl-windows", type=int, default=8)
    ap.add_argument("--tasks", default="", help="comma-separated zero-shot tasks (e.g. piqa,arc_easy)")
    ap.add_argument("--limit", type=int, default=200, help="examples per task")
    ap.add_argument("--task-bits", default="5.5", help="budgets at which tasks are evaluated")
    ap.add_argument("--render", action="store_true", help="only re-render study.md and the plots from study.json")
    args = ap.parse_args()
    out = Path(args.out)
    if args.render:
        render(out)
        return
    bits_list = [float(b) for b in args.bits.split(",")]
    task_bits = {float(b) for b in args.task_bits.split(",") if b}
    tasks = [t for t in args.tasks.split(",") if t]
    start = time.perf_counter()

    loaded = load_model(args.model)
    shape = model_shape(loaded.info.config)
    model_id = ModelRef.from_info(loaded.info)

    # 1. Rankings.
    recs = {
        "jaccard": importance(loaded, out, "jaccard", 10, args.samples, args.seq_len, args.calib),
        "cosine": importance(loaded, out, "cosine", None, args.samples, args.seq_len, args.calib),
        "sensitivity": importance(loaded, out, "sensitivity", None, args.sensitivity_samples, args.seq_len, args.calib),
    }
    ks = [int(k) for k in args.ks.split(",") if k]
    for k in ks:
        recs[f"jaccard-k{k}"] = importance(loaded, out, "jaccard", k, args.k_samples, args.seq_len, args.calib)
    scores: dict[str, tuple[float, ...]] = {name: r.importance for name, r in recs.items()}
    for s in range(args.random_seeds):
        scores[f"random-{s}"] = tuple(float(x) for x in np.random.default_rng(s).permutation(shape.num_layers))
    truth = scores["sensitivity"]
    agreement = {name: spearman(v, truth) for name, v in scores.items() if name != "sensitivity"}
    for name, rho in agreement.items():
        log(f"spearman({name}, sensitivity) = {rho:+.3f}")

    # 2. Plans: each ranking with the LSAQ rule; the main methods also with the exact knapsack; best uniform.
    rows: list[dict[str, Any]] = []
    for bits in bits_list:
        for name, vals in scores.items():
            strategies = ("lsaq", "optimal") if name in MAIN else ("lsaq",)
            for strategy in strategies:
                ref = ImportanceRef(recs[name].id if name in recs else "random", name)
                plan = budget_plan(shape, model_id, vals, bits, strategy, ref)
                rows.append({"budget_bits": bits, "method": name, "strategy": strategy, "plan": plan})
        u = best_uniform(shape, bits)
        base = budget_plan(shape, model_id, scores["jaccard"], bits, "lsaq", {"id": "none", "method": None, "k": None})
        rows.append({"budget_bits": bits, "method": f"uniform-{u.value}", "strategy": u.value,
                     "plan": make_plan(shape, [1.0] * shape.num_layers, base.device,
                                       PlanOptions(context=2048, strategy=u.value), model=model_id)})

    # 3. Evaluate every distinct assignment once.
    text, _ = read_eval_text(args.ppl_source or default_ppl_source())
    windows = tokenize_eval_windows(loaded.tokenizer, text, args.ppl_seq_len)[0][: args.ppl_windows]
    log(f"perplexity on {windows.shape[0]} windows x {windows.shape[1]} tokens")
    bank = WeightBank(loaded, shape)
    results: dict[tuple[Precision, ...], dict[str, Any]] = {}

    def evaluate(precisions: tuple[Precision, ...], with_tasks: bool) -> dict[str, Any]:
        r = results.setdefault(precisions, {})
        if "ppl" not in r or (with_tasks and tasks and "tasks" not in r):
            bank.apply(precisions)
            t0 = time.perf_counter()
            with torch.inference_mode():
                r.setdefault("ppl", ppl_of(loaded.model, windows))
            if with_tasks and tasks and "tasks" not in r:
                r["tasks"] = task_metrics(loaded.model, loaded.tokenizer, tasks, args.limit)
            log(f"evaluated {''.join(p.value[-1] if p is not Precision.FP16 else 'F' for p in precisions)}: "
                f"ppl {r['ppl']:.3f} ({time.perf_counter() - t0:.0f}s)")
        return r

    float_ref = evaluate((Precision.FP16,) * shape.num_layers, True)
    for p in (Precision.INT8, Precision.INT4):
        evaluate((p,) * shape.num_layers, bool(task_bits))
    for row in rows:
        r = evaluate(row["plan"].precisions, row["budget_bits"] in task_bits and not row["method"].startswith("jaccard-k"))
        row.update(ppl=r["ppl"], tasks=r.get("tasks"))

    # 4. A real artifact of one mixed plan, loaded on lsaq's packed runtime at fp32, gives the same perplexity.
    check = next(r for r in rows if r["method"] == "jaccard" and r["budget_bits"] == bits_list[len(bits_list) // 2])
    bank.apply(None)
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        write_artifact(load_model(args.model), check["plan"], Path(tmp) / "artifact")
        packed = load_quantized(Path(tmp) / "artifact", dtype=torch.float32).model
        with torch.inference_mode():
            packed_ppl = ppl_of(packed, windows)
        del packed
    log(f"packed runtime check: {packed_ppl:.4f} vs swapped weights {check['ppl']:.4f}")

    write_outputs(out, args, loaded, rows, results, float_ref, recs, scores, agreement, tasks,
                  {"plan_id": check["plan"].id, "packed_ppl": packed_ppl, "swapped_ppl": check["ppl"]},
                  time.perf_counter() - start)


def write_outputs(out: Path, args: argparse.Namespace, loaded: LoadedModel, rows: list[dict[str, Any]],
                  results: dict, float_ref: dict, recs: dict, scores: dict, agreement: dict, tasks: list[str],
                  runtime_check: dict, seconds: float) -> None:
    int8 = results[(Precision.INT8,) * loaded.info.num_layers]
    int4 = results[(Precision.INT4,) * loaded.info.num_layers]
    table = [{
        "budget_bits": r["budget_bits"], "method": r["method"], "strategy": r["strategy"],
        "avg_bits": r["plan"].avg_bits["quantizable_linears"], "counts": r["plan"].counts,
        "precisions": [p.value for p in r["plan"].precisions], "ppl": r["ppl"], "tasks": r["tasks"],
    } for r in rows]
    record = {
        "schema": SCHEMA, "version": VERSION, "lsaq_version": __version__,
        "model": {k: v for k, v in loaded.info.to_json().items() if k != "config"},
        "settings": vars(args),
        "float": float_ref, "all_int8": int8, "all_int4": int4,
        "importance": {name: {"id": r.id, "method": r.method, "k": r.k, "calibration": r.calibration,
                              "values": list(r.importance), "ranking": r.ranking, "seconds": r.wall_time_s}
                       for name, r in recs.items()},
        "random": {name: list(v) for name, v in scores.items() if name.startswith("random")},
        "spearman_vs_sensitivity": agreement,
        "rows": table,
        "runtime_check": runtime_check,
        "seconds": seconds,
    }
    atomic_write_json(out / "study.json", record)
    log(f"wrote {out}/study.json ({seconds / 60:.1f} min)")
    render(out)


def render(out: Path) -> None:
    """``study.md`` and the plots from ``study.json`` (rerun alone with ``--render``)."""
    from lsaq.plots import plot_importance, plot_ppl_vs_bits
    from lsaq.records import read_record

    record = read_record(out / "study.json", SCHEMA, VERSION)
    table, name = record["rows"], record["model"]["id"]
    atomic_write_bytes(out / "study.md", render_markdown(record).encode())
    main_rows = [{"method": "uniform" if t["method"].startswith("uniform") else t["method"],
                  "avg_bits": t["avg_bits"], "ppl": t["ppl"]}
                 for t in table if t["strategy"] != "optimal" and not t["method"].startswith("jaccard-k")]
    plot_ppl_vs_bits(main_rows, out / "ppl_vs_bits.png", baseline_ppl=record["float"]["ppl"],
                     title=f"{name}: WikiText-2 perplexity vs average bits (LSAQ demotion rule)")
    plot_importance({m: record["importance"][m]["values"] for m in MAIN}, out / "importance.png",
                    title=f"{name}: layer importance")
    print(render_markdown(record))


def render_markdown(record: dict[str, Any]) -> str:
    """The study's tables: perplexity per budget x method, tasks where measured, Spearman vs sensitivity."""
    rows = record["rows"]
    budgets = sorted({r["budget_bits"] for r in rows})
    s = record["settings"]
    lines = [
        f"Perplexity: WikiText-2 test, {s['ppl_windows']} windows x {s['ppl_seq_len']} tokens. "
        f"Float: {record['float']['ppl']:.3f}; all-INT8: {record['all_int8']['ppl']:.3f}; "
        f"all-INT4 (per-channel): {record['all_int4']['ppl']:.3f}.",
        "",
        "| method | strategy | " + " | ".join(f"{b} bits" for b in budgets) + " |",
        "|---|---|" + "---|" * len(budgets),
    ]
    def key(r: dict[str, Any]) -> tuple[str, str]:
        return ("uniform", "best that fits") if r["method"].startswith("uniform") else (r["method"], r["strategy"])

    for k in dict.fromkeys(key(r) for r in rows):
        cells = []
        for b in budgets:
            hit = [r for r in rows if r["budget_bits"] == b and key(r) == k]
            cells.append(f"{hit[0]['ppl']:.2f} ({hit[0]['avg_bits']:.2f}b)" if hit else "-")
        lines.append(f"| {k[0]} | {k[1]} | " + " | ".join(cells) + " |")
    lines += ["", "Spearman correlation of each ranking with the measured sensitivity:", "",
              "| ranking | spearman |", "|---|---|"]
    lines += [f"| {k} | {v:+.3f} |" for k, v in record["spearman_vs_sensitivity"].items()]
    with_tasks = [r for r in rows if r["tasks"]]
    if with_tasks:
        metrics = list(record["float"].get("tasks", {}))
        lines += ["", "Zero-shot accuracy (first " + str(s["limit"]) + " examples of each task):", "",
                  "| budget | method | strategy | " + " | ".join(metrics) + " |", "|---|---|---|" + "---|" * len(metrics)]
        for label in ("float", "all_int8", "all_int4"):
            if record[label].get("tasks"):
                lines.append(f"| - | {label} | - | " + " | ".join(f"{record[label]['tasks'][m]:.3f}" for m in metrics) + " |")
        for r in with_tasks:
            lines.append(f"| {r['budget_bits']} | {r['method']} | {r['strategy']} | "
                         + " | ".join(f"{r['tasks'][m]:.3f}" for m in metrics) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
