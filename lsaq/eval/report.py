"""The evaluation report of a quantized artifact: its plan, and its metrics beside the float baseline's.

``lsaq eval DIR`` on an artifact directory evaluates two *runs* over the same metrics, windows and limits: the
float model the plan was made for (the **baseline**) and the artifact on lsaq's packed runtime (**quantized**),
and measures how far the quantized model's next-token distributions moved from the baseline's
(:mod:`lsaq.eval.fidelity`). :func:`build_report` turns them into one :class:`EvalReport`, a versioned record
(schema ``lsaq.eval_report``, version 1)::

    schema, version, lsaq_version
    model        identity of the model that was quantized (id, source, revision, content hash, architecture, ...)
    artifact     {"path", "plan_id", "tensor_bytes", "files_bytes", "lsaq_version"} (as given by the caller)
    plan         summary of the plan: id, strategy, device (name, memory/reserve/usable bytes), context, batch,
                 counts per precision, per-layer precisions, avg bits, weight/required/headroom bytes, fits,
                 importance {id, method, k}
    settings     what was evaluated and how (dtype, perplexity source and window, tasks, limit, ...)
    baseline     a run record, or null when the baseline was skipped (``--no-baseline``)
    quantized    a run record, or null when nothing was measured (plots only)
    comparison   one row per metric: {"key", "task", "metric", "label", "detail", "n", "higher_is_better",
                 "baseline", "quantized", "delta", "delta_pct", "baseline_stderr", "quantized_stderr"}
    fidelity     a :class:`~lsaq.eval.fidelity.FidelityResult` as JSON (KL mean and p99, top-1 agreement vs the
                 baseline), or null when the baseline was not evaluated (absent in records written before it)
    seconds      wall time of the whole evaluation

A run record (:func:`run_record`) is ``{"model", "artifact", "dtype", "perplexity", "tasks", "seconds"}`` with
``perplexity`` a :class:`~lsaq.eval.perplexity.PerplexityResult` as JSON (or null) and ``tasks`` a mapping of
task name to :class:`~lsaq.eval.harness.TaskResult` as JSON: the same shapes as the plain ``lsaq.eval`` record.

Rows: ``perplexity`` (the WikiText-style perplexity; ``n`` = scored tokens), then for each task its ``acc``,
``acc_norm``, ``perplexity`` (LAMBADA) and any other metric the harness gave (``n`` = examples scored). ``delta``
is quantized - baseline; ``delta_pct`` is ``100 * delta / baseline`` for perplexities, null for accuracies.
Both runs must have scored exactly the same material (same perplexity text hash, window length and windows,
same task data and number of examples): a report of two different evaluations is refused.

A model that is not an artifact gets the plain ``lsaq.eval`` record instead, :class:`ModelEval` (one run, no
plan, no baseline). :func:`render_markdown` renders a report as a small header, the table
``metric | baseline | quantized | delta`` and the fidelity figures; :func:`write_report` writes ``report.json``
and a sibling ``report.md``.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from lsaq.version import __version__
from lsaq.eval.fidelity import FidelityResult
from lsaq.models.identity import ModelRef
from lsaq.planning.planner import Plan
from lsaq.records import atomic_write_bytes, canonical_json, decode_record, read_record
from lsaq.resources import RunMemory
from lsaq.units import format_bytes

SCHEMA = "lsaq.eval_report"
VERSION = 1
PLAIN_SCHEMA = "lsaq.eval"  # the record of a plain model (not an artifact): ModelEval
PLAIN_VERSION = 1
PPL_METRIC = "perplexity"
# Task metrics in the order they are reported; anything else the harness returns follows, sorted by name.
TASK_METRIC_ORDER = ("acc", "acc_norm", "perplexity")
LOWER_IS_BETTER = frozenset({"perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte"})


def _as_json(obj: Any) -> Any:
    return obj.to_json() if hasattr(obj, "to_json") else obj


def run_record(
    model: Any,
    *,
    perplexity: Any = None,
    tasks: Mapping[str, Any] | None = None,
    seconds: float = 0.0,
    dtype: str | None = None,
    artifact: str | None = None,
) -> dict[str, Any]:
    """One evaluated model as a JSON-ready dict.

    ``model`` is a :class:`~lsaq.models.identity.ModelInfo` or its JSON (the bulky ``config`` is dropped);
    ``perplexity`` a ``PerplexityResult`` or its JSON; ``tasks`` maps task names to ``TaskResult`` or their JSON;
    ``artifact`` is the artifact directory a quantized run was loaded from (None for a float model).
    """
    info = dict(_as_json(model))
    info.pop("config", None)
    return {
        "model": info,
        "artifact": artifact,
        "dtype": dtype,
        "perplexity": _as_json(perplexity),
        "tasks": {name: _as_json(r) for name, r in (tasks or {}).items()},
        "seconds": float(seconds),
    }


def plan_summary(plan: Plan) -> dict[str, Any]:
    """What a report says about the plan an artifact was built from (bytes are exact, from the memory model)."""
    bd, dev = plan.breakdown, plan.device
    return {
        "id": plan.id,
        "strategy": plan.options.strategy.value,
        "device": {"name": dev.name, "memory_bytes": dev.memory, "reserve_bytes": dev.reserve,
                   "usable_bytes": dev.usable},
        "context": plan.options.context,
        "batch": plan.options.batch,
        "counts": plan.counts,
        "precisions": [p.value for p in plan.precisions],
        "avg_bits": plan.avg_bits,
        "weights_bytes": bd.weights,
        "required_bytes": bd.required,
        "headroom_bytes": plan.headroom,
        "fits": plan.fits,
        "importance": {"id": plan.importance_ref.id, "method": plan.importance_ref.method, "k": plan.importance_ref.k},
    }


def _check_run(run: Mapping[str, Any], role: str) -> None:
    if not isinstance(run, Mapping) or "perplexity" not in run or not isinstance(run.get("tasks"), Mapping):
        raise ValueError(f"{role} run must be a run record with 'perplexity' and 'tasks' (see run_record)")
    ppl = run["perplexity"]
    if ppl is not None and not isinstance(ppl.get("ppl"), (int, float)):
        raise ValueError(f"{role} run: perplexity record has no numeric 'ppl'")


def _metric_values(run: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """key -> {"task", "metric", "value", "stderr", "n", "label", "detail"} for each metric of a run, in order."""
    out: dict[str, dict[str, Any]] = {}
    if (p := run["perplexity"]) is not None:
        source = Path(str(p.get("source", ""))).name or "text"
        out[PPL_METRIC] = {
            "task": None, "metric": PPL_METRIC, "value": float(p["ppl"]), "stderr": None, "n": p.get("tokens"),
            "label": "perplexity", "detail": f"{source}, {p.get('windows')} x {p.get('seq_len')} tokens",
        }
    for name, r in run["tasks"].items():
        metrics, stderr = r["metrics"], r.get("stderr") or {}
        order = [m for m in TASK_METRIC_ORDER if m in metrics] + sorted(set(metrics) - set(TASK_METRIC_ORDER))
        for m in order:
            out[f"{name}.{m}"] = {"task": name, "metric": m, "value": float(metrics[m]), "stderr": stderr.get(m),
                                  "n": r.get("n"), "label": f"{name} {m}", "detail": None}
    return out


def _check_same_material(baseline: Mapping[str, Any], quantized: Mapping[str, Any]) -> None:
    """Refuse to compare runs that scored different text, windows, data or numbers of examples."""
    pb, pq = baseline["perplexity"], quantized["perplexity"]
    if (pb is None) != (pq is None):
        raise ValueError("only one of the runs has a perplexity; evaluate both on the same metrics")
    if pb is not None:
        for key in ("source_hash", "seq_len", "windows", "tokens"):
            if pb.get(key) != pq.get(key):
                raise ValueError(f"baseline and quantized perplexity differ in {key} ({pb.get(key)!r} vs "
                                 f"{pq.get(key)!r}): not the same windows")
    if set(baseline["tasks"]) != set(quantized["tasks"]):
        raise ValueError(f"baseline and quantized runs have different tasks: {sorted(baseline['tasks'])} vs "
                         f"{sorted(quantized['tasks'])}")
    for name, rb in baseline["tasks"].items():
        rq = quantized["tasks"][name]
        for key in ("n", "data_hash"):
            if rb.get(key) != rq.get(key):
                raise ValueError(f"task {name}: baseline and quantized differ in {key} ({rb.get(key)!r} vs "
                                 f"{rq.get(key)!r}): not the same examples")


def compare(baseline: Mapping[str, Any] | None, quantized: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row per metric of ``quantized``, with the baseline's value and the delta (quantized - baseline).

    ``baseline`` None gives rows with null baseline and deltas. ``ValueError`` when the two runs did not score the
    same material or do not have the same metrics.
    """
    _check_run(quantized, "quantized")
    q = _metric_values(quantized)
    b: dict[str, dict[str, Any]] = {}
    if baseline is not None:
        _check_run(baseline, "baseline")
        _check_same_material(baseline, quantized)
        b = _metric_values(baseline)
        if set(b) != set(q):
            raise ValueError(f"baseline and quantized runs report different metrics: {sorted(set(b) ^ set(q))}")
    rows = []
    for key, mq in q.items():
        mb = b.get(key)
        vb, vq = (mb["value"] if mb else None), mq["value"]
        delta = vq - vb if vb is not None else None
        is_ppl = _is_perplexity(mq["metric"])
        rows.append({
            "key": key, "task": mq["task"], "metric": mq["metric"], "label": mq["label"], "detail": mq["detail"],
            "n": mq["n"],
            "higher_is_better": mq["metric"] not in LOWER_IS_BETTER,
            "baseline": vb, "quantized": vq, "delta": delta,
            "delta_pct": 100.0 * delta / vb if is_ppl and delta is not None and vb else None,
            "baseline_stderr": mb["stderr"] if mb else None, "quantized_stderr": mq["stderr"],
        })
    return rows


@dataclass(frozen=True)
class EvalReport:
    """The ``lsaq.eval_report`` record of one artifact (the module docstring gives its JSON layout).

    Runs and comparison rows stay JSON-shaped mappings (:func:`run_record`, :func:`compare`); ``quantized`` None
    means nothing was measured (only the plan was drawn), ``fidelity`` None that the baseline was not evaluated.
    """

    model: ModelRef  # the float model the artifact was made from
    artifact: dict[str, Any]
    plan: dict[str, Any]
    settings: dict[str, Any]
    baseline: dict[str, Any] | None
    quantized: dict[str, Any] | None
    comparison: tuple[dict[str, Any], ...]
    fidelity: FidelityResult | None = None
    seconds: float | None = None
    lsaq_version: str = __version__
    memory: RunMemory | None = field(default=None, compare=False)  # where it ran and its peak memory

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA, "version": VERSION, "lsaq_version": self.lsaq_version,
            "model": self.model.to_json(), "artifact": self.artifact, "plan": self.plan, "settings": self.settings,
            "baseline": self.baseline, "quantized": self.quantized, "comparison": list(self.comparison),
            "fidelity": self.fidelity.to_json() if self.fidelity is not None else None, "seconds": self.seconds,
            "memory": self.memory.to_json() if self.memory is not None else None,
        }

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> "EvalReport":
        fid = obj.get("fidelity")
        return cls(model=ModelRef.from_json(obj["model"]), artifact=dict(obj.get("artifact") or {}), plan=dict(obj["plan"]),
                   settings=dict(obj.get("settings") or {}), baseline=obj.get("baseline"),
                   quantized=obj.get("quantized"), comparison=tuple(obj.get("comparison") or ()),
                   fidelity=FidelityResult.from_json(fid) if fid is not None else None, seconds=obj.get("seconds"),
                   lsaq_version=obj.get("lsaq_version", "?"), memory=RunMemory.from_json(obj.get("memory")))

    @classmethod
    def load(cls, path: str | Path) -> "EvalReport":
        """Read a report written by :func:`write_report` (schema and version checked)."""
        return decode_record(load_report(path), cls.from_json, str(path), "eval report")


@dataclass(frozen=True)
class ModelEval:
    """The ``lsaq.eval`` record of a plain model (not an artifact): one run, no plan, no baseline."""

    model: ModelRef
    dtype: str | None
    perplexity: dict[str, Any] | None  # PerplexityResult as JSON
    tasks: dict[str, dict[str, Any]]  # task name -> TaskResult as JSON
    seconds: float
    lsaq_version: str = __version__
    memory: RunMemory | None = field(default=None, compare=False)  # where it ran and its peak memory

    @classmethod
    def from_run(cls, run: Mapping[str, Any]) -> "ModelEval":
        """From a :func:`run_record` of a float model."""
        return cls(model=ModelRef.from_json(run["model"]), dtype=run.get("dtype"), perplexity=run.get("perplexity"),
                   tasks=dict(run.get("tasks") or {}), seconds=float(run.get("seconds", 0.0)))

    def to_json(self) -> dict[str, Any]:
        return {"schema": PLAIN_SCHEMA, "version": PLAIN_VERSION, "lsaq_version": self.lsaq_version,
                "model": self.model.to_json(), "dtype": self.dtype, "perplexity": self.perplexity, "tasks": self.tasks,
                "seconds": self.seconds, "memory": self.memory.to_json() if self.memory is not None else None}

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> "ModelEval":
        return dataclasses.replace(cls.from_run(obj), lsaq_version=obj.get("lsaq_version", "?"),
                                   memory=RunMemory.from_json(obj.get("memory")))


def build_report(
    quantized: Mapping[str, Any],
    baseline: Mapping[str, Any] | None,
    *,
    plan: Plan,
    artifact: Mapping[str, Any] | None = None,
    settings: Mapping[str, Any] | None = None,
    fidelity: FidelityResult | None = None,
    seconds: float | None = None,
) -> EvalReport:
    """The :class:`EvalReport` of one artifact.

    ``quantized``/``baseline`` are :func:`run_record` dicts (``baseline`` None when skipped); ``plan`` is the
    artifact's plan; ``artifact``, ``settings`` and ``fidelity`` are recorded as given.
    """
    rows = compare(baseline, quantized)
    report = EvalReport(
        model=ModelRef.from_json(quantized["model"]), artifact=dict(artifact or {}), plan=plan_summary(plan),
        settings=dict(settings or {}), baseline=dict(baseline) if baseline is not None else None,
        quantized=dict(quantized), comparison=tuple(rows), fidelity=fidelity, seconds=seconds,
    )
    canonical_json(report.to_json())  # JSON-serializable now, not halfway through a write
    return report


# ------------------------------------------------------------------------------------------- rendering


def _is_perplexity(metric: str) -> bool:
    """Perplexities (WikiText, LAMBADA's, word/byte) get 3 decimals and relative deltas; accuracies 4 and none."""
    return "perplexity" in metric


def _number(v: float, metric: str, sign: str = "") -> str:
    return f"{v:{sign}.3f}" if _is_perplexity(metric) else f"{v:{sign}.4f}"


def _value(v: float | None, metric: str, err: float | None = None) -> str:
    if v is None:
        return "-"
    show_err = err is not None and math.isfinite(err) and not _is_perplexity(metric)
    return _number(v, metric) + (f" ± {err:.4f}" if show_err else "")


def _delta(row: Mapping[str, Any]) -> str:
    if row["delta"] is None:
        return "-"
    return _number(row["delta"], row["metric"], "+") + (
        f" ({row['delta_pct']:+.2f}%)" if row.get("delta_pct") is not None else "")


def metrics_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """The Markdown table ``metric | baseline | quantized | delta`` of :func:`compare` rows."""
    lines = ["| metric | baseline | quantized | delta |", "|---|---:|---:|---:|"]
    for r in rows:
        notes = [x for x in (r.get("detail"), f"n={r['n']}" if r.get("n") is not None else None) if x]
        label = r["label"] + (f" ({', '.join(notes)})" if notes else "")
        lines.append(f"| {label} | {_value(r['baseline'], r['metric'], r.get('baseline_stderr'))} | "
                     f"{_value(r['quantized'], r['metric'], r.get('quantized_stderr'))} | {_delta(r)} |")
    return "\n".join(lines)


def fidelity_table(fid: Mapping[str, Any]) -> str:
    """The fidelity figures as a Markdown line and one-row table (KL in nats, agreement in percent)."""
    source = "text generated by the float model" if fid["source"] == "generated" else Path(str(fid["source"])).name
    return "\n".join([
        f"Fidelity to the float model ({source}, {fid['windows']} x {fid['seq_len']} tokens, "
        f"{fid['positions']} positions; KL(float || quantized) of next-token distributions, nats):",
        "",
        "| KL mean | KL p99 | top-1 agreement |",
        "|---:|---:|---:|",
        f"| {fid['kl_mean']:.4g} | {fid['kl_p99']:.4g} | {100 * fid['top1_agreement']:.2f}% |",
    ])


def _as_report_json(report: "EvalReport | Mapping[str, Any]") -> Mapping[str, Any]:
    return report.to_json() if isinstance(report, EvalReport) else report


def render_markdown(report: "EvalReport | Mapping[str, Any]") -> str:
    """A small header (model, artifact, plan, settings), the metrics table and the fidelity, as Markdown."""
    report = _as_report_json(report)
    m, p, s, art = report["model"], report["plan"], report.get("settings") or {}, report.get("artifact") or {}
    dev, bits, c = p["device"], p["avg_bits"], p["counts"]
    lines = [
        f"# Evaluation of {art.get('path') or 'artifact'}",
        "",
        f"- model: `{m.get('id')}` ({m.get('architecture')}, {m.get('num_layers')} layers, "
        f"content {str(m.get('content_hash'))[:12]})",
        f"- plan `{p['id'][:12]}` ({p['strategy']}) for {dev['name']}: {format_bytes(dev['memory_bytes'])} memory, "
        f"{format_bytes(dev['usable_bytes'])} usable; context {p['context']} x batch {p['batch']}",
        f"- layers fp16/int8/int4: {c.get('fp16', 0)}/{c.get('int8', 0)}/{c.get('int4', 0)}; avg bits "
        f"{bits['quantizable_linears']:.2f} (decoder linears) / {bits['all_weights']:.2f} (all weights)",
        f"- weights {format_bytes(p['weights_bytes'])}, required {format_bytes(p['required_bytes'])}, headroom "
        f"{format_bytes(p['headroom_bytes'])}" + ("" if p["fits"] else " (**does not fit**)"),
        f"- importance: {p['importance'].get('method') or 'none'}"
        + (f" (k={p['importance']['k']})" if p["importance"].get("k") is not None else "")
        + (f", record {str(p['importance']['id'])[:12]}" if p["importance"].get("id") not in (None, "none") else ""),
    ]
    if (gen := art.get("generation")) is not None:  # a GGUF build, run in llama.cpp
        lines.append(f"- GGUF build run in llama.cpp: {format_bytes(gen['peak_rss_bytes'])} resident while generating "
                     f"at context {gen['context']} (plan: {format_bytes(gen['predicted_bytes'])}; usable "
                     f"{format_bytes(gen['usable_bytes'])}), {gen['tokens_per_second']:.1f} tokens/s")
    if s:
        lines.append("- evaluated at " + ", ".join(f"{k} {v}" for k, v in s.items() if v is not None))
    if report.get("quantized") is None:
        return "\n".join(lines + ["", "Nothing was measured (plan only).", ""])
    if report.get("baseline") is None:
        lines.append("- baseline: not evaluated (--no-baseline), so neither deltas nor fidelity")
    lines.append("")
    if report["comparison"]:
        lines += [metrics_table(report["comparison"]), ""]
    if report.get("fidelity") is not None:
        lines += [fidelity_table(report["fidelity"]), ""]
    return "\n".join(lines)


def markdown_path(path: str | Path) -> Path:
    """The sibling Markdown file of a JSON report path: ``report.json`` -> ``report.md``."""
    path = Path(path)
    if path.suffix == ".md":
        raise ValueError(f"{path}: give the JSON path (e.g. report.json); the Markdown goes beside it as .md")
    return path.with_suffix(".md")


def write_report(report: "EvalReport | Mapping[str, Any]", path: str | Path) -> tuple[Path, Path]:
    """Write the report as JSON at ``path`` and as Markdown beside it; return both paths.

    Both are rendered before anything is written, and each file is written atomically, so an error leaves
    neither a half-written file nor, when rendering fails, any file at all.
    """
    report = _as_report_json(report)
    md_path = markdown_path(path)
    json_bytes = (json.dumps(report, indent=2, ensure_ascii=False) + "\n").encode()
    md_bytes = render_markdown(report).encode()
    return atomic_write_bytes(path, json_bytes), atomic_write_bytes(md_path, md_bytes)


def load_report(path: str | Path) -> dict[str, Any]:
    """Read an ``lsaq.eval_report`` record as JSON (schema and version checked); :meth:`EvalReport.load` types it."""
    return read_record(path, SCHEMA, VERSION)


__all__ = [
    "PLAIN_SCHEMA", "SCHEMA", "VERSION", "EvalReport", "ModelEval", "build_report", "compare", "fidelity_table",
    "load_report", "markdown_path", "metrics_table", "plan_summary", "render_markdown", "run_record",
    "write_report",
]
