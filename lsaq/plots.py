"""Figures for people: layer importance, a plan's precisions, its memory budget, perplexity against bits.

Every function draws one PNG with matplotlib's Agg canvas (no display, no global pyplot state) and writes it
atomically (temporary file, then rename), returning the path written. matplotlib is imported only when a
figure is drawn, so the rest of lsaq does not need it: ``pip install -c constraints.txt matplotlib==3.11.2``
(or ``pip install 'lsaq[eval]'``). Bad input raises ``ValueError`` before anything is written.
"""

from __future__ import annotations

import io
import math
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from lsaq.precision import Precision
from lsaq.records import atomic_write_bytes
from lsaq.units import format_bytes

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from lsaq.planning.planner import Plan

MATPLOTLIB_HINT = ("plots need matplotlib: pip install -c constraints.txt matplotlib==3.11.2 "
                   "(or pip install 'lsaq[eval]')")
PRECISION_COLORS = {Precision.FP16: "#1b9e77", Precision.INT8: "#7570b3", Precision.INT4: "#d95f02"}
DPI = 120
_SEED_NAME = re.compile(r"^(?P<group>.+)-(?P<seed>\d+)$")


def require_matplotlib() -> None:
    """Raise ``ModuleNotFoundError`` with the install hint when matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as e:
        raise ModuleNotFoundError(MATPLOTLIB_HINT) from e


def _figure(width: float, height: float) -> "Figure":
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _png_path(path: str | Path) -> Path:
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"{path}: plots are written as PNG; give a path ending in .png")
    return path


def _save(fig: "Figure", path: Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return atomic_write_bytes(path, buf.getvalue())


def _finite(values: Sequence[Any], what: str) -> list[float]:
    out = []
    for i, v in enumerate(values):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ValueError(f"{what}[{i}] must be a finite number, got {v!r}")
        out.append(float(v))
    return out


def _layers_width(n: int) -> float:
    """Figure width in inches for ``n`` decoder layers along x: about 0.22 in per layer, 6 to 18 in."""
    return min(18.0, max(6.0, 0.22 * n + 2))


def _unit(n: int) -> tuple[float, str]:
    return (2**30, "GiB") if n >= 2**30 else (2**20, "MiB")


# ----------------------------------------------------------------------------------------------- figures


def plot_importance(series: Mapping[str, Sequence[float]], path: str | Path, *, title: str | None = None) -> Path:
    """Per-layer importance of several methods, e.g. ``{"jaccard": [...], "cosine": [...]}``, on one axis.

    Methods have different scales, so each series is divided by its own largest absolute value (the y label
    says so); x is the decoder layer index. All series must have the same, non-zero number of layers.
    """
    path = _png_path(path)
    if not series:
        raise ValueError("plot_importance needs at least one series")
    data = {str(name): _finite(list(v), f"series {name!r}") for name, v in series.items()}
    lengths = {name: len(v) for name, v in data.items()}
    if min(lengths.values()) == 0 or len(set(lengths.values())) != 1:
        raise ValueError(f"every series needs the same, non-zero number of layers; got {lengths}")
    n = next(iter(lengths.values()))
    fig = _figure(_layers_width(n), 3.6)
    ax = fig.add_subplot()
    for name, values in data.items():
        scale = max(abs(v) for v in values) or 1.0
        ax.plot(range(n), [v / scale for v in values], marker="o", markersize=3, linewidth=1.4, label=name)
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("importance / method's max")
    ax.set_xlim(-0.5, n - 0.5)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    ax.set_title(title or "Layer importance (each method normalized to its own max)", fontsize="medium")
    return _save(fig, path)


def plot_plan_strip(plan: "Plan", path: str | Path) -> Path:
    """The plan as a layer x precision grid (one colored cell per layer), the importance it used above it."""
    path = _png_path(path)
    n, precisions = plan.shape.num_layers, plan.precisions
    levels = list(Precision)
    fig = _figure(_layers_width(n), 3.4)
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=[1.2, 1.0])
    colors = [PRECISION_COLORS[p] for p in precisions]
    top.bar(range(n), plan.importance, color=colors, width=0.8)
    top.set_ylabel("importance", fontsize="small")
    top.grid(True, axis="y", alpha=0.3)
    for i, p in enumerate(precisions):
        row = levels.index(p)
        for r in range(len(levels)):
            bottom.add_patch(_rect(i, r, PRECISION_COLORS[p] if r == row else "#eeeeee"))
    bottom.set_ylim(len(levels) - 0.5, -0.5)
    bottom.set_xlim(-0.5, n - 0.5)
    bottom.set_yticks(range(len(levels)), [p.value for p in levels])
    bottom.set_xlabel("decoder layer")
    if n <= 48:
        bottom.set_xticks(range(n), [str(i) for i in range(n)], fontsize="x-small")
    from matplotlib.patches import Patch

    counts = plan.counts
    bottom.legend(handles=[Patch(color=PRECISION_COLORS[p], label=f"{p.value} ({counts[p.value]})") for p in levels],
                  loc="upper center", bbox_to_anchor=(0.5, -0.35), ncol=3, fontsize="small", frameon=False)
    bits = plan.avg_bits
    fig.suptitle(f"{model_label(plan)} on {plan.device.name}: "
                 f"avg bits {bits['quantizable_linears']:.2f} (linears) / {bits['all_weights']:.2f} (all weights)",
                 fontsize="medium")
    return _save(fig, path)


def model_label(plan: "Plan") -> str:
    """A short name for the plan's model: a local path's file or folder name, else the recorded id."""
    name = plan.model.name
    return Path(name).name if name.startswith(("/", ".", "~")) or name.endswith(".gguf") else name


def _rect(x: int, y: int, color: str) -> Any:
    from matplotlib.patches import Rectangle

    return Rectangle((x - 0.45, y - 0.45), 0.9, 0.9, facecolor=color, edgecolor="white")


MEMORY_PARTS = ("decoder linears", "norms", "embeddings", "lm_head", "kv cache", "workspace", "reserve")


def memory_parts(plan: "Plan") -> dict[str, int]:
    """The plan's bytes per component, in the order :func:`plot_memory` stacks them (sums to ``total``)."""
    bd = plan.breakdown
    return dict(zip(MEMORY_PARTS, (bd.layer_linears, bd.layer_norms + bd.final_norm, bd.embeddings, bd.lm_head,
                                   bd.kv_cache, bd.workspace, bd.reserve)))


def plot_memory(plan: "Plan", path: str | Path) -> Path:
    """A stacked bar of the plan's memory (weights by part, KV cache, workspace, reserve) against the device.

    Horizontal lines mark the device's total memory and what is usable (memory - reserve); the bar's top
    without the reserve is what the plan requires.
    """
    path = _png_path(path)
    parts, dev = memory_parts(plan), plan.device
    scale, unit = _unit(max(sum(parts.values()), dev.memory))
    fig = _figure(5.6, 4.4)
    ax = fig.add_subplot()
    cmap = ["#1b9e77", "#66a61e", "#7570b3", "#e7298a", "#d95f02", "#e6ab02", "#999999"]
    bottom = 0.0
    for (name, n), color in zip(parts.items(), cmap):
        if n == 0:
            continue
        ax.bar([0], [n / scale], bottom=bottom, width=0.5, color=color, label=f"{name}: {format_bytes(n)}")
        bottom += n / scale
    ax.axhline(dev.memory / scale, color="black", linewidth=1.2, label=f"device memory: {format_bytes(dev.memory)}")
    ax.axhline(dev.usable / scale, color="black", linestyle="--", linewidth=1.0,
               label=f"usable: {format_bytes(dev.usable)}")
    ax.set_xlim(-0.6, 1.9)
    ax.set_xticks([0], [f"plan {plan.id[:8]}"])
    ax.set_ylabel(unit)
    ax.set_ylim(0, max(bottom, dev.memory / scale) * 1.08)
    ax.legend(fontsize="x-small", loc="upper right")
    headroom = plan.headroom
    ax.set_title(f"{dev.name}: requires {format_bytes(plan.breakdown.required)}, "
                 + (f"headroom {format_bytes(headroom)}" if headroom >= 0 else f"{format_bytes(-headroom)} short"),
                 fontsize="medium")
    return _save(fig, path)


def method_groups(methods: Sequence[str]) -> dict[str, list[str]]:
    """Group seeded variants: ``random-0``, ``random-1``, ... -> ``{"random-*": ["random-0", "random-1"]}``.

    Two or more names ``NAME-<digits>`` with the same NAME make a group ``NAME-*``; every other name (a lone
    ``int4-0`` included) is its own group. Groups keep the order of first appearance.
    """
    unique = list(dict.fromkeys(methods))
    seeded: dict[str, list[str]] = {}
    for m in unique:
        if match := _SEED_NAME.match(m):
            seeded.setdefault(match["group"], []).append(m)
    groups: dict[str, list[str]] = {}
    for m in unique:
        match = _SEED_NAME.match(m)
        if match and len(seeded[match["group"]]) >= 2:
            groups.setdefault(f"{match['group']}-*", seeded[match["group"]])
        else:
            groups[m] = [m]
    return groups


def plot_ppl_vs_bits(
    rows: Sequence[Mapping[str, Any]],
    path: str | Path,
    *,
    title: str | None = None,
    baseline_ppl: float | None = None,
    key: str = "ppl",
    ylabel: str = "perplexity",
) -> Path:
    """Perplexity (or another positive statistic: ``key``, named ``ylabel``) against average bits, one line with
    markers per method (sorted by bits), log-scale y.

    ``rows`` have ``"method"`` (str), ``"avg_bits"`` and ``key`` (finite, > 0). Methods named
    ``NAME-0``, ``NAME-1``, ... (e.g. seeds of a random baseline) form one group: faint lines for each member
    and, when the members have the same number of points, their mean (by rank of bits) with a min-max band.
    ``baseline_ppl`` draws a horizontal line for the float model.
    """
    path = _png_path(path)
    if not rows:
        raise ValueError("plot_ppl_vs_bits needs at least one row")
    points: dict[str, list[tuple[float, float]]] = {}
    for i, r in enumerate(rows):
        missing = [k for k in ("method", "avg_bits", key) if k not in r]
        if missing:
            raise ValueError(f"row {i} lacks {', '.join(missing)} (rows need method, avg_bits, {key})")
        if not isinstance(r["method"], str) or not r["method"]:
            raise ValueError(f"row {i}: method must be a non-empty string, got {r['method']!r}")
        bits, ppl = _finite([r["avg_bits"], r[key]], f"row {i} (avg_bits, {key})")
        if ppl <= 0:
            raise ValueError(f"row {i}: {key} must be positive for a log scale, got {ppl}")
        points.setdefault(r["method"], []).append((bits, ppl))
    if baseline_ppl is not None:
        (baseline_ppl,) = _finite([baseline_ppl], "baseline_ppl")
        if baseline_ppl <= 0:
            raise ValueError(f"baseline_ppl must be positive, got {baseline_ppl}")
    for pts in points.values():
        pts.sort()
    fig = _figure(6.4, 4.2)
    ax = fig.add_subplot()
    colors = [f"C{i % 10}" for i in range(len(points))]
    for (name, members), color in zip(method_groups(list(points)).items(), colors):
        if len(members) == 1:
            xs, ys = zip(*points[members[0]])
            ax.plot(xs, ys, marker="o", markersize=4, color=color, label=name)
            continue
        for m in members:
            xs, ys = zip(*points[m])
            ax.plot(xs, ys, marker=".", markersize=3, linewidth=0.8, alpha=0.3, color=color)
        sizes = {len(points[m]) for m in members}
        if len(sizes) == 1:
            k = sizes.pop()
            xs = [sum(points[m][j][0] for m in members) / len(members) for j in range(k)]
            ys = [[points[m][j][1] for m in members] for j in range(k)]
            ax.fill_between(xs, [min(y) for y in ys], [max(y) for y in ys], color=color, alpha=0.15, linewidth=0)
            ax.plot(xs, [sum(y) / len(y) for y in ys], marker="o", markersize=4, color=color,
                    label=f"{name} (mean of {len(members)}, min-max band)")
        else:
            ax.plot([], [], color=color, alpha=0.5, label=f"{name} ({len(members)} runs)")
    if baseline_ppl is not None:
        ax.axhline(baseline_ppl, color="black", linestyle="--", linewidth=1.0,
                   label=f"float baseline ({baseline_ppl:.2f})")
    ax.set_yscale("log")
    from matplotlib.ticker import LogFormatter

    ax.yaxis.set_major_formatter(LogFormatter())  # 20, 30 rather than 2 x 10^1, as many labels as the default
    ax.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.4)))
    ax.set_xlabel("average bits per weight")
    ax.set_ylabel(f"{ylabel} (log scale)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small")
    ax.set_title(title or f"{ylabel[:1].upper() + ylabel[1:]} vs average bits", fontsize="medium")
    return _save(fig, path)


__all__ = [
    "MATPLOTLIB_HINT", "MEMORY_PARTS", "memory_parts", "method_groups", "model_label", "plot_importance", "plot_memory",
    "plot_plan_strip", "plot_ppl_vs_bits", "require_matplotlib",
]
