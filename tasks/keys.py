"""Content keys of the pipeline's results: what each one is computed from, hashed, and nothing else.

Prefect's default cache key hashes a task's source and inputs; ours names the inputs that decide the result, so a
key means the same on every machine and across lsaq releases that do not change the numerics (``CODE`` does):

* calibration: the model (content hash, revision) + the calibration settings (source, samples, seq_len, seed)
* importance: the model + the calibration set's token hash + method + k + ``CODE``
* device: the request + the device catalog it resolves in + the model's config + plan options
* plan: the importance key + the resolved device profile + the plan options
* quantize: the plan id (a hash of the whole plan) + the model + ``CODE`` (+ the quantizer and its calibration
  set's hash, for GPTQ)
* evaluate: the quantize key + the evaluation options
* publish: the evaluate key + the store

Each key is ``<stage>-<32 hex>``; the ``cache_key_fn`` functions hand it to Prefect from a task's parameters.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from lsaq.version import __version__
from lsaq.eval.stage import EvalOptions
from lsaq.models.default import default_model_path
from lsaq.models.weights import is_hub_id, weight_files
from lsaq.planning.planner import PlanOptions
from lsaq.records import canonical_json, file_sha256, sha256_hex
from tasks.records import ArtifactResult, CalibrationResult, DeviceTarget, EvalResult, ImportanceResult, ModelKey

KEY_VERSION = 1  # of this key scheme: bump to invalidate every cached result
CODE = f"lsaq-{__version__}"  # the numerics' version: importance, plans and artifacts depend on it
KEY_HEX = 32


def content_key(stage: str, **parts: Any) -> str:
    """``<stage>-<hash>`` of ``parts`` (canonical JSON) and the key scheme's version."""
    return f"{stage}-{sha256_hex(canonical_json({'v': KEY_VERSION, **parts}))[:KEY_HEX]}"


def identity_probe(spec: str | None, revision: str | None) -> str | None:
    """The key of a model's identity on this machine, from the weights' paths, sizes and modification times (what
    lsaq's hash cache trusts); None for a hub id without a pinned revision (the hub may have moved)."""
    path = default_model_path() if spec is None else Path(spec).expanduser()
    if not path.exists():
        return content_key("identity", spec=spec, revision=revision) if is_hub_id(str(spec)) and revision else None
    try:
        _, files = weight_files(path)
    except ValueError:
        return None  # identify will say what is wrong
    stats = [[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] for f in files]
    return content_key("identity", spec=spec, revision=revision, files=stats, code=CODE)


def model_key(spec: str | None, revision: str | None, content_hash: str) -> str:
    return content_key("model", spec=spec, revision=revision, content=content_hash)


def calibration_key(model: ModelKey, *, source: str | None, samples: int, seq_len: int, seed: int) -> str:
    return content_key("calibration", content=model.content_hash, revision=model.revision, source=source,
                       samples=samples, seq_len=seq_len, seed=seed)


def importance_key(model: ModelKey, calibration: CalibrationResult, *, method: str, k: int,
                   quantizer: str = "rtn", group_size: int | str | None = None) -> str:
    """A measured loss of a calibrated quantizer, or with grouped INT4 measured too, adds those; every other key is
    as it was."""
    extra = {k_: v for k_, v in (("quantizer", quantizer), ("group_size", group_size)) if v not in ("rtn", None)}
    return content_key("importance", content=model.content_hash, revision=model.revision,
                       calibration=calibration.hash, method=method, k=k, code=CODE, **extra)


def device_key(model: ModelKey, request: str, device_file: str | None, options: PlanOptions) -> str:
    catalog = file_sha256(Path(device_file)) if device_file else CODE  # the shipped catalog comes with the code
    return content_key("device", model=model.key, request=request, catalog=catalog, options=options.to_json())


def plan_key(importance: ImportanceResult, device: DeviceTarget, options: PlanOptions, auto_group: bool = False) -> str:
    extra = {"group_size": "auto"} if auto_group else {}  # the INT4 format chosen by measured loss
    return content_key("plan", importance=importance.key, device=device.profile, options=options.to_json(), **extra)


def quantize_key(model: ModelKey, plan_id: str, quantizer: str = "rtn", calibration: str | None = None) -> str:
    """Round-to-nearest's key names the plan and weights; a calibrated quantizer's adds itself and the calibration
    tokens' hash (round-to-nearest keys stay what they were)."""
    extra = {} if quantizer == "rtn" else {"quantizer": quantizer, "calibration": calibration}
    return content_key("quantize", plan=plan_id, content=model.content_hash, code=CODE, **extra)


def evaluate_key(artifact: ArtifactResult, options: EvalOptions) -> str:
    return content_key("evaluate", artifact=artifact.key, options=_options_json(options))


def publish_key(evaluation: EvalResult, store: str) -> str:
    return content_key("publish", evaluation=evaluation.key, store=store)


def _options_json(options: EvalOptions) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(options).items()}

