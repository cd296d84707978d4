"""Per-device plans: the precision of each decoder layer such that the model fits a device, as a versioned record.

Everything outside the decoder layers' linear weights is a fixed cost: embedding, LM head, all norms, KV cache,
workspace (:mod:`lsaq.planning.memory`). A plan chooses one allowed precision per layer within
``capacity = (memory - reserve) - fixed`` bytes, with a strategy: ``lsaq`` (the paper's demotion rule),
``optimal`` (exact importance-weighted knapsack) or a uniform baseline ``fp16``/``int8``/``int4``; see
:mod:`lsaq.planning.solvers` for both algorithms and the objective.

The :class:`Plan` record (schema ``lsaq.plan``, version 1) carries what the quantize stage needs: model identity,
importance reference, device, options, the per-layer linear shapes, per-layer precisions, bytes per component.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

from lsaq.version import __version__
from lsaq.choices import Choice
from lsaq.methods import UNIFORM_IMPORTANCE, ImportanceRef, ranking
from lsaq.models.identity import ModelRef
from lsaq.models.shapes import ModelShape
from lsaq.planning.devices import DeviceProfile, load_catalog
from lsaq.planning.ggml import (GgufFormats, Int4Format, Int8Format, gguf_average_bits, gguf_breakdown, layer_bytes,
                                runtime_bytes)
from lsaq.planning.memory import (
    FP16_BYTES,
    MemoryBreakdown,
    WeightPolicy,
    average_bits,
    check_group_divides,
    embedding_bytes,
    kv_cache_bytes,
    layer_linear_bytes,
    layer_norm_bytes,
    memory_breakdown,
    workspace_bytes,
)
from lsaq.planning.solvers import (
    LayerLosses,
    SolverInfo,
    default_quality,
    lsaq_assign,
    min_loss_assign,
    objective,
    optimal_assign,
    precision_levels,
    predicted_loss,
)
from lsaq.precision import Precision
from lsaq.planning.vllm import check_vllm_policy
from lsaq.runtime import Runtime
from lsaq.records import atomic_write_json, canonical_json, decode_record, read_record, sha256_hex
from lsaq.units import format_bytes

SCHEMA = "lsaq.plan"
VERSION = 1
OBJECTIVE = "sum_i importance_i * q(precision_i); q(fp16)=1, q(int8)=1-2^-4, q(int4)=0 (see lsaq.planning.solvers)"


class Strategy(Choice):
    LSAQ = "lsaq"
    OPTIMAL = "optimal"
    MEASURED = "measured"  # minimise the summed measured per-layer loss (lsaq.importance.cost), exactly
    FP16 = "fp16"
    INT8 = "int8"
    INT4 = "int4"

    @classmethod
    def noun(cls) -> tuple[str, str]:
        return "strategy", "strategies"

    @property
    def uniform(self) -> Precision | None:
        """The precision of a uniform baseline, else None."""
        return Precision(self.value) if self.value in {p.value for p in Precision} else None


class InfeasiblePlanError(ValueError):
    """Even the cheapest allowed assignment does not fit; carries the bytes needed and available."""

    def __init__(self, message: str, min_required: int, available: int):
        super().__init__(message)
        self.min_required, self.available = min_required, available


@dataclass(frozen=True)
class PlanOptions:
    """Everything besides model, importance and device that decides a plan."""

    context: int = 4096
    batch: int = 1
    strategy: Strategy = Strategy.LSAQ
    allowed: tuple[Precision, ...] = tuple(Precision)
    policy: WeightPolicy = field(default_factory=WeightPolicy)
    kv_bytes: int = FP16_BYTES  # bytes per cached K/V value
    quality: Mapping[Precision, float] = field(default_factory=default_quality)
    runtime: Runtime | None = None  # what runs the build (its format, byte and memory model); None: the device's
    gguf_int4: Int4Format = Int4Format.Q4_K  # how a GGUF build stores INT4 (runtime llama.cpp only)
    gguf_int8: Int8Format = Int8Format.Q8_0  # how a GGUF build stores INT8 (runtime llama.cpp only)

    def __post_init__(self) -> None:
        object.__setattr__(self, "strategy", Strategy.parse(self.strategy))
        object.__setattr__(self, "runtime", None if self.runtime is None else Runtime.parse(self.runtime))
        object.__setattr__(self, "gguf_int4", Int4Format.parse(self.gguf_int4))
        object.__setattr__(self, "gguf_int8", Int8Format.parse(self.gguf_int8))
        object.__setattr__(self, "allowed", tuple(precision_levels(self.allowed)))
        for name in ("context", "batch", "kv_bytes"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        q = {Precision.parse(k): float(v) for k, v in self.quality.items()}
        levels = list(Precision)
        if set(q) != set(levels) or any(q[a] < q[b] for a, b in zip(levels, levels[1:])):
            raise ValueError(f"quality weights need a value per precision, non-increasing from fp16 to int4; got {q}")
        object.__setattr__(self, "quality", q)

    def with_policy(self, policy: WeightPolicy) -> "PlanOptions":
        return replace(self, policy=policy)

    @property
    def gguf(self) -> bool:
        """Whether the build is a GGUF file (runtime llama.cpp)."""
        return self.runtime is not None and self.runtime.gguf

    def for_device(self, device: DeviceProfile) -> "PlanOptions":
        """These options with the runtime resolved: the one asked for, else the device's."""
        return self if self.runtime is not None else replace(self, runtime=device.runs)

    @property
    def gguf_formats(self) -> GgufFormats:
        """The GGUF types whose bytes a llama.cpp plan counts (F16 and BF16 take the same bytes)."""
        return GgufFormats(int4=self.gguf_int4, int8=self.gguf_int8)

    def to_json(self) -> dict[str, Any]:
        obj: dict[str, Any] = {
            "context": self.context,
            "batch": self.batch,
            "strategy": self.strategy.value,
            "allowed": [p.value for p in self.allowed],
            **self.policy.to_json(),
            "kv_bytes_per_value": self.kv_bytes,
            "quality": {p.value: v for p, v in self.quality.items()},
        }
        if self.runtime not in (None, Runtime.TRANSFORMERS):  # plans for transformers keep their shape and id
            obj["runtime"] = self.runtime.value
            if self.gguf:
                obj["gguf_int4"] = self.gguf_int4.value
                if self.gguf_int8 is not Int8Format.Q8_0:  # plans made before it existed keep their ids
                    obj["gguf_int8"] = self.gguf_int8.value
        return obj

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> "PlanOptions":
        return cls(
            context=obj["context"], batch=obj["batch"], strategy=obj["strategy"],
            allowed=tuple(Precision.parse(p) for p in obj["allowed"]), policy=WeightPolicy.from_json(obj),
            kv_bytes=obj["kv_bytes_per_value"], quality={Precision.parse(k): v for k, v in obj["quality"].items()},
            runtime=obj.get("runtime", Runtime.TRANSFORMERS.value), gguf_int4=obj.get("gguf_int4", "q4_k"),
            gguf_int8=obj.get("gguf_int8", "q8_0"),
        )


@dataclass(frozen=True)
class Budget:
    """The fixed bytes of one (model, options), and one decoder layer's linears at each precision."""

    fixed: int  # embedding, head, all norms, KV cache, workspace
    layer_costs: dict[Precision, int]

    def capacity(self, usable: int) -> int:
        return usable - self.fixed

    def min_required(self, levels: Sequence[Precision], num_layers: int) -> int:
        """Fewest bytes any plan over ``levels`` needs (weights + KV + workspace, no reserve)."""
        return self.fixed + num_layers * min(self.layer_costs[p] for p in levels)


def breakdown_for(shape: ModelShape, precisions: Sequence[Precision], options: PlanOptions,
                  reserve: int = 0) -> MemoryBreakdown:
    """The bytes of ``shape`` at ``precisions`` in the format and at run time of ``options.runtime``."""
    o = options
    if o.gguf:
        return gguf_breakdown(shape, precisions, o.policy, o.gguf_formats, context=o.context, batch=o.batch,
                              reserve=reserve, kv_bytes=o.kv_bytes)
    return memory_breakdown(shape, precisions, o.policy, context=o.context, batch=o.batch, reserve=reserve,
                            kv_bytes=o.kv_bytes)


def workspace_for(shape: ModelShape, options: PlanOptions, context: int) -> int:
    """Run-time bytes besides weights and KV cache at ``context``: the runtime's workspace (and own overhead)."""
    if options.gguf:
        return runtime_bytes(shape, context, options.batch)
    return workspace_bytes(shape, context, options.batch)


def budget_for(shape: ModelShape, options: PlanOptions) -> Budget:
    if options.gguf:
        bd = breakdown_for(shape, [Precision.INT4] * shape.num_layers, options)
        return Budget(bd.required - bd.layer_linears,
                      {p: layer_bytes(shape, p, options.gguf_formats) for p in Precision})
    embed, head = embedding_bytes(shape, options.policy)
    fixed = (
        embed + head + shape.num_layers * layer_norm_bytes(shape) + sum(t.numel * FP16_BYTES for t in shape.final_norms)
        + kv_cache_bytes(shape, options.context, options.batch, options.kv_bytes)
        + workspace_bytes(shape, options.context, options.batch)
    )
    return Budget(fixed, {p: layer_linear_bytes(shape, p, options.policy.group_size) for p in Precision})


def check_importance(importance: Sequence[float], num_layers: int) -> None:
    if len(importance) != num_layers:
        raise ValueError(f"importance has {len(importance)} values but the model has {num_layers} decoder layers")
    for i, w in enumerate(importance):
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not (0 <= w < float("inf")):
            raise ValueError(f"importance of layer {i} must be a finite, non-negative number, got {w!r}")


def assign_precisions(
    shape: ModelShape, importance: Sequence[float], usable: int, options: PlanOptions,
    loss: LayerLosses | None = None,
) -> tuple[list[Precision] | None, SolverInfo]:
    """Run ``options.strategy`` for ``usable`` bytes; the assignment is ``None`` when nothing fits. The
    ``measured`` strategy needs ``loss``: per layer, the measured loss of each precision."""
    check_importance(importance, shape.num_layers)
    b = budget_for(shape, options)
    costs, cap, s = [b.layer_costs] * shape.num_layers, b.capacity(usable), options.strategy
    if s is Strategy.MEASURED:
        if loss is None:
            raise ValueError("strategy 'measured' needs a measured layer-loss table (lsaq measure; loss=...)")
        if len(loss) != shape.num_layers:
            raise ValueError(f"the layer-loss table has {len(loss)} layers but the model has {shape.num_layers}")
        return min_loss_assign(loss, costs, cap, options.allowed)
    if s.uniform is not None:
        fits = shape.num_layers * b.layer_costs[s.uniform] <= cap
        return ([s.uniform] * shape.num_layers if fits else None), SolverInfo("uniform")
    if s is Strategy.LSAQ:
        return lsaq_assign(importance, costs, cap, options.allowed), SolverInfo("rule")
    return optimal_assign(importance, costs, cap, options.allowed, options.quality)


def infeasible_error(shape: ModelShape, options: PlanOptions, device: DeviceProfile, model_name: str) -> InfeasiblePlanError:
    """The error for a plan that cannot fit: minimum needed, what is usable, and what would help."""
    levels = [options.strategy.uniform] if options.strategy.uniform else list(options.allowed)
    b, usable = budget_for(shape, options), device.usable
    need = b.min_required(levels, shape.num_layers)
    kv = kv_cache_bytes(shape, options.context, options.batch, options.kv_bytes)
    ws = workspace_for(shape, options, options.context)

    def runtime(ctx: int) -> int:  # KV cache + workspace: growing with the context length
        return kv_cache_bytes(shape, ctx, options.batch, options.kv_bytes) + workspace_for(shape, options, ctx)

    weights, low, high = need - kv - ws, 0, options.context - 1
    while low < high:  # the longest context below the asked one that fits (0: none)
        mid = (low + high + 1) // 2
        low, high = (mid, high) if weights + runtime(mid) <= usable else (low, mid - 1)
    max_ctx = low
    hints = [f"a shorter context (--context {max_ctx} fits)" if max_ctx >= 1 else "a shorter context alone will not do"]
    if options.batch > 1:
        hints.append(f"a smaller batch (KV cache and workspace grow with --batch {options.batch})")
    for p in list(Precision)[list(Precision).index(options.policy.embed) + 1:]:
        alt = options.with_policy(WeightPolicy(options.policy.group_size, p, None))
        saved = need - budget_for(shape, alt).min_required(levels, shape.num_layers)
        if saved > 0:
            hints.append(f"--embed-precision {p.value} (saves {format_bytes(saved)})")
    if options.strategy.uniform is not None:
        hints.append("a mixed-precision strategy (--strategy lsaq or optimal)")
    elif Precision.INT4 not in levels:
        hints.append("allowing int4 (--allowed)")
    larger = sorted((d for d in load_catalog() if d.usable >= need), key=lambda d: d.usable)[:3]
    hints.append(f"a device with at least {format_bytes(need)} usable" + (f" (e.g. {', '.join(d.name for d in larger)})" if larger else ""))
    return InfeasiblePlanError(
        f"{model_name} does not fit {device.name}: it needs at least {format_bytes(need)} ({need:,} bytes: every layer "
        f"{levels[-1].value}, embeddings {options.policy.embed.value}, KV cache {format_bytes(kv)} at context "
        f"{options.context} x batch {options.batch}, workspace {format_bytes(ws)}) but only {format_bytes(usable)} "
        f"({usable:,} bytes) is usable ({device.describe()}). What would help: " + "; ".join(hints),
        need, usable,
    )


@dataclass(frozen=True)
class Plan:
    """One model on one device: per-layer precisions and the bytes that follow from them."""

    model: ModelRef
    importance_ref: ImportanceRef
    importance: tuple[float, ...]
    device: DeviceProfile
    options: PlanOptions
    shape: ModelShape
    precisions: tuple[Precision, ...]
    solver: SolverInfo = field(default_factory=lambda: SolverInfo("rule"))
    lsaq_version: str = __version__
    loss: tuple[Mapping[Precision, float], ...] | None = None  # measured per-layer loss (strategy 'measured')
    loss_id: str | None = None  # the layer-loss record it came from

    @property
    def breakdown(self) -> MemoryBreakdown:
        return breakdown_for(self.shape, self.precisions, self.options, self.device.reserve)

    @property
    def headroom(self) -> int:
        """Usable bytes left over; negative when the plan does not fit."""
        return self.device.usable - self.breakdown.required

    @property
    def fits(self) -> bool:
        return self.headroom >= 0

    @property
    def avg_bits(self) -> dict[str, float]:
        o = self.options
        if o.gguf:
            return gguf_average_bits(self.shape, self.precisions, o.policy, o.gguf_formats)
        return average_bits(self.shape, self.precisions, o.policy)

    @property
    def objective(self) -> float:
        return float(objective(self.importance, self.precisions, self.options.quality))

    @property
    def predicted_loss(self) -> float | None:
        """The summed measured loss of the chosen precisions (plans made from a layer-loss table)."""
        return None if self.loss is None else predicted_loss(self.loss, self.precisions)

    @property
    def counts(self) -> dict[str, int]:
        return {p.value: sum(1 for x in self.precisions if x is p) for p in Precision}

    @property
    def mix(self) -> str:
        """Decoder layers per precision as text, e.g. ``7 fp16, 23 int8`` (precisions no layer has are left out)."""
        return ", ".join(f"{n} {p}" for p, n in self.counts.items() if n)

    @property
    def id(self) -> str:
        """Content hash of what the plan decides and from what (not the lsaq version)."""
        j = self.to_json(with_id=False)
        keys = ("model", "importance", "device", "options", "shape", "precisions") + (("loss",) if "loss" in j else ())
        return sha256_hex(canonical_json({k: j[k] for k in keys}))

    def to_json(self, with_id: bool = True) -> dict[str, Any]:
        bd, total_w = self.breakdown, sum(self.importance)
        rank = {layer: r for r, layer in enumerate(ranking(self.importance), 1)}
        obj: dict[str, Any] = {
            "schema": SCHEMA,
            "version": VERSION,
            "lsaq_version": self.lsaq_version,
            "model": self.model.to_json(),
            "importance": {**self.importance_ref.to_json(), "values": list(self.importance)},
            "device": self.device.to_json(),
            "options": self.options.to_json(),
            "shape": self.shape.to_json(),
            "precisions": [p.value for p in self.precisions],
            "layers": [
                {"index": i, "precision": p.value, "importance": w, "rank": rank[i], "bytes": n}
                for i, (p, w, n) in enumerate(zip(self.precisions, self.importance, bd.layers))
            ],
            "counts": self.counts,
            "bytes": bd.to_json(),
            "budget": {"memory": self.device.memory, "reserve": self.device.reserve, "usable": self.device.usable,
                       "required": bd.required, "headroom": self.headroom, "fits": self.fits},
            "avg_bits": self.avg_bits,
            "objective": {"definition": OBJECTIVE, "value": self.objective, "max": total_w,
                          "normalized": self.objective / total_w if total_w else 1.0, "solver": self.solver.to_json()},
        }
        if self.loss is not None:  # only plans from a layer-loss table: other plans keep their shape and id
            obj["loss"] = {"id": self.loss_id, "predicted": self.predicted_loss,
                           "values": [{p.value: float(v) for p, v in row.items()} for row in self.loss]}
        if with_id:
            obj = {"schema": SCHEMA, "version": VERSION, "id": self.id, **obj}
        return obj

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> "Plan":
        imp = obj["importance"]
        s = obj["objective"]["solver"]
        plan = cls(
            model=ModelRef.from_json(obj["model"]),
            importance_ref=ImportanceRef.from_json(imp),
            importance=tuple(float(x) for x in imp["values"]),
            device=DeviceProfile.from_json(obj["device"]),
            options=PlanOptions.from_json(obj["options"]),
            shape=ModelShape.from_json(obj["shape"]),
            precisions=tuple(Precision.parse(p) for p in obj["precisions"]),
            solver=SolverInfo(s["method"], s.get("frontier", 0), s.get("upper_bound"), list(s.get("notes", [])),
                              s.get("lower_bound")),
            lsaq_version=obj.get("lsaq_version", "?"),
            loss=None if "loss" not in obj else tuple(
                {Precision.parse(k): float(v) for k, v in row.items()} for row in obj["loss"]["values"]),
            loss_id=obj["loss"]["id"] if "loss" in obj else None,
        )
        if len(plan.precisions) != plan.shape.num_layers:
            raise ValueError(f"{len(plan.precisions)} precisions for {plan.shape.num_layers} layers")
        if plan.breakdown.to_json() != obj["bytes"]:
            raise ValueError("stored bytes differ from the memory model's (edited, or written by another lsaq version)")
        return plan

    def save(self, path: str | Path) -> Path:
        return atomic_write_json(path, self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> "Plan":
        return decode_record(read_record(path, SCHEMA, VERSION), cls.from_json, str(path), "plan record")


def make_plan(
    shape: ModelShape,
    importance: Sequence[float],
    device: DeviceProfile,
    options: PlanOptions | None = None,
    *,
    model: ModelRef | None = None,
    importance_ref: ImportanceRef | None = None,
    loss: LayerLosses | None = None,
    loss_id: str | None = None,
) -> Plan:
    """Plan ``shape`` for ``device``; :class:`InfeasiblePlanError` (a ``ValueError``) when nothing fits.

    ``loss`` (per layer ``{precision: measured loss}``, :meth:`lsaq.importance.cost.LayerLoss.table`) is what the
    ``measured`` strategy minimises; the plan records it and the predicted total."""
    options = (options or PlanOptions()).for_device(device)
    if model is None:
        model = ModelRef(id=None, model_type=shape.model_type, num_layers=shape.num_layers)
    elif (model.model_type, model.num_layers) != (shape.model_type, shape.num_layers):
        raise ValueError(f"model {model.name!r} is a {model.num_layers}-layer {model.model_type}, but the shapes to plan "
                         f"are a {shape.num_layers}-layer {shape.model_type}")
    if not options.gguf:  # GGUF types have their own blocks (lsaq.planning.ggml)
        check_group_divides(shape, options.policy.group_size)
    if options.runtime is Runtime.VLLM:
        check_vllm_policy(options.policy)
    assign, info = assign_precisions(shape, importance, device.usable, options, loss)
    if assign is None:
        raise infeasible_error(shape, options, device, model.name)
    return Plan(
        model=model,
        importance_ref=importance_ref or UNIFORM_IMPORTANCE,
        importance=tuple(float(w) for w in importance),
        device=device,
        options=options,
        shape=shape,
        precisions=tuple(assign),
        solver=info,
        loss=None if loss is None else tuple({Precision.parse(p): float(v) for p, v in row.items()} for row in loss),
        loss_id=loss_id,
    )
