"""The small records the pipeline's tasks return: keys, store URIs, headline numbers; never a model or a tensor.

Each is a frozen dataclass of JSON types (Prefect persists them with its JSON serializer, so a cached run on any
machine that shares the store reads them back typed). ``key`` is the content key the record was computed under
(:mod:`tasks.keys`); downstream keys are built from it, so a change anywhere upstream changes every key below.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lsaq.planning.devices import DeviceProfile


@dataclass(frozen=True)
class ModelKey:
    """The model a pipeline run builds from, identified without loading it (:func:`lsaq.models.loading.locate_model`).

    ``spec`` is what was asked for (None: the embedded default), passed to every stage that loads the model;
    ``config_dir`` is this machine's directory holding its ``config.json`` (planning reads only that).
    """

    spec: str | None
    id: str
    source: str
    revision: str | None
    content_hash: str
    model_type: str
    num_layers: int
    config_dir: str
    slug: str
    revision_slug: str
    key: str

    @property
    def label(self) -> str:
        """A short name for task run names: the model slug."""
        return self.slug


@dataclass(frozen=True)
class DeviceTarget:
    """A resolved device on which some plan of the model fits (checked before any model is loaded)."""

    request: str  # the device name or budget as asked for
    slug: str
    profile: dict[str, Any]  # DeviceProfile.to_json()
    key: str

    @property
    def device(self) -> DeviceProfile:
        return DeviceProfile.from_json(self.profile)


@dataclass(frozen=True)
class CalibrationResult:
    """A calibration set kept in the store: ``uri`` (a prefix holding ``calibration.json`` and the tokens)."""

    key: str
    uri: str
    prefix: str
    hash: str  # CalibrationInfo.hash: the tokens' content
    source: str
    kind: str
    samples: int
    seq_len: int
    computed: bool  # False when this run found it in the store
    memory: dict[str, Any] | None = None  # the run's RunMemory when this run drew the set (None: from the store)


@dataclass(frozen=True)
class ImportanceResult:
    """An importance record kept in the store (``importance.json`` under ``prefix``)."""

    key: str
    uri: str
    prefix: str
    record_id: str
    method: str
    k: int | None
    importance: tuple[float, ...]
    seconds: float
    computed: bool
    memory: dict[str, Any] | None = None  # the run's RunMemory (where it computed, peak host and GPU memory)


@dataclass(frozen=True)
class PlanResult:
    """A plan kept in the store (``plans/<plan-id>.json``) and its headline figures."""

    key: str
    uri: str
    store_key: str
    plan_id: str
    device: str  # the device slug
    counts: dict[str, int]
    avg_bits: dict[str, float]
    weights_bytes: int
    required_bytes: int
    usable_bytes: int


@dataclass(frozen=True)
class ArtifactResult:
    """A quantized artifact directory on the machine that made it; ``files`` (name -> [bytes, sha256]) identify
    it anywhere (a published build of the same plan holds the same files)."""

    key: str
    path: str
    plan_id: str
    device: str
    tensor_bytes: int
    file_bytes: int
    files: dict[str, tuple[int, str]] = field(default_factory=dict)
    quantizer: str = "rtn"  # how the codes were chosen (lsaq.precision.Quantizer)
    calibration_key: str | None = None  # gptq: the calibration set it used (to re-make it on another machine)
    calibration_prefix: str | None = None
    memory: dict[str, Any] | None = None  # the quantize run's RunMemory; None when this machine had the files


@dataclass(frozen=True)
class EvalResult:
    """An evaluation report of an artifact (``report.json`` and ``report.md`` on this machine) and its headline
    fidelity figures."""

    key: str
    report: str
    plan_id: str
    device: str
    fidelity: dict[str, float] | None
    seconds: float
    memory: dict[str, Any] | None = None  # the evaluation's RunMemory
    generation: dict[str, Any] | None = None  # a GGUF build generating in llama.cpp: peak RSS (GenerationMemory)


@dataclass(frozen=True)
class BuildResult:
    """A published build: where it is, and the figures a user picks a build by."""

    key: str
    uri: str
    manifest_uri: str
    build_id: str
    device: str
    avg_bits: dict[str, float]
    file_bytes: int
    weights_bytes: int
    required_bytes: int
    usable_bytes: int
    fidelity: dict[str, float] | None
    created: bool
    memory: dict[str, dict[str, Any]] = field(default_factory=dict)  # stage (quantize, evaluate) -> its RunMemory
    generation: dict[str, Any] | None = None  # a GGUF build generating in llama.cpp (EvalResult.generation)


@dataclass(frozen=True)
class DeviceOutcome:
    """One device of a run: its build, or the state that stopped it and why."""

    device: str
    state: str  # "Completed", "Cached" (every stage reused) or the failed stage's state name
    build: BuildResult | None = None
    stage: str | None = None  # the stage that failed
    message: str | None = None
    flow_run: str | None = None  # the flow run that built it, when dispatched (then the state is that run's)


@dataclass(frozen=True)
class RunSummary:
    """What :func:`flows.build.build` returns: the model, the importance it planned with, one outcome per device."""

    model: str
    revision: str
    store: str
    importance: str
    outcomes: tuple[DeviceOutcome, ...]
    importance_memory: dict[str, Any] | None = None  # the importance run's RunMemory (None: cached, or none ran)
    calibration_memory: dict[str, Any] | None = None  # the calibration run's RunMemory (None: from the store)

    @property
    def failed(self) -> tuple[DeviceOutcome, ...]:
        return tuple(o for o in self.outcomes if o.build is None)


@dataclass(frozen=True)
class DispatchedRun:
    """One device's build run as its own flow run of a deployment (``dispatch``): which run, how it ended."""

    device: str
    deployment: str
    flow_run: str  # the flow run's id
    name: str
    state: str
