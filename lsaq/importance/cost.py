"""Measured cost per layer and precision: measure once, plan for every device.

For every decoder layer and every probe (INT8, INT4 per-channel, INT4 in groups), the mean KL divergence of the
model's next-token distributions from the float model's when only that layer is quantized that way
(:func:`lsaq.importance.sensitivity.probe_samples`; all probes share one float pass). The record depends on the
model, the calibration set and the probes only, so one measurement serves every device's plan: the planner
minimises the summed cost under the device's byte budget (:func:`lsaq.planning.solvers.min_loss_assign`).

:class:`LayerLoss` is the versioned JSON record (schema ``lsaq.layer_loss``). It also keeps what the measurement
cost: ``seconds``, and ``forward_seconds`` (one float forward pass over the same tokens, timed in the same run), so
``cost_ratio`` says how many forward passes the measurement was worth, and ``cost`` (layer loads, layer runs,
hidden-state bytes written to disk).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from lsaq.version import __version__
from lsaq.calibration.sets import CalibrationInfo
from lsaq.models.identity import ModelInfo
from lsaq.precision import Precision
from lsaq.records import atomic_write_json, canonical_json, decode_record, read_record, sha256_hex
from lsaq.resources import RunMemory

if TYPE_CHECKING:
    from torch import nn

    from lsaq.engine.skeleton import Layers

    from lsaq.calibration.sets import CalibrationSet

SCHEMA, VERSION = "lsaq.layer_loss", 1
DEFAULT_PROBES = ("int8", "int4")


@dataclass(frozen=True)
class LayerLoss:
    """Mean KL (nats) per layer and probe: ``loss[layer][probe]``, ``std`` its standard deviation over samples."""

    model: ModelInfo
    calibration: CalibrationInfo
    probes: tuple[str, ...]  # probe labels (lsaq.importance.sensitivity.Probe.label), in column order
    loss: tuple[tuple[float, ...], ...]  # [num_layers][len(probes)]
    std: tuple[tuple[float, ...], ...]
    seconds: float = 0.0
    forward_seconds: float = 0.0
    lsaq_version: str = __version__
    quantizer: str = "rtn"  # how each probe's codes were chosen: rtn, or gptq on the calibration set's activations
    stride: int = 1  # KL taken at every stride-th position (lsaq.importance.sensitivity.probe_samples)
    # what the measurement took: layer_loads, layer_runs, hidden_bytes_on_disk (ProbeRun.cost); not in the id
    cost: dict[str, int] = field(default_factory=dict, compare=False)
    memory: RunMemory | None = field(default=None, compare=False)  # where it ran, its peak memory; not in the id

    @property
    def num_layers(self) -> int:
        return len(self.loss)

    @property
    def id(self) -> str:
        """Content hash of what determines the values (model, calibration, probes, values; not timings)."""
        extra = {k: v for k, v in (("quantizer", self.quantizer), ("stride", self.stride)) if v not in ("rtn", 1)}
        return sha256_hex(canonical_json({"model": self.model.content_hash, "calibration": self.calibration.hash,
                                          "probes": list(self.probes), "loss": [list(r) for r in self.loss],
                                          **extra}))  # ids of records before those fields: unchanged

    @property
    def cost_ratio(self) -> float:
        """The measurement's time in float forward passes over the same tokens."""
        return self.seconds / self.forward_seconds if self.forward_seconds > 0 else float("nan")

    @property
    def sensitivity(self) -> tuple[float, ...]:
        """Per layer, the loss of its coarsest probe (per-channel ``int4`` when measured, else the largest): the
        importance a plan made from this record shows and ranks by."""
        if "int4" in self.probes:
            k = self.probes.index("int4")
            return tuple(row[k] for row in self.loss)
        return tuple(max(row) for row in self.loss)

    def table(self, group_size: int | None = None) -> list[dict[Precision, float]]:
        """Per layer ``{precision: loss}`` for the planner: FP16 costs 0 (the reference); INT4 is the per-channel
        probe, or the ``int4-g<group_size>`` one when ``group_size`` is given. ``ValueError`` when the record lacks
        a probe that is needed."""
        int4 = "int4" if group_size is None else f"int4-g{group_size}"
        columns = {Precision.INT8: "int8", Precision.INT4: int4}
        missing = [c for c in columns.values() if c not in self.probes]
        if missing:
            raise ValueError(f"the layer-loss record has probes {', '.join(self.probes)}; planning with "
                             f"group size {group_size} needs {', '.join(missing)}")
        col = {p: self.probes.index(c) for p, c in columns.items()}
        return [{Precision.FP16: 0.0, **{p: row[k] for p, k in col.items()}} for row in self.loss]

    def to_json(self) -> dict[str, Any]:
        return {"schema": SCHEMA, "version": VERSION, "id": self.id, "model": self.model.to_json(),
                "calibration": self.calibration.to_json(), "quantizer": self.quantizer, "stride": self.stride,
                "probes": list(self.probes),
                "loss": [list(r) for r in self.loss], "std": [list(r) for r in self.std], "seconds": self.seconds,
                "forward_seconds": self.forward_seconds, "cost": dict(self.cost), "lsaq_version": self.lsaq_version,
                "memory": self.memory.to_json() if self.memory is not None else None}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> "LayerLoss":
        return cls(model=ModelInfo.from_json(obj["model"]), calibration=CalibrationInfo.from_json(obj["calibration"]),
                   probes=tuple(obj["probes"]), loss=tuple(tuple(float(v) for v in r) for r in obj["loss"]),
                   std=tuple(tuple(float(v) for v in r) for r in obj["std"]), seconds=float(obj["seconds"]),
                   forward_seconds=float(obj["forward_seconds"]), lsaq_version=obj.get("lsaq_version", "?"),
                   quantizer=obj.get("quantizer", "rtn"), stride=int(obj.get("stride", 1)),
                   cost={k: int(v) for k, v in obj.get("cost", {}).items()},
                   memory=RunMemory.from_json(obj.get("memory")))

    def save(self, path: str | Path) -> None:
        atomic_write_json(Path(path), self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> "LayerLoss":
        obj = read_record(Path(path), SCHEMA, VERSION)
        return decode_record(obj, cls.from_json, str(path), "layer-loss record")


def measure_layer_loss(
    model: "nn.Module | Layers",
    info: ModelInfo,
    calib: "CalibrationSet",
    probes: Sequence[str] = DEFAULT_PROBES,
    *,
    quantizer: str = "rtn",
    batch_size: int = 4,
    stride: int = 1,
    budget: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> LayerLoss:
    """Measure ``loss[layer][probe]`` of ``model`` (in memory, or a :class:`~lsaq.engine.skeleton.Skeleton` read
    one layer at a time) on ``calib`` (see the module docstring) in one walk over its decoder layers
    (:func:`lsaq.importance.sensitivity.probe_samples`: L layer loads, the probe branches' hidden states in memory
    within ``budget`` bytes, else on disk); also times one float walk over the same tokens for
    :attr:`LayerLoss.cost_ratio`. The record's ``cost`` gives the layer loads and runs.

    ``quantizer="gptq"``: each probe's codes are GPTQ's, from the Hessian of the float model's activations on the
    same calibration tokens at that layer (its time is included).
    ``stride``: KL at every ``stride``-th position only (fewer LM-head projections; see ``probe_samples``)."""
    import numpy as np
    import torch

    from lsaq.engine.calls import record_calls
    from lsaq.engine.skeleton import Resident
    from lsaq.engine.spill import DEFAULT_BUDGET
    from lsaq.engine.walk import walk
    from lsaq.importance.sensitivity import Probe, probe_samples
    from lsaq.models.parts import decoder_parts
    from lsaq.precision import Quantizer

    quantizer = Quantizer.parse(quantizer).value
    parsed = [Probe.parse(p) for p in probes]
    labels = tuple(p.label for p in parsed)
    if len(set(labels)) != len(labels):
        raise ValueError(f"a probe is named twice in {list(probes)}")
    layers = Resident(decoder_parts(model)) if isinstance(model, torch.nn.Module) else model
    start = time.perf_counter()  # the baseline: one float walk, same tokens and batches
    walk(layers, record_calls(layers.parts, calib.tokens, batch_size), lambda *_: None)
    forward = time.perf_counter() - start
    start = time.perf_counter()
    run = probe_samples(layers, calib, parsed, batch_size=batch_size, progress=progress, quantizer=quantizer,
                        stride=stride, budget=DEFAULT_BUDGET if budget is None else budget)
    seconds = time.perf_counter() - start
    mean, std = run.scores.mean(axis=1).T, run.scores.std(axis=1).T  # [L, P]
    return LayerLoss(model=info, calibration=calib.info(), probes=labels,
                     loss=tuple(tuple(float(v) for v in row) for row in np.asarray(mean)),
                     std=tuple(tuple(float(v) for v in row) for row in np.asarray(std)),
                     seconds=seconds, forward_seconds=forward, quantizer=quantizer, stride=stride, cost=run.cost())
