"""Where lsaq keeps and finds files: its cache, and the shared folder of local models and corpora."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """lsaq's cache root: ``$LSAQ_CACHE``, else ``$XDG_CACHE_HOME/lsaq``, else ``~/.cache/lsaq``."""
    if env := os.environ.get("LSAQ_CACHE"):
        return Path(env).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")).expanduser() / "lsaq"


def shared_dir() -> Path | None:
    """The shared material folder: ``$LSAQ_SHARED``, else ``../shared`` beside the working directory or repo.

    When ``LSAQ_SHARED`` is set it is the only place looked at (an empty or missing folder means "no local
    corpus"), so a run can be made independent of whatever lies beside the checkout.
    """
    if env := os.environ.get("LSAQ_SHARED"):
        path = Path(env).expanduser()
        return path if path.is_dir() else None
    for c in (Path.cwd().parent / "shared", Path(__file__).resolve().parents[2] / "shared"):
        if c.is_dir():
            return c
    return None
