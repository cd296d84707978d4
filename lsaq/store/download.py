"""Finding builds (through their manifests only) and downloading one, verified, into a directory.

A download fetches every file the manifest lists into a temporary directory beside the destination, checks each
file's size and sha256, writes the manifest beside them (``manifest.json``, as ``aws s3 cp --recursive`` of the
build would) and only then renames the directory into place: a mismatch names the file and leaves nothing at the
destination.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from lsaq.records import RecordError, atomic_dir, atomic_write_bytes, file_sha256
from lsaq.store.backend import Backend, ObjectNotFoundError, VerificationError
from lsaq.store.keys import (
    MANIFEST,
    BadKeyError,
    latest_key,
    looks_like_path,
    parse_build_manifest_key,
    slugify,
    validate_key,
)
from lsaq.store.manifest import BuildManifest, Latest, record_bytes

log = logging.getLogger(__name__)


def model_matches(manifest: BuildManifest, query: str) -> bool:
    """Whether ``query`` names the manifest's model: its slug, its recorded id (``default`` for the embedded default
    model), or a name that slugs to it (a hub id, a weights file or folder)."""
    if query in (manifest.model_slug, manifest.model.id):
        return True
    try:
        return manifest.model_slug == slugify(Path(query).stem if query.endswith(".gguf") else Path(query).name
                                              if looks_like_path(query) else query)
    except BadKeyError:
        return False


def device_matches(manifest: BuildManifest, query: str) -> bool:
    """Whether ``query`` names the manifest's device: its slug or its profile name."""
    if query == manifest.device_slug:
        return True
    if manifest.device.get("origin") == "--budget":  # every budget is named "budget": only its slug tells them apart
        return False
    if query == manifest.device.get("name"):
        return True
    try:
        return slugify(query) == manifest.device_slug
    except BadKeyError:
        return False


def list_builds(store: Backend, *, model: str | None = None, device: str | None = None,
                build: str | None = None) -> list[BuildManifest]:
    """Every complete build (one with a manifest) in ``store``, newest first; filtered by model (slug, id or path),
    device (slug or profile name) and build id when given. A manifest that fails its checks is skipped with a
    warning (it is not a usable build)."""
    out = []
    for key in store.list(""):
        parsed = parse_build_manifest_key(key)
        if parsed is None or (build is not None and parsed[3] != build):
            continue
        try:
            manifest = BuildManifest.parse(store.get_bytes(key), store.key_uri(key))
        except ObjectNotFoundError:
            continue  # deleted since the listing
        except RecordError as e:
            log.warning("skipping %s", e)
            continue
        if (manifest.model_slug, manifest.revision, manifest.device_slug, manifest.build_id) != parsed:
            log.warning("skipping %s: it describes %s", store.key_uri(key), manifest.prefix)
            continue
        if (model is None or model_matches(manifest, model)) and (device is None or device_matches(manifest, device)):
            out.append(manifest)
    return sorted(out, key=lambda m: (m.published_at, m.build_id), reverse=True)


def read_latest(store: Backend, model_slug: str, revision: str, device: str) -> Latest | None:
    key = latest_key(model_slug, revision, device)
    try:
        return Latest.parse(store.get_bytes(key), store.key_uri(key))
    except ObjectNotFoundError:
        return None
    except RecordError as e:
        log.warning("ignoring %s", e)
        return None


def choose_build(store: Backend, *, model: str | None = None, device: str | None = None,
                 build: str | None = None) -> BuildManifest:
    """The build to download: ``build`` when given (it must match the filters), else the latest complete build.

    The latest of a (model, revision, device) is the one its ``latest.json`` names when that build is complete, else
    its newest manifest; across revisions or devices, the most recently updated wins.
    """
    found = list_builds(store, model=model, device=device, build=build)
    what = ", ".join(f"{k} {v}" for k, v in (("model", model), ("device", device), ("build", build)) if v)
    if not found:
        raise ObjectNotFoundError(f"{store.uri}: no complete build" + (f" for {what}" if what else "")
                                  + " (see `lsaq ls`)")
    if build is not None:
        if len(found) > 1:
            raise ValueError(f"build {build} is published for several models or devices; give --model and --device")
        return found[0]
    candidates = []
    for group in sorted({(m.model_slug, m.revision, m.device_slug) for m in found}):
        builds = [m for m in found if (m.model_slug, m.revision, m.device_slug) == group]
        latest = read_latest(store, *group)
        named = [m for m in builds if latest is not None and m.build_id == latest.build_id]
        pick = named[0] if named else builds[0]
        candidates.append((latest.updated_at if named else pick.published_at, pick))
    return max(candidates, key=lambda c: (c[0], c[1].published_at))[1]


@dataclass(frozen=True)
class Downloaded:
    """The outcome of :func:`download`: the build and where its verified files are."""

    manifest: BuildManifest
    path: Path
    seconds: float

    def to_json(self) -> dict[str, Any]:
        return {"path": str(self.path), "seconds": self.seconds, "manifest": self.manifest.to_json()}


def download(
    store: Backend,
    dest: str | Path,
    *,
    model: str | None = None,
    device: str | None = None,
    build: str | None = None,
    force: bool = False,
    progress: Callable[[str, int], None] | None = None,
) -> Downloaded:
    """Download a build (``build``, else the latest complete one matching ``model``/``device``) into ``dest``.

    Every file is checked against the manifest (size, then sha256) in a temporary directory beside ``dest``, which
    replaces ``dest`` only when all match. ``dest`` must not exist or be empty, unless ``force`` (then it is
    replaced). :class:`~lsaq.store.backend.VerificationError` names a file that does not match; nothing is left at
    ``dest`` then (nor beside it).
    """
    start = time.perf_counter()
    dest = Path(dest)
    if dest.exists() and not force and (not dest.is_dir() or any(dest.iterdir())):
        raise ValueError(f"{dest}: exists and is not empty; choose another directory or replace it (force / --force)")
    manifest = choose_build(store, model=model, device=device, build=build)
    with atomic_dir(dest) as tmp:
        for name, (size, sha) in sorted(manifest.files.items()):
            key = f"{manifest.prefix}/{validate_key(name, what='file name')}"
            target = tmp / name
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                store.get_file(key, target)
            except ObjectNotFoundError:
                raise VerificationError(f"{name}: listed in the manifest but missing from the store "
                                        f"({store.key_uri(key)})") from None
            got = target.stat().st_size
            if got != size:
                raise VerificationError(f"{name}: {got} bytes in the store, the manifest says {size} (truncated or "
                                        f"replaced: {store.key_uri(key)}); nothing was written to {dest}")
            if file_sha256(target) != sha:
                raise VerificationError(f"{name}: sha256 differs from the manifest (corrupted: {store.key_uri(key)}); "
                                        f"nothing was written to {dest}")
            if progress is not None:
                progress(name, size)
        atomic_write_bytes(tmp / MANIFEST, record_bytes(manifest.to_json()))
    seconds = time.perf_counter() - start
    log.debug("downloaded %s into %s (%d bytes, verified) in %.1fs", store.key_uri(manifest.prefix), dest,
             manifest.file_bytes, seconds)
    return Downloaded(manifest, dest, seconds)
