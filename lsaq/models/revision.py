"""A model's current revision, as the store names it, found without loading (or converting) the model.

The watch flow compares it with the revisions the store has builds of: a hub model's revision is the commit the
hub serves now (one metadata request), a local model's is ``sha256-`` and 16 hex digits of its weights' content
hash (:mod:`lsaq.models.weights`). The store keys (:mod:`lsaq.store.keys`) come from the same
:class:`~lsaq.models.identity.ModelRef`, so a build of this revision is found under exactly these segments.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lsaq.models.identity import ModelRef
from lsaq.models.weights import content_hash, is_hub_id, weight_files


class ModelUnreachableError(ValueError):
    """The model's current revision cannot be found (a missing path, the hub unreachable or not knowing it)."""


@dataclass(frozen=True)
class CurrentRevision:
    """What a model is now: ``ref`` (for store keys), and the hub commit or weights hash it came from."""

    model: str | None  # as named; None is the embedded default model
    ref: ModelRef

    @property
    def hub_revision(self) -> str | None:
        return self.ref.revision


def hub_commit(model_id: str, revision: str | None, timeout: float) -> str:
    """The commit the hub serves for ``model_id`` at ``revision`` (default branch when None)."""
    from huggingface_hub import HfApi

    try:
        info = HfApi().model_info(model_id, revision=revision, timeout=timeout)
    except Exception as e:  # hub errors come in many classes; all mean "cannot tell"
        first = str(e).splitlines()[0] if str(e) else "no detail"
        raise ModelUnreachableError(f"model {model_id!r}: the hub did not answer ({type(e).__name__}: {first})") from e
    if not info.sha:
        raise ModelUnreachableError(f"model {model_id!r}: the hub gave no commit for revision {revision or 'main'}")
    return info.sha


def current_revision(model: str | None, *, revision: str | None = None, timeout: float = 10.0) -> CurrentRevision:
    """``model``'s revision now: a local path (``.gguf`` or directory) by content hash, a hub id by the commit the
    hub serves (``revision``: a branch, tag or commit; default the main branch), None the default model.
    :class:`ModelUnreachableError` when it cannot be told."""
    if model is None:
        from lsaq.models.default import default_model_path

        try:
            path = default_model_path()
        except (RuntimeError, ValueError) as e:
            raise ModelUnreachableError(f"the default model: {e}") from e
        source, files = weight_files(path)
        ref = ModelRef(id="default", model_type="?", num_layers=0, source=str(source), content_hash=content_hash(files))
        return CurrentRevision(None, ref)
    path = Path(model).expanduser()
    if path.exists() or not is_hub_id(model):
        try:
            source, files = weight_files(path)
        except ValueError as e:
            raise ModelUnreachableError(str(e)) from e
        ref = ModelRef(id=model, model_type="?", num_layers=0, source=str(source), content_hash=content_hash(files))
        return CurrentRevision(model, ref)
    commit = hub_commit(model, revision, timeout)
    return CurrentRevision(model, ModelRef(id=model, model_type="?", num_layers=0, revision=commit))
