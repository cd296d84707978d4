"""Store keys: validation, safe slugs, and the layout every backend shares.

A key is a relative, ``/``-separated path under the store's root. :func:`validate_key` refuses anything that could
escape the root or be read two ways: ``..`` and ``.`` segments, absolute paths, empty segments (``a//b``, a
trailing ``/``), backslashes, control characters, segments starting with ``.`` (reserved: the local backend's
temporary files), over-long segments or keys. Model and device names become slugs (:func:`slugify`): lower case
``[a-z0-9._-]``, so a key reads the same on every file system and in every S3 console.

The layout (documented in the README; stable, human-browsable, keyed by content)::

    <root>/<model-slug>/<revision>/calibration/<calibration-key>/{tokens.safetensors, calibration.json}
    <root>/<model-slug>/<revision>/importance/<importance-key>/importance.json
    <root>/<model-slug>/<revision>/plans/<plan-id>.json
    <root>/<model-slug>/<revision>/builds/<device-slug>/<build-id>/<artifact files, report.json/.md, plots/>
    <root>/<model-slug>/<revision>/builds/<device-slug>/<build-id>/manifest.json   (written last: the build exists)
    <root>/<model-slug>/<revision>/builds/<device-slug>/latest.json                (the build published last)

The revision is the hub commit of a hub model, else ``sha256-`` and the first 16 hex digits of the weights'
content hash (the whole hash is in every manifest). Calibration sets and importance records are keyed by what
they are computed from (a hash of the model, the settings and the code version; see ``tasks.keys``), so a pipeline
finds them before computing. ``_cache/`` holds the pipeline's cache records (a slug never starts with ``_``).
"""

from __future__ import annotations

import re
import unicodedata
from pathlib import PurePosixPath

from lsaq.models.identity import ModelRef
from lsaq.planning.devices import DeviceProfile

MAX_KEY_BYTES = 1024  # S3's limit on a key, in UTF-8 bytes
MAX_SEGMENT_BYTES = 255  # the usual file-name limit of local file systems
MAX_SLUG = 96
REVISION_HASH_DIGITS = 16

BUILDS, PLANS, IMPORTANCE, CALIBRATION, ARTIFACTS = "builds", "plans", "importance", "calibration", "artifacts"
CACHE = "_cache"  # the pipeline's cache records (never a slug: slugs start with a letter or digit)
MANIFEST = "manifest.json"
LATEST = "latest.json"

_SLUG_DROP = re.compile(r"[^a-z0-9._-]+")
_HEX = re.compile(r"^[0-9a-f]+$")


class BadKeyError(ValueError):
    """A store key (or a name that becomes one) that is not allowed; the message says which rule it breaks."""


def validate_key(key: str, *, what: str = "key", allow_empty: bool = False) -> str:
    """``key`` itself when it is a valid store key, else :class:`BadKeyError` naming the rule it breaks.

    ``allow_empty``: the empty key (the root) is accepted, as for a listing prefix or an S3 URI without prefix.
    """
    if not isinstance(key, str):
        raise BadKeyError(f"{what} must be a string, got {type(key).__name__}")
    if key == "":
        if allow_empty:
            return key
        raise BadKeyError(f"{what} is empty")
    shown = ascii(key) if len(key) <= 80 else ascii(key[:80]) + "..."
    if any(unicodedata.category(c) == "Cc" for c in key):
        raise BadKeyError(f"{what} {shown} contains a control character")
    if "\\" in key:
        raise BadKeyError(f"{what} {shown} contains a backslash (keys are '/'-separated)")
    if key.startswith("/"):
        raise BadKeyError(f"{what} {shown} is absolute (keys are relative to the store's root)")
    if len(key.encode()) > MAX_KEY_BYTES:
        raise BadKeyError(f"{what} {shown} is {len(key.encode())} bytes long (at most {MAX_KEY_BYTES})")
    for seg in key.split("/"):
        if seg == "":
            raise BadKeyError(f"{what} {shown} has an empty segment ('//' or a trailing '/')")
        if seg in (".", ".."):
            raise BadKeyError(f"{what} {shown} has a {seg!r} segment")
        if seg.startswith("."):
            raise BadKeyError(f"{what} {shown}: segment {seg!r} starts with '.' (reserved for temporary files)")
        if len(seg.encode()) > MAX_SEGMENT_BYTES:
            raise BadKeyError(f"{what} {shown} has a segment of {len(seg.encode())} bytes (at most {MAX_SEGMENT_BYTES})")
    return key


def join(*parts: str) -> str:
    """Keys joined with ``/`` (empty parts skipped), validated."""
    return validate_key("/".join(p for p in parts if p))


def slugify(name: str, *, what: str = "name") -> str:
    """A safe key segment for a model or device name: lower case, runs of other characters become ``-``, and a
    ``/`` (hub ``org/name``) becomes ``--``. ``BadKeyError`` when nothing usable is left."""
    if not isinstance(name, str):
        raise BadKeyError(f"{what} must be a string, got {type(name).__name__}")
    text = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode().lower()
    parts = [_SLUG_DROP.sub("-", p).strip("-._") for p in text.split("/")]
    slug = "--".join(p for p in parts if p)[:MAX_SLUG].strip("-._")
    if not slug:
        raise BadKeyError(f"{what} {name!r} has no letters or digits to make a key of")
    return validate_key(slug, what=what)


def looks_like_path(name: str) -> bool:
    """Whether a model name is a local path (not a hub id ``org/name``)."""
    return name.startswith(("/", ".", "~")) or name.endswith(".gguf") or name.count("/") > 1


def model_slug(model: ModelRef) -> str:
    """The key segment of a model: its hub id (``org--name``) for a hub model, else the name of its local weights
    (file stem or directory name; the embedded default model is named by its GGUF file)."""
    if model.revision is not None and model.id and not looks_like_path(model.id):
        return slugify(model.id, what="model id")
    source = model.source or model.id
    if source and (looks_like_path(source) or model.id in (None, "default")):
        p = PurePosixPath(source.replace("\\", "/"))
        return slugify(p.stem if p.suffix == ".gguf" else p.name, what="model source")
    return slugify(model.name, what="model name")


def revision_slug(model: ModelRef) -> str:
    """The key segment of a model's revision: the hub commit, else ``sha256-`` + 16 hex digits of its weights."""
    if model.revision is not None:
        return slugify(model.revision, what="model revision")
    if model.content_hash is None or not _HEX.match(model.content_hash):
        raise ValueError(f"model {model.name} has neither a hub revision nor a content hash; only artifacts of "
                         "known weights can be stored")
    return f"sha256-{model.content_hash[:REVISION_HASH_DIGITS]}"


def budget_slug(memory: int) -> str:
    """``budget-6gib`` / ``budget-180mib`` / ``budget-123456b``: an explicit budget's pseudo-device, by size."""
    for unit, size in (("tib", 2**40), ("gib", 2**30), ("mib", 2**20), ("kib", 2**10)):
        if memory % size == 0:
            return f"budget-{memory // size}{unit}"
    return f"budget-{memory}b"


def device_slug(device: DeviceProfile) -> str:
    """The key segment of a device: its name as a slug; an explicit budget is named by its size (every budget is
    called ``budget``, and two budgets are two devices)."""
    if device.origin == "--budget":
        return budget_slug(device.memory)
    return slugify(device.name, what="device name")


def model_prefix(model_slug_: str, revision: str) -> str:
    return join(validate_key(model_slug_, what="model slug"), validate_key(revision, what="revision"))


def build_prefix(model_slug_: str, revision: str, device: str, build_id: str) -> str:
    """``<model>/<revision>/builds/<device>/<build-id>``: where a build's files and manifest live."""
    return join(model_prefix(model_slug_, revision), BUILDS, validate_key(device, what="device slug"),
                validate_key(build_id, what="build id"))


def latest_key(model_slug_: str, revision: str, device: str) -> str:
    """``<model>/<revision>/builds/<device>/latest.json``."""
    return join(model_prefix(model_slug_, revision), BUILDS, validate_key(device, what="device slug"), LATEST)


def plan_key(model_slug_: str, revision: str, plan_id: str) -> str:
    """``<model>/<revision>/plans/<plan-id>.json``."""
    return join(model_prefix(model_slug_, revision), PLANS, validate_key(plan_id, what="plan id") + ".json")


def importance_prefix(model_slug_: str, revision: str, importance_key: str) -> str:
    """``<model>/<revision>/importance/<importance-key>``: an importance run's record."""
    return join(model_prefix(model_slug_, revision), IMPORTANCE, validate_key(importance_key, what="importance key"))


def calibration_prefix(model_slug_: str, revision: str, calibration_key: str) -> str:
    """``<model>/<revision>/calibration/<calibration-key>``: a calibration set (tokens and record)."""
    return join(model_prefix(model_slug_, revision), CALIBRATION,
                validate_key(calibration_key, what="calibration key"))


def artifact_prefix(model_slug_: str, revision: str, artifact_key: str) -> str:
    """``<model>/<revision>/artifacts/<quantize-key>``: an artifact kept between stages because re-making it
    elsewhere may not give the same bytes (a calibrated quantizer's floating-point sums)."""
    return join(model_prefix(model_slug_, revision), ARTIFACTS, validate_key(artifact_key, what="artifact key"))


def cache_key(key: str) -> str:
    """``_cache/<key>``: where the pipeline keeps the cache record of a task run."""
    return join(CACHE, validate_key(key, what="cache key"))


def parse_build_manifest_key(key: str) -> tuple[str, str, str, str] | None:
    """``(model, revision, device, build_id)`` of a key ``<m>/<r>/builds/<d>/<b>/manifest.json``, else None."""
    parts = key.split("/")
    if len(parts) == 6 and parts[2] == BUILDS and parts[5] == MANIFEST:
        return parts[0], parts[1], parts[3], parts[4]
    return None
