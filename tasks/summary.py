"""A run's outcome per device, as a record, a Prefect table artifact and a printed table."""

from __future__ import annotations

from typing import Sequence

from prefect.artifacts import create_table_artifact
from prefect.futures import PrefectFuture

from lsaq.resources import RunMemory
from lsaq.units import format_bytes
from tasks.records import CalibrationResult, DeviceOutcome, ImportanceResult, ModelKey, RunSummary
from tasks.stages import artifact_key

STAGES = ("plan", "quantize", "evaluate", "publish")  # the per-device chain, in order


class BuildFailed(RuntimeError):
    """Some devices were not built; ``summary`` holds every device's outcome (the others are published)."""

    def __init__(self, summary: RunSummary) -> None:
        self.summary = summary
        lines = [f"{o.device}: {o.stage} {o.state.lower()}: {o.message}" for o in summary.failed]
        built = [o.device for o in summary.outcomes if o.build is not None]
        super().__init__(f"{len(summary.failed)} of {len(summary.outcomes)} device builds failed"
                         f"{' (built: ' + ', '.join(built) + ')' if built else ''}:\n" + "\n".join(lines))


def outcome(device: str, chain: Sequence[PrefectFuture]) -> DeviceOutcome:
    """The outcome of one device's chain of futures (plan, quantize, evaluate, publish), all finished."""
    for stage, future in zip(STAGES, chain):
        state = future.state
        if not state.is_completed():  # the first stage that did not complete says why
            error = state.result(raise_on_failure=False) if state.is_failed() else None
            return DeviceOutcome(device, state.name, stage=stage, message=str(error) if error else state.message)
    names = {f.state.name for f in chain}
    return DeviceOutcome(device, "Cached" if names == {"Cached"} else "Completed", build=chain[-1].result())


def summarize(model: ModelKey, importance: ImportanceResult | None, store: str,
              outcomes: Sequence[DeviceOutcome], calibration: CalibrationResult | None = None) -> RunSummary:
    """The run's :class:`RunSummary`, also shown in Prefect as a table (one row per device)."""
    summary = RunSummary(model=model.slug, revision=model.revision_slug, store=store,
                         importance=importance.uri if importance else "", outcomes=tuple(outcomes),
                         importance_memory=importance.memory if importance else None,
                         calibration_memory=calibration.memory if calibration else None)
    create_table_artifact(key=artifact_key(f"{model.slug}-builds"), table=rows(summary),
                          description=f"builds of {model.id} ({model.revision_slug}) in {store}")
    return summary


def rows(summary: RunSummary) -> list[dict[str, str]]:
    """One row per device: state, average bits, the weights' bytes (what the plan fits), every file's bytes
    (weights, tokenizer, config, plan, report), memory needed (weights + KV cache + workspace) of usable, what a
    GGUF build took generating in llama.cpp, fidelity, the most memory its stages held on the build machine, where
    the build is."""
    out = []
    for o in summary.outcomes:
        b = o.build
        fid = (b.fidelity or {}) if b else {}
        out.append({
            "device": o.device,
            "state": (o.state + (f" in {o.flow_run}" if o.flow_run else "")) if b else f"{o.state} at {o.stage}",
            "avg bits": f"{b.avg_bits['quantizable_linears']:.2f}" if b else "-",
            "weights": format_bytes(b.weights_bytes) if b else "-",
            "files": format_bytes(b.file_bytes) if b else "-",
            "needs / usable": f"{format_bytes(b.required_bytes)} / {format_bytes(b.usable_bytes)}" if b else "-",
            # a GGUF build's peak resident memory while generating in llama.cpp (its evaluation measures it)
            "runs in": format_bytes(b.generation["peak_rss_bytes"]) if b and b.generation else "-",
            "KL": f"{fid['kl_mean']:.4f}" if "kl_mean" in fid else "-",
            "top-1": f"{fid['top1_agreement']:.3f}" if "top1_agreement" in fid else "-",
            "peak memory": peak_memory(b.memory) if b else "-",
            "build": b.uri if b else (o.message or "").splitlines()[0][:160],
        })
    return out


def peak_memory(memory: dict[str, dict]) -> str:
    """The most host (and GPU) memory a build's stages held: ``2.50 GiB`` or ``2.50 GiB + GPU 3.10 GiB``; ``-``
    where no stage ran here (every one cached or made elsewhere)."""
    runs = [RunMemory.from_json(m) for m in memory.values()]
    host = [r.peak_host_bytes for r in runs if r is not None and r.peak_host_bytes is not None]
    gpu = [r.peak_device_bytes for r in runs if r is not None and r.peak_device_bytes is not None]
    if not host and not gpu:
        return "-"
    text = format_bytes(max(host)) if host else "?"
    return text + (f" + GPU {format_bytes(max(gpu))}" if gpu else "")


def format_table(summary: RunSummary) -> str:
    """The rows as a Markdown table (printed by ``lsaq-build``)."""
    table = rows(summary)
    if not table:
        return "(no devices)"
    heads = list(table[0])
    widths = [max(len(h), *(len(r[h]) for r in table)) for h in heads]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(heads), line(["-" * w for w in widths]), *(line([r[h] for h in heads]) for r in table)])
