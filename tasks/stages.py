"""The pipeline's Prefect tasks: one per stage, each a thin wrapper over one :mod:`lsaq` stage function.

A task takes small records (:mod:`tasks.records`) and settings, finds its result in the store or computes it with
the lsaq function, keeps the files in the store (``store``: a URI) and returns a small record. Files a stage
needs locally (a calibration set, an artifact) live under ``work``, this machine's scratch directory. Models and
tensors never cross a task boundary.

Caching: every task is keyed by an explicit content key (:mod:`tasks.keys`), its record persisted as JSON in the
store (:mod:`tasks.storage`); the flow binds the store with :func:`bind`. Stages that load a whole model share
``LSAQ_MODEL_SLOTS`` slots per process (default 1), so concurrent device builds do not load five models at once,
and across processes a Prefect global concurrency limit when ``LSAQ_MODEL_CONCURRENCY`` names one.
Only store I/O is retried.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from prefect import Task, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact
from prefect.concurrency.sync import concurrency
from prefect.runtime import task_run

import lsaq
from lsaq.eval.stage import EvalOptions
from lsaq.calibration.sets import calibration_memory, load_calibration_dir
from lsaq.importance.cost import LayerLoss
from lsaq.importance.record import LayerImportance
from lsaq.models.families import model_shape
from lsaq.models.identity import ModelRef
from lsaq.models.loading import locate_model
from lsaq.planning.devices import LOCAL
from lsaq.planning.planner import PlanOptions, Strategy
from lsaq.planning.stage import DeviceRequest
from lsaq.quantization.artifact import verify_artifact
from lsaq.quantization.record import MANIFEST as ARTIFACT_MANIFEST
from lsaq.quantization.record import Artifact
from lsaq.precision import AUTO_GROUP, Quantizer, parse_group_size
from lsaq.store.keys import (
    artifact_prefix,
    calibration_prefix,
    device_slug,
    importance_prefix,
    model_slug,
    plan_key,
    revision_slug,
)
from lsaq.store.objects import fetch_files, has_files, put_files
from lsaq.store.stage import publish as publish_build
from tasks import keys
from tasks.records import (
    ArtifactResult,
    BuildResult,
    CalibrationResult,
    DeviceTarget,
    EvalResult,
    ImportanceResult,
    ModelKey,
    PlanResult,
)
from tasks.storage import IO_RETRIES, IO_RETRY_DELAY_S, backend, cache_policy, io_failure, result_storage

CALIB_FILES = ("calibration.json", "tokens.safetensors")  # the record last: lsaq.calibration.sets's names
IMPORTANCE_FILE = "importance.json"
LOSS_FILE = "loss.json"
MEASURED_LOSS = "measured-loss"  # the score task's "method" for strategy 'measured': lsaq.measure's layer loss
MODEL_SLOTS = threading.BoundedSemaphore(max(1, int(os.environ.get("LSAQ_MODEL_SLOTS", "1"))))
MODEL_CONCURRENCY_ENV = "LSAQ_MODEL_CONCURRENCY"  # a Prefect global concurrency limit shared across processes

COMMON: dict[str, Any] = dict(persist_result=True, result_serializer="json", retries=IO_RETRIES,
                              retry_delay_seconds=IO_RETRY_DELAY_S, retry_condition_fn=io_failure)


@contextlib.contextmanager
def model_slot() -> Iterator[None]:
    """Hold one of this process's model slots while a whole model is in memory, and one slot of the Prefect global
    concurrency limit named by ``$LSAQ_MODEL_CONCURRENCY`` when set (flow runs in several containers sharing one
    GPU: ``prefect gcl create lsaq-gpu0 --limit 1``); a name with no such limit is an error, not ignored."""
    limit = os.environ.get(MODEL_CONCURRENCY_ENV)
    with MODEL_SLOTS, (concurrency(limit, occupy=1, strict=True) if limit else contextlib.nullcontext()):
        yield


def scratch(work: str, model: ModelKey, *parts: str) -> Path:
    """``<work>/<model>/<revision>/<parts...>``: this machine's copy of a stage's files."""
    return Path(work).expanduser().joinpath(model.slug, model.revision_slug, *parts)


def local_copy(store: str, prefix: str, names: tuple[str, ...], local: Path) -> Path:
    """``local``, holding the files ``names`` of ``prefix`` in the store: fetched unless this machine has the first
    (the record, written last) already."""
    if not (local / names[0]).is_file():
        fetch_files(backend(store), prefix, names, local)
    return local


def artifact_key(text: str) -> str:
    """A Prefect artifact key (lower-case letters, digits, dashes) from a slug."""
    return re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")[:100]


# ------------------------------------------------------------------------------------------ model and devices


def _identify_key(model: str | None, revision: str | None = None, **_: Any) -> str | None:
    return keys.identity_probe(model, revision)


def _identify_name() -> str:
    return f"identify {task_run.parameters.get('model') or 'default'}"


@task(name="identify", task_run_name=_identify_name, cache_policy=cache_policy(_identify_key), **COMMON)
def identify(model: str | None, revision: str | None = None) -> ModelKey:
    """The model's identity (content hash, revision, config) without loading its weights."""
    located = locate_model(model, revision=revision)
    shape = model_shape(located.config)
    ref = ModelRef(id=located.id, model_type=located.model_type, num_layers=shape.num_layers,
                   source=str(located.path), revision=located.revision, content_hash=located.content_hash)
    return ModelKey(spec=model, id=located.id, source=str(located.path), revision=located.revision,
                    content_hash=located.content_hash, model_type=located.model_type, num_layers=shape.num_layers,
                    config_dir=str(located.load_dir), slug=model_slug(ref), revision_slug=revision_slug(ref),
                    key=keys.model_key(model, located.revision, located.content_hash))


def _device_key(model: ModelKey, request: DeviceRequest, options: PlanOptions, **_: Any) -> str | None:
    if request.name == LOCAL:
        return None  # measured live: never cached
    return keys.device_key(model, request_label(request), request.device_file, options)


def request_label(request: DeviceRequest) -> str:
    """A device request as a user wrote it: the profile name, or ``budget=<size>``."""
    return request.name if request.name is not None else f"budget={request.budget}"


def _resolve_name() -> str:
    params = task_run.parameters
    return f"resolve {params['model'].slug} for {request_label(params['request'])}"


@task(name="resolve-device", task_run_name=_resolve_name,
      cache_policy=cache_policy(_device_key), **COMMON)
def resolve_device(model: ModelKey, request: DeviceRequest, options: PlanOptions) -> DeviceTarget:
    """The device's profile, after checking that some plan of the model fits it (weights are not loaded):
    ``ValueError`` for an unknown device, :class:`~lsaq.planning.planner.InfeasiblePlanError` when even the
    smallest plan does not fit."""
    profile = lsaq.resolve_device(request)
    # Feasibility depends on sizes alone: plan with uniform importance (InfeasiblePlanError says what would help);
    # the measured strategy fits exactly when the rule does (both search the same allowed precisions).
    sizes_only = dataclasses.replace(options, strategy=Strategy.LSAQ) if options.strategy is Strategy.MEASURED \
        else options
    lsaq.plan(profile, importance=[1.0] * model.num_layers, config=model.config_dir, options=sizes_only)
    return DeviceTarget(request=request_label(request), slug=device_slug(profile), profile=profile.to_json(),
                        key=_device_key(model, request, options) or "")


# ------------------------------------------------------------------------------------------ importance


def _calibration_key(model: ModelKey, source: str | None, samples: int, seq_len: int, seed: int, **_: Any) -> str:
    return keys.calibration_key(model, source=source, samples=samples, seq_len=seq_len, seed=seed)


@task(name="calibrate", task_run_name="calibrate {model.slug}", cache_policy=cache_policy(_calibration_key),
      **COMMON)
def calibrate(model: ModelKey, source: str | None, samples: int, seq_len: int, seed: int, store: str,
              work: str) -> CalibrationResult:
    """Draw the calibration set (:func:`lsaq.calibrate`) unless the store has it; keep it in the store."""
    key = _calibration_key(model, source, samples, seq_len, seed)
    prefix = calibration_prefix(model.slug, model.revision_slug, key)
    local = scratch(work, model, "calibration", key)
    computed = not has_files(backend(store), prefix, record=CALIB_FILES[0])
    if computed:
        with model_slot():
            lsaq.calibrate(model.spec, local, source=source, samples=samples, seq_len=seq_len, seed=seed,
                           revision=model.revision)
        put_files(backend(store), prefix, {n: local / n for n in CALIB_FILES}, record=CALIB_FILES[0])
    else:
        local_copy(store, prefix, CALIB_FILES, local)
    info = load_calibration_dir(local).info()  # checks the tokens against their hash
    memory = calibration_memory(local) if computed else None
    return CalibrationResult(key=key, uri=backend(store).key_uri(prefix), prefix=prefix, hash=info.hash,
                             source=info.source, kind=info.kind, samples=info.samples, seq_len=info.seq_len,
                             computed=computed, memory=memory.to_json() if memory is not None else None)


def _importance_key(model: ModelKey, calibration: CalibrationResult, method: str, k: int, quantizer: str = "rtn",
                    group_size: int | str | None = None, **_: Any) -> str:
    if method == MEASURED_LOSS:  # measured with the build's quantizer's codes and INT4 formats (rtn keys as before)
        return keys.importance_key(model, calibration, method=MEASURED_LOSS, k=0,
                                   quantizer=Quantizer.parse(quantizer).value,
                                   group_size=parse_group_size(group_size))
    return keys.importance_key(model, calibration, method=lsaq.Method.parse(method).value, k=k)


def record_file(method: str) -> str:
    """The file an importance run keeps in the store: the layer-loss record for ``measured-loss``."""
    return LOSS_FILE if method == MEASURED_LOSS else IMPORTANCE_FILE


@task(name="score", task_run_name="score {model.slug} ({method})", cache_policy=cache_policy(_importance_key),
      **COMMON)
def score(model: ModelKey, calibration: CalibrationResult, method: str, k: int, batch_size: int, store: str,
          work: str, quantizer: str = "rtn", group_size: int | str | None = None,
          compute_device: str = "auto") -> ImportanceResult:
    """Score every decoder layer (:func:`lsaq.score`; for ``measured-loss`` the per-precision layer loss of
    :func:`lsaq.measure`, with ``quantizer``'s codes, and INT4 in groups of ``group_size`` too when given) on the
    stored calibration set unless the store has the record; keep it in the store. ``compute_device`` is not part
    of the key: a record computed on a GPU serves a CPU machine, and the other way round."""
    key = _importance_key(model, calibration, method, k, quantizer, group_size)
    prefix = importance_prefix(model.slug, model.revision_slug, key)
    local = scratch(work, model, "importance", key)
    name = record_file(method)
    computed = not has_files(backend(store), prefix, record=name)
    if computed:
        calib_dir = local_copy(store, calibration.prefix, CALIB_FILES,
                               scratch(work, model, "calibration", calibration.key))
        with model_slot():
            if method == MEASURED_LOSS:
                lsaq.measure(model.spec, local / name, calibration=calib_dir, batch_size=batch_size,
                             revision=model.revision, quantizer=quantizer, group_size=group_size,
                             compute_device=compute_device)
            else:
                lsaq.score(model.spec, local / name, method=method, k=k, calibration=calib_dir,
                           batch_size=batch_size, revision=model.revision, compute_device=compute_device)
        put_files(backend(store), prefix, {name: local / name}, record=name)
    local_copy(store, prefix, (name,), local)
    if method == MEASURED_LOSS:
        loss = LayerLoss.load(local / name)
        values, record_id, seconds, k_, memory = loss.sensitivity, loss.id, loss.seconds, None, loss.memory
    else:
        imp = LayerImportance.load(local / name)
        values, record_id, seconds, k_, memory = tuple(imp.importance), imp.id, imp.wall_time_s, imp.k, imp.memory
    return ImportanceResult(key=key, uri=backend(store).key_uri(f"{prefix}/{name}"), prefix=prefix,
                            record_id=record_id, method=method, k=k_, importance=values, seconds=seconds,
                            computed=computed, memory=memory.to_json() if memory is not None else None)


# ------------------------------------------------------------------------------------------ per device


def _plan_key(importance: ImportanceResult, device: DeviceTarget, options: PlanOptions,
              group_size: int | str | None = None, **_: Any) -> str:
    return keys.plan_key(importance, device, options, parse_group_size(group_size) == AUTO_GROUP)


@task(name="plan", task_run_name="plan {model.slug} for {device.slug}", cache_policy=cache_policy(_plan_key),
      **COMMON)
def plan(model: ModelKey, importance: ImportanceResult, device: DeviceTarget, options: PlanOptions, store: str,
         work: str, group_size: int | str | None = None) -> PlanResult:
    """Decide per-layer precisions for one device (:func:`lsaq.plan`, no weights); keep the plan in the store and
    show it as a table. ``group_size="auto"``: the measured plan weighs INT4 per-channel against grouped."""
    name = record_file(importance.method)
    local = local_copy(store, importance.prefix, (name,), scratch(work, model, "importance", importance.key))
    if importance.method == MEASURED_LOSS:  # the layer-loss table is what the plan minimises
        result = lsaq.plan(device.device, loss=local / name, options=options,
                           group_size=AUTO_GROUP if parse_group_size(group_size) == AUTO_GROUP else None)
    else:
        result = lsaq.plan(device.device, importance=local / name, options=options)
    path = scratch(work, model, "plans", f"{result.id}.json")
    result.save(path)
    key = plan_key(model.slug, model.revision_slug, result.id)
    backend(store).create_bytes(key, path.read_bytes())  # keyed by content: the first copy stays
    create_table_artifact(
        key=artifact_key(f"{model.slug}-{device.slug}-plan"),
        table=[{"layer": i, "importance": round(v, 6), "precision": p.value}
               for i, (v, p) in enumerate(zip(result.importance, result.precisions))],
        description=f"{model.id} on {device.device.describe()}: {result.mix}"
                    + (f" (INT4 in groups of {group})" if (group := result.options.policy.group_size) else "")
                    + f"; avg {result.avg_bits['quantizable_linears']:.2f} bits/weight; needs "
                      f"{result.breakdown.required:,} of {device.device.usable:,} usable bytes",
    )
    return PlanResult(key=_plan_key(importance, device, options, group_size), uri=backend(store).key_uri(key),
                      store_key=key, plan_id=result.id, device=device.slug, counts=result.counts,
                      avg_bits=dict(result.avg_bits), weights_bytes=result.breakdown.weights,
                      required_bytes=result.breakdown.required, usable_bytes=device.device.usable)


def _quantize_key(model: ModelKey, plan: PlanResult, quantizer: str = "rtn",
                  calibration: CalibrationResult | None = None, **_: Any) -> str:
    return keys.quantize_key(model, plan.plan_id, quantizer, calibration.hash if calibration is not None else None)


@task(name="quantize", task_run_name="quantize {model.slug} for {plan.device}",
      cache_policy=cache_policy(_quantize_key), **COMMON)
def quantize(model: ModelKey, plan: PlanResult, store: str, work: str, quantizer: str = "rtn",
             calibration: CalibrationResult | None = None, compute_device: str = "auto") -> ArtifactResult:
    """Quantize the model following the stored plan (:func:`lsaq.quantize`) into this machine's work directory;
    ``quantizer="gptq"`` uses the stored ``calibration`` set's activations."""
    key = _quantize_key(model, plan, quantizer, calibration)
    result = ArtifactResult(key=key, path="", plan_id=plan.plan_id, device=plan.device, tensor_bytes=0,
                            file_bytes=0, quantizer=quantizer,
                            calibration_key=calibration.key if calibration is not None else None,
                            calibration_prefix=calibration.prefix if calibration is not None else None)
    artifact = make_artifact(model, plan, result, store, work, compute_device)
    if quantizer != Quantizer.RTN.value:  # other machines fetch these files rather than re-make them
        names = [ARTIFACT_MANIFEST, *sorted(artifact.files)]
        put_files(backend(store), artifact_prefix(model.slug, model.revision_slug, key),
                  {n: artifact.path / n for n in names}, record=ARTIFACT_MANIFEST)
    return dataclasses.replace(result, path=str(artifact.path), tensor_bytes=artifact.tensor_bytes,
                               file_bytes=artifact.file_bytes, files=dict(artifact.files),
                               memory=artifact.memory.to_json() if artifact.memory is not None else None)


def make_artifact(model: ModelKey, plan: PlanResult, spec: ArtifactResult, store: str, work: str,
                  compute_device: str = "auto") -> Artifact:
    """The artifact ``spec`` names (its key, quantizer and calibration) of ``plan`` in
    ``<work>/.../artifacts/<key>``: this machine's verified copy, else the store's copy of a calibrated quantizer's
    artifact, else quantized."""
    key = spec.key
    out = scratch(work, model, "artifacts", key)
    prefix = artifact_prefix(model.slug, model.revision_slug, key)
    if spec.quantizer != Quantizer.RTN.value and spec.files and not (out / ARTIFACT_MANIFEST).is_file() \
            and has_files(backend(store), prefix, record=ARTIFACT_MANIFEST):
        local_copy(store, prefix, (ARTIFACT_MANIFEST, *sorted(spec.files)), out)
    try:
        verify_artifact(out)
        return Artifact.load(out)
    except ValueError:
        pass  # absent or incomplete here (made on another machine, or cleaned): round to nearest is deterministic
    plan_file = scratch(work, model, "plans", f"{plan.plan_id}.json")
    if not plan_file.is_file():
        plan_file.parent.mkdir(parents=True, exist_ok=True)
        plan_file.write_bytes(backend(store).get_bytes(plan.store_key))
    calib_dir = None
    if spec.calibration_key is not None:  # gptq: the calibration tokens, from the store when not here
        calib_dir = local_copy(store, spec.calibration_prefix, CALIB_FILES,
                               scratch(work, model, "calibration", spec.calibration_key))
    with model_slot():
        return lsaq.quantize(plan_file, out, model=model.spec, quantizer=spec.quantizer, calibration=calib_dir,
                             compute_device=compute_device)


def ensure_artifact(model: ModelKey, artifact: ArtifactResult, store: str, work: str, plan: PlanResult) -> Path:
    """This machine's copy of ``artifact`` (re-made from its stored plan when another machine made it); it must
    hold the very files the record lists."""
    made = make_artifact(model, plan, artifact, store, work)
    if dict(made.files) != {k: tuple(v) for k, v in artifact.files.items()}:
        raise RuntimeError(f"re-quantizing plan {plan.plan_id[:12]} here gave other files than the cached artifact "
                           "(another lsaq or torch version); rerun the flow with refresh_cache to rebuild")
    return made.path


def _evaluate_key(artifact: ArtifactResult, options: EvalOptions, **_: Any) -> str:
    return keys.evaluate_key(artifact, options)


@task(name="evaluate", task_run_name="evaluate {model.slug} for {artifact.device}",
      cache_policy=cache_policy(_evaluate_key), **COMMON)
def evaluate(model: ModelKey, plan: PlanResult, artifact: ArtifactResult, options: EvalOptions, store: str,
             work: str, compute_device: str = "auto") -> EvalResult:
    """Evaluate the artifact against its float model (:func:`lsaq.evaluate`); show the report as Markdown.
    ``compute_device`` is not part of the cache key: a GPU's figures are the CPU's within float rounding."""
    key = _evaluate_key(artifact, options)
    path = ensure_artifact(model, artifact, store, work, plan)
    out = scratch(work, model, "reports", key, "report.json")
    with model_slot():
        report = lsaq.evaluate(path, out, options=options, compute_device=compute_device)
    fid = report.fidelity
    create_markdown_artifact(key=artifact_key(f"{model.slug}-{artifact.device}-eval"),
                             markdown=out.with_suffix(".md").read_text(),
                             description=f"evaluation of {model.id} for {artifact.device}")
    return EvalResult(key=key, report=str(out), plan_id=artifact.plan_id, device=artifact.device,
                      fidelity=None if fid is None else {"kl_mean": fid.kl_mean, "kl_p99": fid.kl_p99,
                                                         "top1_agreement": fid.top1_agreement},
                      seconds=report.seconds, memory=report.memory.to_json() if report.memory is not None else None,
                      generation=report.artifact.get("generation"))


def _publish_key(evaluation: EvalResult, store: str, **_: Any) -> str:
    return keys.publish_key(evaluation, backend(store).uri)


@task(name="publish", task_run_name="publish {model.slug} for {evaluation.device}",
      cache_policy=cache_policy(_publish_key), **COMMON)
def publish(model: ModelKey, plan: PlanResult, artifact: ArtifactResult, evaluation: EvalResult,
            store: str, work: str) -> BuildResult:
    """Publish the artifact and its report as one build (:func:`lsaq.publish`: files, then the manifest)."""
    path = ensure_artifact(model, artifact, store, work, plan)
    done = publish_build(backend(store), path, report=evaluation.report)
    m = done.manifest
    manifest_uri = backend(store).key_uri(m.key)
    create_link_artifact(key=artifact_key(f"{model.slug}-{m.device_slug}-build"), link=_link(manifest_uri),
                         link_text=f"{m.model_slug} {m.revision} {m.device_slug} {m.build_id}",
                         description=f"manifest of the {m.device_slug} build")
    return BuildResult(key=_publish_key(evaluation, store), uri=done.uri, manifest_uri=manifest_uri,
                       build_id=m.build_id, device=m.device_slug, avg_bits=dict(m.avg_bits),
                       file_bytes=m.file_bytes, weights_bytes=m.weights_bytes, required_bytes=m.required_bytes,
                       usable_bytes=plan.usable_bytes, fidelity=evaluation.fidelity, created=done.created,
                       memory={stage: m for stage, m in (("quantize", artifact.memory),
                                                         ("evaluate", evaluation.memory)) if m is not None},
                       generation=evaluation.generation)


def _link(uri: str) -> str:
    return uri if "://" in uri else Path(uri).resolve().as_uri()


# ------------------------------------------------------------------------------------------ binding the store


@dataclass(frozen=True)
class Pipeline:
    """The tasks with their cache records bound to one store (see :func:`bind`)."""

    identify: Task
    resolve_device: Task
    calibrate: Task
    score: Task
    plan: Task
    quantize: Task
    evaluate: Task
    publish: Task


def bind(store: str) -> Pipeline:
    """Every task with its result storage set to ``store``'s cache (:func:`tasks.storage.result_storage`)."""
    storage = result_storage(store)
    return Pipeline(*(t.with_options(result_storage=storage) for t in (
        identify, resolve_device, calibrate, score, plan, quantize, evaluate, publish)))
