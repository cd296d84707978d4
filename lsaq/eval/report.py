"""The evaluation report of a quantized artifact: its plan, and its metrics beside the float baseline's.

``lsaq eval DIR`` on an artifact directory evaluates two *runs* over the same metrics, windows and limits: the
float model the plan was made for (the **baseline**) and the artifact on lsaq's packed runtime (**quantized**).
:func:`build_report` turns them into one versioned record (schema ``lsaq.eval_report``, version 1)::

    schema, version, lsaq_version
    model        identity of the model that was quantized (id, source, revision, content hash, architecture, ...)
    artifact     {"path", "plan_id", "tensor_bytes", "files_bytes", "lsaq_version"} (as given by the caller)
    plan         summary of the plan: id, strategy, device (name, memory/reserve/usable bytes), context, batch,
                 counts per precision, per-layer precisions, avg bits, weight/required/headroom bytes, fits,
                 importance {id, method, k}
    settings     what was evaluated and how (dtype, perplexity source and window, tasks, limit, ...)
    baseline     a run record, or null when the baseline was skipped (``--no-baseline``)
    quantized    a run record
    comparison   one row per metric: {"key", "task", "metric", "label", "detail", "n", "higher_is_better",
                 "baseline", "quantized", "delta", "delta_pct", "baseline_stderr", "quantized_stderr"}
    seconds      wall time of the whole evaluation

A run record (:func:`run_record`) is ``{"model", "artifact", "dtype", "perplexity", "tasks", "seconds"}`` with
``perplexity`` a :class:`~lsaq.eval.perplexity.PerplexityResult` as JSON (or null) and ``tasks`` a mapping of
task name to :class:`~lsaq.eval.harness.TaskResult` as JSON: the same shapes as the plain ``lsaq.eval`` record.

Rows: ``perplexity`` (the WikiText-style perplexity; ``n`` = scored tokens), then for each task its ``acc``,
``acc_norm``, ``perplexity`` (LAMBADA) and any other metric the harness gave (``n`` = examples scored). ``delta``
is quantized - baseline; ``delta_pct`` is ``100 * delta / baseline`` for perplexities, null for accuracies.
Both runs must have scored exactly the same material (same perplexity text hash, window length and windows,
same task data and number of examples): a report of two different evaluations is refused.

A model that is not an artifact keeps the plain ``lsaq.eval`` record of :mod:`lsaq.commands.eval` (one run, no
plan, no baseline). :func:`render_markdown` renders this report as a small header and a table
``metric | baseline | quantized | delta``; :func:`write_report` writes ``report.json`` and a sibling ``report.md``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

from lsaq import __version__
from lsaq.planning.planner import Plan
from lsaq.records import atomic_write_bytes, canonical_json, read_record
from lsaq.units import format_bytes

SCHEMA = "lsaq.eval_report"
VERSION = 1
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

    ``model`` is a :class:`~lsaq.models.loading.ModelInfo` or its JSON (the bulky ``config`` is dropped); ``perplexity`` a
    ``PerplexityResult`` or its JSON; ``tasks`` maps task names to ``TaskResult`` or their JSON; ``artifact`` is the
    artifact directory a quantized run was loaded from (None for a float model).
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


def build_report(
    quantized: Mapping[str, Any],
    baseline: Mapping[str, Any] | None,
    *,
    plan: Plan,
    artifact: Mapping[str, Any] | None = None,
    settings: Mapping[str, Any] | None = None,
    seconds: float | None = None,
) -> dict[str, Any]:
    """The ``lsaq.eval_report`` record of one artifact (see the module docstring for its layout).

    ``quantized``/``baseline`` are :func:`run_record` dicts (``baseline`` None when skipped); ``plan`` is the
    artifact's plan; ``artifact`` and ``settings`` are recorded as given.
    """
    rows = compare(baseline, quantized)
    report = {
        "schema": SCHEMA,
        "version": VERSION,
        "lsaq_version": __version__,
        "model": dict(quantized["model"]),
        "artifact": dict(artifact or {}),
        "plan": plan_summary(plan),
        "settings": dict(settings or {}),
        "baseline": dict(baseline) if baseline is not None else None,
        "quantized": dict(quantized),
        "comparison": rows,
        "seconds": seconds,
    }
    canonical_json(report)  # JSON-serializable now, not halfway through a write
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


def render_markdown(report: Mapping[str, Any]) -> str:
    """A small header (model, artifact, plan, settings) and the metrics table, as Markdown."""
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
    if s:
        lines.append("- evaluated at " + ", ".join(f"{k} {v}" for k, v in s.items() if v is not None))
    if report.get("baseline") is None:
        lines.append("- baseline: not evaluated (--no-baseline)")
    lines += ["", metrics_table(report["comparison"]), ""]
    return "\n".join(lines)


def markdown_path(path: str | Path) -> Path:
    """The sibling Markdown file of a JSON report path: ``report.json`` -> ``report.md``."""
    path = Path(path)
    if path.suffix == ".md":
        raise ValueError(f"{path}: give the JSON path (e.g. report.json); the Markdown goes beside it as .md")
    return path.with_suffix(".md")


def write_report(report: Mapping[str, Any], path: str | Path) -> tuple[Path, Path]:
    """Write the report as JSON at ``path`` and as Markdown beside it; return both paths.

    Both are rendered before anything is written, and each file is written atomically, so an error leaves
    neither a half-written file nor, when rendering fails, any file at all.
    """
    md_path = markdown_path(path)
    json_bytes = (json.dumps(report, indent=2, ensure_ascii=False) + "\n").encode()
    md_bytes = render_markdown(report).encode()
    return atomic_write_bytes(path, json_bytes), atomic_write_bytes(md_path, md_bytes)


def load_report(path: str | Path) -> dict[str, Any]:
    """Read an ``lsaq.eval_report`` record (schema and version checked)."""
    return read_record(path, SCHEMA, VERSION)


__all__ = [
    "SCHEMA", "VERSION", "build_report", "compare", "load_report", "markdown_path", "metrics_table",
    "plan_summary", "render_markdown", "run_record", "write_report",
]
