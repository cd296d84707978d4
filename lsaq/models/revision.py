"""A model's current revision, as the store names it, found without loading (or converting) the model.

The watch flow compares it with the revisions the store has builds of: a hub model's revision is the commit the
hub serves now (one metadata request), a local model's is ``sha256-`` and 16 hex digits of its weights' content
hash (:mod:`lsaq.models.weights`). The store keys (:mod:`lsaq.store.keys`) come from the same
:class:`~lsaq.models.identity.ModelRef`, so a build of this revision is found under exactly these segments.
"""

from __future__ import annotations

from pathlib import Path

from lsaq.models.identity import ModelRef
from lsaq.models.weights import content_hash, is_hub_id, weight_files


class ModelUnreachableError(ValueError):
    """The model's current revision cannot be found (a missing path, the hub unreachable or not knowing it)."""


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


def current_revision(model: str | None, *, revision: str | None = None, timeout: float = 10.0) -> ModelRef:
    """``model``'s revision now, as the reference store keys are made from: a local path (``.gguf`` or directory)
    by content hash, a hub id by the commit the hub serves (``revision``: a branch, tag or commit; default the main
    branch; it becomes the reference's ``revision``), None the default model.
    :class:`ModelUnreachableError` when it cannot be told."""
    if model is not None and not Path(model).expanduser().exists() and is_hub_id(model):
        commit = hub_commit(model, revision, timeout)
        return ModelRef(id=model, model_type="?", num_layers=0, revision=commit)
    try:
        if model is None:
            from lsaq.models.default import default_model_path

            path = default_model_path()
        else:
            path = Path(model).expanduser()
        source, files = weight_files(path)
    except (RuntimeError, ValueError) as e:  # the default model not fetchable; a missing or unusable path
        raise ModelUnreachableError(f"{model or 'the default model'}: {e}") from e
    return ModelRef(id=model or "default", model_type="?", num_layers=0, source=str(source),
                    content_hash=content_hash(files))
