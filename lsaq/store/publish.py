"""Publishing an artifact directory as a build: every file first, then the manifest (created only if absent), then
``latest.json``.

Readers see a build only through its manifest, so an interrupted publish leaves nothing visible: its files sit
under a build prefix no manifest names, and a rerun (same files, so the same build id and keys) uploads what is
missing and completes it. The build id is a function of the files' content, so every writer of a key writes the
same bytes; two concurrent publishes of one build both succeed with one manifest. A manifest already under the id
that lists other files is refused before anything is written.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from lsaq.planning.planner import Plan
from lsaq.quantization.record import MANIFEST as ARTIFACT_MANIFEST
from lsaq.quantization.record import PLAN as ARTIFACT_PLAN
from lsaq.quantization.record import Artifact
from lsaq.records import RecordError, file_sha256, read_record
from lsaq.store.backend import Backend, ConflictError, ObjectNotFoundError
from lsaq.store.keys import device_slug, model_slug, plan_key, revision_slug, validate_key
from lsaq.store.manifest import BuildManifest, Latest, build_id, evaluation_summary, record_bytes, utc_now

log = logging.getLogger(__name__)

REPORT_JSON, REPORT_MD, PLOTS = "report.json", "report.md", "plots"
EVAL_REPORT_SCHEMA, EVAL_REPORT_VERSION = "lsaq.eval_report", 1  # lsaq.eval.report's record (read as JSON)


@dataclass(frozen=True)
class Published:
    """The outcome of :func:`publish`: the build's manifest, its URI, and whether this call created it (False: the
    identical build was already there)."""

    manifest: BuildManifest
    uri: str
    created: bool
    uploaded_bytes: int
    seconds: float

    def to_json(self) -> dict[str, Any]:
        return {"uri": self.uri, "created": self.created, "uploaded_bytes": self.uploaded_bytes,
                "seconds": self.seconds, "manifest": self.manifest.to_json()}


def build_files(artifact: Artifact, report: Path | None, plots: Path | None) -> dict[str, Path]:
    """Name within the build -> local file: the artifact's files and manifest, the evaluation report (JSON and its Markdown
    sibling) and the plots (``*.png`` of ``plots``, under ``plots/``)."""
    names = [*artifact.files, ARTIFACT_MANIFEST]  # the artifact's manifest lists every file but itself
    files = {validate_key(name, what="artifact file name"): artifact.path / name for name in names}
    if report is not None:
        files[REPORT_JSON] = report
        if (md := report.with_suffix(".md")).is_file():
            files[REPORT_MD] = md
    if plots is not None:
        for png in sorted(plots.glob("*.png")):
            files[f"{PLOTS}/{validate_key(png.name, what='plot file name')}"] = png
    return files


def hash_files(artifact: Artifact, files: dict[str, Path]) -> dict[str, tuple[int, str]]:
    """Size and sha256 of every file, read from disk; the artifact's own files must match its manifest (a corrupt
    local artifact is refused rather than published)."""
    out = {}
    for name, path in files.items():
        if not path.is_file():
            raise ValueError(f"{path}: missing (listed in {artifact.path / ARTIFACT_MANIFEST})")
        size, sha = path.stat().st_size, file_sha256(path)
        if name in artifact.files and (size, sha) != artifact.files[name]:
            raise ValueError(f"{path}: does not match the artifact's manifest (size {size} vs {artifact.files[name][0]}"
                             f" or sha256 differs); re-run `lsaq quantize`")
        out[name] = (size, sha)
    return out


def read_report(path: Path, plan: Plan) -> dict[str, Any]:
    """An ``lsaq eval`` report of this artifact's plan (refused when it evaluated another plan)."""
    report = read_record(path, EVAL_REPORT_SCHEMA, EVAL_REPORT_VERSION)
    evaluated = (report.get("plan") or {}).get("id")
    if evaluated != plan.id:
        raise ValueError(f"{path}: evaluates plan {str(evaluated)[:12]}, not this artifact's plan {plan.id[:12]}")
    return report


def make_manifest(artifact: Artifact, plan: Plan, files: dict[str, tuple[int, str]],
                  report: dict[str, Any] | None) -> BuildManifest:
    """The manifest of a build of ``artifact`` with ``files`` (its figures from the plan the artifact embeds)."""
    bd = plan.breakdown
    return BuildManifest(
        build_id=build_id(plan.id, files), model_slug=model_slug(artifact.model), revision=revision_slug(artifact.model),
        device_slug=device_slug(plan.device), model=artifact.model, device=plan.device.to_json(), plan_id=plan.id,
        strategy=plan.options.strategy.value, context=plan.options.context, batch=plan.options.batch,
        avg_bits=plan.avg_bits, weights_bytes=bd.weights, required_bytes=bd.required, dtype=artifact.dtype,
        runtimes=artifact.runtimes, files=files, evaluation=evaluation_summary(report) if report else None,
        published_at=utc_now(),
    )


def read_manifest(store: Backend, key: str) -> BuildManifest | None:
    """The manifest under ``key``, or None when there is none; :class:`ConflictError` for one that fails its checks
    (an altered or foreign manifest holds the id: a publish must leave it alone)."""
    try:
        data = store.get_bytes(key)
    except ObjectNotFoundError:
        return None
    try:
        return BuildManifest.parse(data, store.key_uri(key))
    except RecordError as e:
        raise ConflictError(f"{e}; refused, nothing was written") from None


def publish(
    store: Backend,
    artifact_dir: str | Path,
    *,
    report: str | Path | None = None,
    plots: str | Path | None = None,
    progress: Callable[[str, int], None] | None = None,
) -> Published:
    """Publish the artifact directory ``artifact_dir`` to ``store`` as one build.

    ``report``: an ``lsaq eval`` report (``report.json``; its ``.md`` sibling goes along) of this artifact; by
    default the ``report.json`` inside the artifact directory, if any. ``plots``: a folder of ``*.png`` plots; by
    default the artifact's ``plots/`` folder, if any. ``progress(name, bytes)`` is called after each file upload.

    Returns :class:`Published`; publishing an identical build again is a no-op that succeeds (``created`` False,
    ``latest.json`` updated). Raises :class:`~lsaq.store.backend.ConflictError` when another build already has this
    id (nothing is written), ``ValueError`` for a bad artifact or report, and
    :class:`~lsaq.store.backend.StoreError` when the store fails (a rerun completes the build).
    """
    start = time.perf_counter()
    artifact = Artifact.load(artifact_dir)
    plan = Plan.load(artifact.path / ARTIFACT_PLAN)
    if plan.id != artifact.plan_id:
        raise ValueError(f"{artifact.path}: its plan file is plan {plan.id[:12]} but the artifact was made from "
                         f"{artifact.plan_id[:12]}")
    report_path = Path(report) if report is not None else artifact.path / REPORT_JSON
    report_obj = read_report(report_path, plan) if report is not None or report_path.is_file() else None
    plots_dir = Path(plots) if plots is not None else artifact.path / PLOTS
    if plots is not None and not plots_dir.is_dir():
        raise ValueError(f"plots {plots_dir}: no such directory")
    local = build_files(artifact, report_path if report_obj is not None else None,
                        plots_dir if plots_dir.is_dir() else None)
    manifest = make_manifest(artifact, plan, hash_files(artifact, local), report_obj)
    uri = store.key_uri(manifest.prefix) + "/"

    existing = read_manifest(store, manifest.key)
    if existing is not None and not existing.same_content(manifest):
        raise ConflictError(f"{uri}: a different build is already published under id {manifest.build_id}; "
                            "refused, nothing was written")
    uploaded, created = 0, False
    if existing is None:
        for name, path in sorted(local.items(), key=lambda kv: kv[1].stat().st_size):  # small files first
            key, (size, sha) = f"{manifest.prefix}/{name}", manifest.files[name]
            have = store.head(key)
            if have is not None and have.size == size and have.sha256 == sha:
                log.debug("%s already stored", store.key_uri(key))  # left by an interrupted publish
            else:
                store.put_file(key, path, sha256=sha)
                uploaded += size
            if progress is not None:
                progress(name, size)
        # The plan beside the builds, keyed by its id (content): the first copy stays.
        store.create_bytes(plan_key(manifest.model_slug, manifest.revision, plan.id),
                           (artifact.path / ARTIFACT_PLAN).read_bytes())
        created = store.create_bytes(manifest.key, record_bytes(manifest.to_json()))
        if not created:  # a concurrent publisher got there first: fine when it is the same build
            existing = read_manifest(store, manifest.key)
            if existing is None or not existing.same_content(manifest):
                raise ConflictError(f"{uri}: a different build was published under id {manifest.build_id} "
                                    "concurrently; refused")
    store.put_bytes(manifest.latest_key, record_bytes(Latest(manifest.build_id, utc_now()).to_json()))
    seconds = time.perf_counter() - start
    log.debug("%s %s (%d bytes uploaded in %.1fs)", "published" if created else "already published", uri, uploaded,
             seconds)
    return Published(manifest if created else existing, uri, created, uploaded, seconds)
