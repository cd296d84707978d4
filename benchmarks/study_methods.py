"""The quality-per-byte study: which ranking, strategy and quantizer give the best model at the same memory?

    .venv/bin/python benchmarks/study_methods.py --out out/study [--model PATH] [--bits 4.5,5.5,6.5,7.5]

For a model (default: the embedded SmolLM2-135M), on WikiText-2 *validation* calibration text:

* rankings: ``jaccard`` (LSAQ, k=1), ``cosine`` (LWQ) and ``sensitivity`` (KL with one layer INT4, the int4
  column of the round-to-nearest layer-loss record), each planned with the LSAQ demotion rule; one random ranking;
* ``measured``: the layer-loss record (:func:`lsaq.importance.cost.measure_layer_loss`) of the quantizer the build
  uses, planned by the exact min-loss knapsack (strategy ``measured``); ``measured-auto`` also weighs INT4
  per-channel against INT4 in groups of 64 (``group_size="auto"``);
* ``uniform``: the best single precision that fits;

each quantized with round-to-nearest and with GPTQ, at every budget (average bits per decoder-linear weight). Every
cell is WikiText-2 *test* perplexity; at ``--task-bits`` also zero-shot accuracy. ``--check-bits``: the measured
GPTQ plan (measured-auto) is also built as a real artifact (sequential GPTQ, :func:`lsaq.quantization.artifact.write_artifact`),
loaded on the packed runtime at fp32 and evaluated: the shipped numbers.

Evaluation swaps dequantized codes into one float32 model: round-to-nearest's are exact; GPTQ's come from the float
model's activations (:func:`lsaq.quantization.sequential.float_input_gptq`), an approximation of the sequential
quantizer the artifacts use, which the ``--check-bits`` rows measure. Everything expensive is cached in ``--out``
(records, ``evals.jsonl``), so an interrupted run resumes. Writes ``study.json``, ``study.md`` and plots.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from lsaq.version import __version__
from lsaq.eval.harness import evaluate_tasks
from lsaq.eval.perplexity import default_ppl_source, read_eval_text, tokenize_eval_windows, window_nll
from lsaq.calibration.sets import CalibrationSet, load_calibration
from lsaq.importance.cost import LayerLoss, measure_layer_loss
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
from lsaq.planning.planner import Plan, PlanOptions, Strategy, budget_for, make_plan
from lsaq.planning.stage import plan as plan_record
from lsaq.precision import Precision
from lsaq.quantization.artifact import write_artifact
from lsaq.quantization.reader import load_quantized
from lsaq.quantization.primitives import QuantizedWeight
from lsaq.quantization.sequential import float_input_gptq
from lsaq.records import atomic_write_bytes, atomic_write_json

SCHEMA, VERSION = "lsaq.study", 2
QUANTIZERS = ("rtn", "gptq")
RANKINGS = ("jaccard", "cosine", "sensitivity", "random")
GROUP = 64  # INT4 group size of the grouped probe (lsaq.planning.memory.fitting_group_size of the default model)
PROBES = ("int8", "int4", f"int4-g{GROUP}")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------ scores


def ranking(loaded: LoadedModel, out: Path, method: str, calib: CalibrationSet) -> LayerImportance:
    """Score with ``method`` (k=DEFAULT_K for jaccard), or reuse ``out/importance/<method>.json``."""
    path = out / "importance" / f"{method}.json"
    if path.is_file():
        rec = LayerImportance.load(path)
        if rec.model.content_hash == loaded.info.content_hash and rec.calibration.hash == calib.info().hash:
            log(f"{method}: reusing {path}")
            return rec
    log(f"{method}: scoring on {calib.samples} x {calib.seq_len} tokens")
    rec = score_importance(loaded.model, loaded.info, calib, method, DEFAULT_K)
    rec.save(path)
    log(f"{method}: {rec.wall_time_s:.0f}s")
    return rec


def layer_loss(loaded: LoadedModel, out: Path, quantizer: str, calib: CalibrationSet) -> LayerLoss:
    """The layer-loss record of ``quantizer``, or reuse ``out/loss-<quantizer>.json``."""
    path = out / f"loss-{quantizer}.json"
    if path.is_file():
        rec = LayerLoss.load(path)
        if rec.model.content_hash == loaded.info.content_hash and rec.calibration.hash == calib.info().hash:
            log(f"layer loss {quantizer}: reusing {path}")
            return rec
    log(f"layer loss {quantizer}: measuring on {calib.samples} x {calib.seq_len} tokens")
    rec = measure_layer_loss(loaded.model, loaded.info, calib, PROBES, quantizer=quantizer)
    rec.save(path)
    log(f"layer loss {quantizer}: {rec.seconds:.0f}s = {rec.cost_ratio:.1f} forward passes")
    return rec


# ------------------------------------------------------------------------------------------------- plans


def budget_plan(shape: ModelShape, model: ModelRef, bits: float, strategy: str, scores: Sequence[float],
                ref: ImportanceRef | None = None, loss: LayerLoss | None = None, group_size: str | None = None) -> Plan:
    """A plan whose decoder linears get at most ``bits`` per weight on average (a pseudo-device of that size);
    with ``loss``, :func:`lsaq.planning.stage.plan` of the record (``group_size="auto"``: INT4 format weighed)."""
    options = PlanOptions(context=2048, strategy=strategy)
    capacity = math.floor(bits * shape.num_layers * shape.linear_params_per_layer / 8)
    device = DeviceProfile(name=f"study-{bits}bits", memory=budget_for(shape, options).fixed + capacity,
                           kind=MemoryKind.SYSTEM, reserve=0, notes="study budget", origin="--budget")
    if loss is not None:
        return plan_record(device, loss=loss, options=options, group_size=group_size)
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
    """Every decoder linear's weight per quantizer and format, dequantized: ``bank[quantizer, layer, name, p, g]``
    (``g``: INT4 group size or None)."""

    def __init__(self, loaded: LoadedModel, calib: CalibrationSet):
        parts = decoder_parts(loaded.model)
        self.layers = list(parts.layers)
        self.names = [n for n, m in self.layers[0].named_modules() if isinstance(m, torch.nn.Linear)]
        self.bank: dict[tuple[str, int, str, Precision | None, int | None], torch.Tensor] = {}
        specs = [(Precision.INT8, None), (Precision.INT4, None), (Precision.INT4, GROUP)]
        self.seconds: dict[str, float] = {}
        start = time.perf_counter()
        with torch.inference_mode():
            for i, layer in enumerate(self.layers):
                for name in self.names:
                    w = layer.get_submodule(name).weight.data  # [out, in] float32
                    self.bank["float", i, name, None, None] = w
                    half = w.half().float()
                    for q in QUANTIZERS:
                        self.bank[q, i, name, Precision.FP16, None] = half
                    for p, g in specs:
                        self.bank["rtn", i, name, p, g] = QuantizedWeight.quantize(w, p, g).dequantize(torch.float32)
        self.seconds["rtn"] = time.perf_counter() - start
        start = time.perf_counter()
        gptq = float_input_gptq(parts, calib.tokens, specs)
        for i, per_spec in enumerate(gptq):
            for (p, g), weights in per_spec.items():
                for name, qw in weights.items():
                    self.bank["gptq", i, name, p, g] = qw.dequantize(torch.float32)
        self.seconds["gptq"] = time.perf_counter() - start
        log(f"weight bank: rtn {self.seconds['rtn']:.1f}s, gptq (float inputs) {self.seconds['gptq']:.1f}s")

    def apply(self, quantizer: str, precisions: Sequence[Precision] | None, group: int | None = None) -> None:
        """Swap in ``quantizer``'s weights at ``precisions`` (one per layer, INT4 in groups of ``group`` or
        per-channel); ``None`` restores the floats."""
        for i, layer in enumerate(self.layers):
            for name in self.names:
                if precisions is None:
                    key = ("float", i, name, None, None)
                else:
                    key = (quantizer, i, name, precisions[i], group if precisions[i] is Precision.INT4 else None)
                layer.get_submodule(name).weight.data = self.bank[key]


def ppl_of(model: torch.nn.Module, windows: torch.Tensor, batch: int = 2) -> float:
    """exp(mean NLL) over ``windows`` ``[W, L]``, the protocol of :func:`lsaq.eval.perplexity.perplexity`."""
    with torch.inference_mode():
        total = sum(float(window_nll(model, windows[i:i + batch]).sum()) for i in range(0, windows.shape[0], batch))
    nll = total / (windows.shape[0] * (windows.shape[1] - 1))
    return math.exp(nll) if nll < 709 else math.inf


def task_metrics(model: torch.nn.Module, tokenizer: Any, tasks: list[str], limit: int) -> dict[str, float]:
    res = evaluate_tasks(model, tokenizer, tasks, limit=limit)
    return {f"{name}/{m}": r.metrics[m] for name, r in res.items() for m in ("acc", "acc_norm") if m in r.metrics}


def code(precisions: Sequence[Precision], group: int | None = None) -> str:
    """One letter per layer: F (fp16), 8, 4 (per-channel) or g (INT4 in groups of ``group``)."""
    return "".join("F" if p is Precision.FP16 else "8" if p is Precision.INT8 else "g" if group else "4"
                   for p in precisions)


class Evaluations:
    """Perplexity (and task accuracy) per (quantizer, assignment), each measured once; cached in ``evals.jsonl``."""

    def __init__(self, path: Path, loaded: LoadedModel, bank: WeightBank, windows: torch.Tensor,
                 tasks: list[str], limit: int):
        self.path, self.loaded, self.bank, self.windows, self.tasks, self.limit = path, loaded, bank, windows, tasks, limit
        self.done: dict[tuple[str, str], dict[str, Any]] = {}
        if path.is_file():
            for line in path.read_text().splitlines():
                row = json.loads(line)
                self.done[row["quantizer"], row["code"]] = row

    def __call__(self, quantizer: str, precisions: Sequence[Precision], with_tasks: bool = False,
                 group: int | None = None) -> dict[str, Any]:
        key = (quantizer, code(precisions, group))
        row = self.done.get(key)
        if row is not None and (not with_tasks or not self.tasks or row.get("tasks")):
            return row
        self.bank.apply(quantizer, precisions, group)
        start = time.perf_counter()
        row = {"quantizer": quantizer, "code": key[1], "ppl": ppl_of(self.loaded.model, self.windows),
               "ppl_seconds": time.perf_counter() - start}
        if with_tasks and self.tasks:
            row["tasks"] = task_metrics(self.loaded.model, self.loaded.tokenizer, self.tasks, self.limit)
        self.done[key] = row
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        log(f"{quantizer} {key[1]}: ppl {row['ppl']:.3f}" + (f" tasks {row['tasks']}" if "tasks" in row else ""))
        return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model path (default: the embedded SmolLM2-135M)")
    ap.add_argument("--out", default="out/study")
    ap.add_argument("--bits", default="4.5,5.5,6.5,7.5", help="budgets, average bits per decoder-linear weight")
    ap.add_argument("--extra-bits", default="6.0", help="budgets evaluated for the measured strategy only")
    ap.add_argument("--samples", type=int, default=32, help="calibration sequences: cosine and GPTQ")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--slow-samples", type=int, default=8, help="calibration sequences: jaccard and layer loss")
    ap.add_argument("--calib", default=None, help="calibration source (default WikiText-2 valid)")
    ap.add_argument("--ppl-source", default=None, help="default: WikiText-2 raw test (shared/data)")
    ap.add_argument("--ppl-seq-len", type=int, default=2048)
    ap.add_argument("--ppl-windows", type=int, default=16)
    ap.add_argument("--tasks", default="piqa,arc_easy", help="comma-separated zero-shot tasks")
    ap.add_argument("--limit", type=int, default=200, help="examples per task")
    ap.add_argument("--task-bits", default="5.5", help="budgets at which tasks are evaluated")
    ap.add_argument("--task-methods", default="cosine,measured-auto", help="rows whose tasks are evaluated")
    ap.add_argument("--random-quantizers", default="rtn", help="quantizers of the random-ranking rows")
    ap.add_argument("--check-bits", default="6.0", help="budgets whose measured-auto GPTQ plan is built for real")
    ap.add_argument("--methods", default="jaccard,cosine,sensitivity,random,measured-auto,uniform",
                    help="rows: the rankings, measured (per-channel INT4), measured-auto (INT4 format weighed), uniform")
    ap.add_argument("--render", action="store_true", help="only re-render study.md and the plots from study.json")
    args = ap.parse_args()
    out = Path(args.out)
    if args.render:
        render(out)
        return
    out.mkdir(parents=True, exist_ok=True)
    floats = lambda text: [float(b) for b in text.split(",") if b]  # noqa: E731
    bits_list, extra, task_bits, check_bits = (floats(a) for a in (args.bits, args.extra_bits, args.task_bits,
                                                                     args.check_bits))
    tasks = [t for t in args.tasks.split(",") if t]
    start = time.perf_counter()
    torch.manual_seed(0)

    loaded = load_model(args.model)
    shape = model_shape(loaded.info.config)
    model_id = ModelRef.from_info(loaded.info)
    calib = load_calibration(loaded.tokenizer, args.calib, samples=args.samples, seq_len=args.seq_len, seed=0)
    slow = load_calibration(loaded.tokenizer, args.calib, samples=args.slow_samples, seq_len=args.seq_len, seed=0)

    # 1. Scores: two proxies, the layer-loss record of each quantizer (its int4 column is `sensitivity`).
    recs = {"jaccard": ranking(loaded, out, "jaccard", slow), "cosine": ranking(loaded, out, "cosine", calib)}
    losses = {q: layer_loss(loaded, out, q, slow) for q in QUANTIZERS}
    scores: dict[str, tuple[float, ...]] = {name: r.importance for name, r in recs.items()}
    scores["sensitivity"] = losses["rtn"].sensitivity
    scores["random"] = tuple(float(x) for x in np.random.default_rng(0).permutation(shape.num_layers))
    agreement = {name: spearman(scores[name], scores["sensitivity"]) for name in ("jaccard", "cosine", "random")}
    agreement["gptq int4 loss"] = spearman(losses["gptq"].sensitivity, scores["sensitivity"])
    for name, rho in agreement.items():
        log(f"spearman({name}, sensitivity) = {rho:+.3f}")

    # 2. Plans.
    methods_all = [m for m in args.methods.split(",") if m]
    rows: list[dict[str, Any]] = []
    for bits in sorted(set(bits_list) | set(extra)):
        for q in QUANTIZERS:
            methods = [m for m in methods_all if (bits in bits_list or m.startswith("measured"))
                       and (m != "random" or q in args.random_quantizers.split(","))]
            for name in methods:
                if name.startswith("measured"):
                    plan = budget_plan(shape, model_id, bits, Strategy.MEASURED.value, (), loss=losses[q],
                                       group_size="auto" if name == "measured-auto" else None)
                elif name == "uniform":
                    u = best_uniform(shape, bits)
                    plan = budget_plan(shape, model_id, bits, u.value, [1.0] * shape.num_layers)
                else:
                    plan = budget_plan(shape, model_id, bits, Strategy.LSAQ.value, scores[name],
                                       ImportanceRef("study", name))
                rows.append({"budget_bits": bits, "quantizer": q, "method": name, "plan": plan})

    # 3. Evaluate every distinct (quantizer, assignment) once.
    text, _ = read_eval_text(args.ppl_source or default_ppl_source())
    windows = tokenize_eval_windows(loaded.tokenizer, text, args.ppl_seq_len)[0][: args.ppl_windows]
    log(f"perplexity on {windows.shape[0]} windows x {windows.shape[1]} tokens; {len(rows)} cells")
    bank = WeightBank(loaded, calib)
    evaluate = Evaluations(out / "evals.jsonl", loaded, bank, windows, tasks, args.limit)
    refs = {"float": evaluate("rtn", (Precision.FP16,) * shape.num_layers, True)}
    for q in QUANTIZERS:
        for p, g in ((Precision.INT8, None), (Precision.INT4, None), (Precision.INT4, GROUP)):
            label = f"all-{p.value}" + (f"-g{g}" if g else "") + f" {q}"
            refs[label] = evaluate(q, (p,) * shape.num_layers, p is Precision.INT4 and g is None, g)
    for row in rows:
        with_tasks = row["budget_bits"] in task_bits and row["method"] in args.task_methods.split(",")
        r = evaluate(row["quantizer"], row["plan"].precisions, with_tasks, row["plan"].options.policy.group_size)
        row.update(ppl=r["ppl"], tasks=r.get("tasks"))

    # 4. The shipped path: real artifacts of the measured GPTQ plans (sequential GPTQ), packed runtime at fp32.
    bank.apply("rtn", None)
    checks = []
    for row in rows:
        if row["method"] == "measured-auto" and row["quantizer"] == "gptq" and row["budget_bits"] in check_bits:
            t0 = time.perf_counter()
            with tempfile.TemporaryDirectory(dir=out) as tmp:
                write_artifact(load_model(args.model), row["plan"], Path(tmp) / "artifact", quantizer="gptq",
                               calibration=calib)
                seconds = time.perf_counter() - t0
                packed = load_quantized(Path(tmp) / "artifact", dtype=torch.float32).model
                ppl = ppl_of(packed, windows)
                del packed
            checks.append({"budget_bits": row["budget_bits"], "plan_id": row["plan"].id, "artifact_ppl": ppl,
                           "swapped_ppl": row["ppl"], "quantize_seconds": seconds})
            log(f"artifact {row['budget_bits']} bits: ppl {ppl:.3f} (swapped {row['ppl']:.3f}), quantized in "
                f"{seconds:.0f}s")

    record = {
        "schema": SCHEMA, "version": VERSION, "lsaq_version": __version__,
        "model": {k: v for k, v in loaded.info.to_json().items() if k != "config"},
        "settings": vars(args), "refs": refs,
        "scores": {name: list(v) for name, v in scores.items()},
        "seconds": {"jaccard": recs["jaccard"].wall_time_s, "cosine": recs["cosine"].wall_time_s,
                    **{f"loss {q}": losses[q].seconds for q in QUANTIZERS},
                    "forward (same tokens as loss)": losses["rtn"].forward_seconds,
                    **{f"quantize {q} (bank)": s for q, s in bank.seconds.items()}},
        "cost_ratio": {f"loss {q}": losses[q].cost_ratio for q in QUANTIZERS},
        "spearman_vs_sensitivity": agreement,
        "rows": [{"budget_bits": r["budget_bits"], "quantizer": r["quantizer"], "method": r["method"],
                  "avg_bits": r["plan"].avg_bits["quantizable_linears"], "counts": r["plan"].counts,
                  "predicted_loss": r["plan"].predicted_loss, "group_size": r["plan"].options.policy.group_size,
                  "code": code(r["plan"].precisions, r["plan"].options.policy.group_size),
                  "ppl": r["ppl"], "tasks": r["tasks"]} for r in rows],
        "artifact_checks": checks,
        "total_seconds": time.perf_counter() - start,
    }
    atomic_write_json(out / "study.json", record)
    log(f"wrote {out}/study.json ({record['total_seconds'] / 60:.1f} min)")
    render(out)


def render(out: Path) -> None:
    """``study.md`` and the plots from ``study.json`` (rerun alone with ``--render``)."""
    from lsaq.plots import plot_importance, plot_ppl_vs_bits
    from lsaq.records import read_record

    record = read_record(out / "study.json", SCHEMA, VERSION)
    atomic_write_bytes(out / "study.md", render_markdown(record).encode())
    name = record["model"]["id"]
    for q in QUANTIZERS:
        rows = [{"method": r["method"], "avg_bits": r["avg_bits"], "ppl": r["ppl"]}
                for r in record["rows"] if r["quantizer"] == q]
        plot_ppl_vs_bits(rows, out / f"ppl_vs_bits_{q}.png", baseline_ppl=record["refs"]["float"]["ppl"],
                         title=f"{name}, {q}: WikiText-2 perplexity vs average bits")
    plot_importance({m: record["scores"][m] for m in ("jaccard", "cosine", "sensitivity")}, out / "importance.png",
                    title=f"{name}: layer importance")
    print(render_markdown(record))


def render_markdown(record: dict[str, Any]) -> str:
    """The study's tables: perplexity per budget x method x quantizer, tasks, artifacts, costs, agreement."""
    rows, s, refs = record["rows"], record["settings"], record["refs"]
    budgets = sorted({r["budget_bits"] for r in rows})
    lines = [
        f"WikiText-2 test perplexity, {s['ppl_windows']} windows x {s['ppl_seq_len']} tokens (lower is better); "
        f"float {refs['float']['ppl']:.3f}; all-INT8 {refs['all-int8 rtn']['ppl']:.3f} (rtn) / "
        f"{refs['all-int8 gptq']['ppl']:.3f} (gptq); all-INT4 {refs['all-int4 rtn']['ppl']:.3f} (rtn) / "
        f"{refs['all-int4 gptq']['ppl']:.3f} (gptq); all-INT4 in groups of {GROUP} "
        f"{refs[f'all-int4-g{GROUP} rtn']['ppl']:.3f} (rtn) / {refs[f'all-int4-g{GROUP} gptq']['ppl']:.3f} (gptq). "
        "Cells: perplexity (plan's average bits); `measured-auto` also weighs INT4 per-channel vs grouped.",
        "",
        "| quantizer | method | " + " | ".join(f"{b} bits" for b in budgets) + " |",
        "|---|---|" + "---|" * len(budgets),
    ]
    for q in QUANTIZERS:
        for m in dict.fromkeys(r["method"] for r in rows):
            cells = []
            for b in budgets:
                hit = [r for r in rows if (r["budget_bits"], r["quantizer"], r["method"]) == (b, q, m)]
                best = min((r["ppl"] for r in rows if r["budget_bits"] == b), default=None)
                cell = f"{hit[0]['ppl']:.2f} ({hit[0]['avg_bits']:.2f}b)" if hit else "-"
                cells.append(f"**{cell}**" if hit and hit[0]["ppl"] == best else cell)
            lines.append(f"| {q} | {m} | " + " | ".join(cells) + " |")
    with_tasks = [r for r in rows if r["tasks"]]
    if with_tasks:
        metrics = list(refs["float"].get("tasks") or {})
        lines += ["", f"Zero-shot accuracy (first {s['limit']} examples per task):", "",
                  "| budget | quantizer | method | " + " | ".join(metrics) + " |", "|---|---|---|" + "---|" * len(metrics)]
        for label in ("float", "all-int4 rtn", "all-int4 gptq"):
            if refs[label].get("tasks"):
                lines.append(f"| - | - | {label} | " + " | ".join(f"{refs[label]['tasks'][m]:.3f}" for m in metrics) + " |")
        for r in with_tasks:
            lines.append(f"| {r['budget_bits']} | {r['quantizer']} | {r['method']} | "
                         + " | ".join(f"{r['tasks'][m]:.3f}" for m in metrics) + " |")
    if record["artifact_checks"]:
        lines += ["", "Real artifacts (sequential GPTQ, packed runtime at fp32) of the measured-auto GPTQ plans:", "",
                  "| budget | artifact ppl | swapped-weights ppl | quantize s |", "|---|---|---|---|"]
        lines += [f"| {c['budget_bits']} | {c['artifact_ppl']:.3f} | {c['swapped_ppl']:.3f} | "
                  f"{c['quantize_seconds']:.0f} |" for c in record["artifact_checks"]]
    lines += ["", "Time (s): " + ", ".join(f"{k} {v:.1f}" for k, v in record["seconds"].items())
              + "; layer loss in forward passes: " + ", ".join(f"{k} {v:.1f}" for k, v in record["cost_ratio"].items()),
              "", "Spearman with the measured sensitivity: "
              + ", ".join(f"{k} {v:+.3f}" for k, v in record["spearman_vs_sensitivity"].items())]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
