"""The plan stage: resolve the target device, read the importance and the model's shapes, decide per-layer precisions.

Two public functions, both free of weights and of torch:

* :func:`resolve_device` turns a :class:`DeviceRequest` (a catalog or device-file profile, ``local`` measured live
  with an optional wait for free memory, or an explicit budget) into a :class:`DeviceProfile`.
* :func:`plan` turns an importance record (or a bare vector, or nothing: uniform) plus a model config (the record's
  own, a shipped name, a ``config.json``) and a device into a :class:`Plan`, written atomically when ``out`` is given.

:func:`compare_strategies` runs every strategy on the same inputs, fitting or not (``lsaq plan --compare``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from lsaq.importance.cost import LayerLoss
from lsaq.importance.record import LayerImportance
from lsaq.methods import UNIFORM_IMPORTANCE, ImportanceRef
from lsaq.models.configs import load_config
from lsaq.models.families import model_shape
from lsaq.models.identity import ModelInfo, ModelRef
from lsaq.models.shapes import ModelShape
from lsaq.planning.detect import detect_local, wait_for_memory
from lsaq.planning.devices import LOCAL, DeviceProfile, budget_profile, list_devices
from lsaq.planning.memory import fitting_group_size
from lsaq.precision import AUTO_GROUP, parse_group_size
from lsaq.planning.planner import InfeasiblePlanError, Plan, PlanOptions, Strategy, budget_for, make_plan
from lsaq.precision import Precision
from lsaq.records import canonical_json, sha256_hex

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DeviceRequest:
    """Which device to plan for: a profile ``name`` (catalog, ``device_file`` or ``local``) or a ``budget``.

    ``wait_seconds`` (``local`` only): poll this machine until the plan's minimum requirement is free, up to that long.
    """

    name: str | None = None
    budget: str | int | None = None
    device_file: str | None = None
    wait_seconds: float | None = None

    def __post_init__(self) -> None:
        if (self.name is None) == (self.budget is None):
            raise ValueError("give exactly one of a device name (--device NAME, see `lsaq devices`) or a budget "
                             "(--budget SIZE, e.g. 6GiB)")
        if self.wait_seconds is not None:
            if self.name != LOCAL:
                raise ValueError(f"waiting for memory only applies to --device {LOCAL} (memory is polled on this "
                                 f"machine), not to {self.name or 'a budget'!r}")
            if self.wait_seconds < 0:
                raise ValueError(f"wait for memory must not be negative, got {self.wait_seconds}")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> "DeviceRequest":
        return cls(**{k: obj.get(k) for k in ("name", "budget", "device_file", "wait_seconds")})


def resolve_device(device: DeviceRequest | str, *, need: int | None = None) -> DeviceProfile:
    """The :class:`DeviceProfile` a request names; a plain string is a profile name.

    ``need``: bytes a plan needs at least, for a request that waits for memory on ``local``.
    """
    request = DeviceRequest(name=device) if isinstance(device, str) else device
    if request.budget is not None:
        return budget_profile(request.budget)
    if request.name == LOCAL:
        if request.wait_seconds is None:
            return detect_local()
        if need is None:
            raise ValueError("waiting for memory needs the bytes to wait for (the plan's minimum requirement)")
        return wait_for_memory(need, request.wait_seconds)
    profiles = {p.name: p for p in list_devices(request.device_file)}
    if request.name not in profiles:
        raise ValueError(f"unknown device {request.name!r}; valid devices: {', '.join(sorted(profiles))}, {LOCAL}")
    return profiles[request.name]


@dataclass(frozen=True)
class Importance:
    """Per-layer importance values to plan with, where they came from, and the model they were measured on."""

    values: tuple[float, ...]
    ref: ImportanceRef
    model: ModelInfo | None  # None for a bare vector


def read_importance(source: LayerImportance | str | Path | Sequence[float]) -> Importance:
    """An importance record (object or ``lsaq score`` file), a JSON list of numbers, or such a list itself."""
    if isinstance(source, LayerImportance):
        return Importance(source.importance, ImportanceRef(source.id, source.method, source.k), source.model)
    if isinstance(source, (str, Path)):
        path = Path(source)
        try:
            obj = json.loads(path.read_text())
        except FileNotFoundError:
            raise ValueError(f"importance {path}: no such file") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"importance {path}: not valid JSON ({e})") from e
        if isinstance(obj, dict) and "schema" in obj:
            rec = LayerImportance.load(path)
            return Importance(rec.importance, ImportanceRef(rec.id, rec.method, rec.k, str(path)), rec.model)
        values = obj.get("importance") if isinstance(obj, dict) else obj
        where = str(path)
    else:
        values, where = list(source), None
    if not isinstance(values, list) or not values or not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in values
    ):
        raise ValueError(f"importance {where or values!r}: expected an lsaq importance record, a JSON list of numbers, "
                         "or an object with an 'importance' list")
    floats = tuple(float(v) for v in values)
    return Importance(floats, ImportanceRef(sha256_hex(canonical_json(list(floats))), "vector", None, where), None)


@dataclass(frozen=True)
class PlanInputs:
    """Everything a plan is decided from, besides the device and the options."""

    shape: ModelShape
    importance: Importance
    model: ModelRef


def plan_inputs(importance: LayerImportance | str | Path | Sequence[float] | None = None,
                config: str | None = None) -> PlanInputs:
    """The shapes, importance and model identity to plan from.

    The config is ``config`` (a shipped name, a ``config.json`` or a model directory) when given, else the
    importance record's own model. Without importance every layer weighs 1.0 (earlier layers win ties).
    """
    imp = read_importance(importance) if importance is not None else None
    if config is not None:
        named = load_config(config)
        shape = model_shape(named.config)
        model = ModelRef.from_config(named.config, named.id, named.source, shape.num_layers)
    elif imp is not None and imp.model is not None:
        shape = model_shape(imp.model.config)
        model = ModelRef.from_info(imp.model)
    else:
        raise ValueError("give a model config (a shipped name such as llama-2-7b, or a config.json) or an importance "
                         "record from `lsaq score`; a bare importance list carries no model")
    if imp is None:
        log.info("no importance given: all %d layers weigh 1.0 (earlier layers win ties)", shape.num_layers)
        imp = Importance((1.0,) * shape.num_layers, UNIFORM_IMPORTANCE, None)
    return PlanInputs(shape, imp, model)


def read_loss(loss: LayerLoss | str | Path | None) -> LayerLoss | None:
    """A layer-loss record given as an object or a file (from :func:`lsaq.measure`)."""
    return LayerLoss.load(loss) if isinstance(loss, (str, Path)) else loss


def loss_plan_inputs(importance: LayerImportance | str | Path | Sequence[float] | None, config: str | None,
                     record: LayerLoss | None) -> PlanInputs:
    """:func:`plan_inputs`, or with only a layer-loss record: its model, and its INT4 loss per layer as the
    importance (the measured sensitivity). ``ValueError`` when the record was measured on another model."""
    if record is None or importance is not None or config is not None:
        inputs = plan_inputs(importance, config)
    else:
        ref = ImportanceRef(id=record.id, method="measured-loss")
        inputs = PlanInputs(model_shape(record.model.config), Importance(record.sensitivity, ref, record.model),
                            ModelRef.from_info(record.model))
    if record is not None and inputs.model.content_hash not in (None, record.model.content_hash):
        raise ValueError(f"the layer-loss record was measured on {record.model.id!r} "
                         f"({record.model.content_hash[:12]}), not on the model being planned ({inputs.model.name!r})")
    return inputs


def _device_for(device: DeviceProfile | DeviceRequest | str, inputs: PlanInputs, options: PlanOptions) -> DeviceProfile:
    if isinstance(device, DeviceProfile):
        return device
    request = DeviceRequest(name=device) if isinstance(device, str) else device
    need = None
    if request.wait_seconds is not None:  # the least any plan over the allowed levels needs
        levels = [options.strategy.uniform] if options.strategy.uniform else list(options.allowed)
        need = budget_for(inputs.shape, options).min_required(levels, inputs.shape.num_layers)
    return resolve_device(request, need=need)


def plan(
    device: DeviceProfile | DeviceRequest | str,
    *,
    importance: LayerImportance | str | Path | Sequence[float] | None = None,
    config: str | None = None,
    options: PlanOptions | None = None,
    out: str | Path | None = None,
    loss: LayerLoss | str | Path | None = None,
    group_size: int | str | None = None,
) -> Plan:
    """Plan a model for a device: per decoder layer FP16/INT8/INT4 so that it fits, important layers kept higher.

    ``importance``: an importance record (object or file from :func:`lsaq.score`), a list of numbers (or a JSON file
    of one), or None for uniform. ``config``: the model's config when the importance does not carry it (see
    :func:`plan_inputs`). Raises :class:`~lsaq.planning.planner.InfeasiblePlanError` (a ``ValueError`` saying what
    would help) when nothing fits. ``out``: write the plan record there, atomically. ``loss``: a measured
    layer-loss record (object or file from :func:`lsaq.measure`) for the ``measured`` strategy, which minimises the
    summed loss; without other importance, the plan's importance is each layer's measured INT4 loss.

    ``group_size="auto"`` (strategy ``measured``; per-channel for the others): INT4 is per-channel or in groups of
    :func:`~lsaq.planning.memory.fitting_group_size` (the largest size that divides every input width), whichever
    plan has the lower predicted loss under the budget (ties: fewer weight bytes); the record must hold that
    probe (``lsaq measure --probes int8,int4,int4-g64``). An int sets the group size (as ``options.policy``).
    """
    options = options or PlanOptions()
    record = read_loss(loss)
    inputs = loss_plan_inputs(importance, config, record)
    profile = _device_for(device, inputs, options)
    options = options.for_device(profile)  # the runtime: the one asked for, else the device's
    # a GGUF build stores INT4 in llama.cpp's own blocks: no group size to weigh (INT4 losses per-channel)
    candidates = [options] if options.gguf else int4_formats(inputs.shape, options, group_size, record)
    plans, errors = [], []
    for opts in candidates:
        table = record.table(opts.policy.group_size) if record is not None else None
        try:
            plans.append(make_plan(inputs.shape, inputs.importance.values, profile, opts, model=inputs.model,
                                   importance_ref=inputs.importance.ref, loss=table,
                                   loss_id=record.id if record is not None else None))
        except InfeasiblePlanError as e:
            errors.append(e)
    if not plans:
        raise errors[0]
    result = min(plans, key=lambda p: (p.predicted_loss or 0.0, p.breakdown.weights))
    if len(candidates) > 1:
        log.info("INT4 %s: predicted loss %s", "per-channel" if result.options.policy.group_size is None else
                 f"in groups of {result.options.policy.group_size}",
                 ", ".join(f"{p.options.policy.group_size or 'per-channel'} {p.predicted_loss:.4g}" for p in plans))
    if out is not None:
        result.save(out)
    return result


def check_group_request(group_size: int | str | None, strategy: Strategy | str) -> int | str | None:
    """The parsed group size (:func:`~lsaq.precision.parse_group_size`). ``"auto"`` weighs the INT4 formats
    by measured loss, so it stays ``"auto"`` for strategy ``measured`` only; with any other strategy, which has
    nothing to weigh them by, it is None (per-channel, the format the rankings were studied with)."""
    group_size = parse_group_size(group_size)
    if group_size == AUTO_GROUP and Strategy.parse(strategy) is not Strategy.MEASURED:
        return None
    return group_size


def int4_formats(shape: ModelShape, options: PlanOptions, group_size: int | str | None,
                 record: LayerLoss | None) -> list[PlanOptions]:
    """The plan options to try: ``options`` with ``group_size`` (:func:`parse_group_size`) applied; for
    ``"auto"`` with strategy ``measured``, per-channel and the fitting group size (:func:`check_group_request`).
    ``ValueError`` for ``auto`` without a layer-loss record, or with a group size already in ``options``."""
    group_size = check_group_request(group_size, options.strategy)
    if group_size is None:
        return [options]
    if group_size != AUTO_GROUP:
        return [options.with_policy(dataclasses.replace(options.policy, group_size=group_size))]
    if record is None:
        raise ValueError("group size 'auto' weighs INT4 formats by measured loss: it needs a layer-loss record")
    if options.policy.group_size is not None:
        raise ValueError(f"group size 'auto' and the policy's group size {options.policy.group_size} both given")
    fitting = fitting_group_size(shape)
    sizes = [None] if fitting is None else [None, fitting]
    return [options.with_policy(dataclasses.replace(options.policy, group_size=g)) for g in sizes]


@dataclass(frozen=True)
class StrategyRow:
    """One strategy on shared inputs: its plan when it fits; ``required`` is the plan's need, else the fewest bytes
    any of its plans needs, and ``headroom`` what the device's usable memory leaves (negative: short by that much)."""

    strategy: Strategy
    plan: Plan | None
    required: int
    headroom: int


@dataclass(frozen=True)
class Comparison:
    """Every strategy for one model on one device (``lsaq plan --compare``)."""

    model: ModelRef
    device: DeviceProfile
    options: PlanOptions
    rows: tuple[StrategyRow, ...]


def compare_strategies(
    device: DeviceProfile | DeviceRequest | str,
    *,
    importance: LayerImportance | str | Path | Sequence[float] | None = None,
    config: str | None = None,
    options: PlanOptions | None = None,
    loss: LayerLoss | str | Path | None = None,
) -> Comparison:
    """Every strategy (lsaq, optimal, the uniform baselines; ``measured`` given ``loss``) on the same inputs,
    fitting or not."""
    options = options or PlanOptions()
    record = read_loss(loss)
    inputs = loss_plan_inputs(importance, config, record)
    table = record.table(options.policy.group_size) if record is not None else None
    profile = _device_for(device, inputs, options)
    rows = []
    for s in Strategy:
        if s is Strategy.MEASURED and record is None:
            continue
        opts = dataclasses.replace(options, strategy=s).for_device(profile)
        try:
            p = make_plan(inputs.shape, inputs.importance.values, profile, opts, model=inputs.model,
                          importance_ref=inputs.importance.ref, loss=table if s is Strategy.MEASURED else None,
                          loss_id=record.id if record is not None and s is Strategy.MEASURED else None)
            rows.append(StrategyRow(s, p, p.breakdown.required, p.headroom))
        except ValueError:
            levels: list[Precision] = [s.uniform] if s.uniform else list(options.allowed)
            need = budget_for(inputs.shape, opts).min_required(levels, inputs.shape.num_layers)
            rows.append(StrategyRow(s, None, need, profile.usable - need))
    return Comparison(inputs.model, profile, options.for_device(profile), tuple(rows))
