"""Model configs without weights: the shipped ones (``lsaq/data/configs``), a ``config.json``, or a model directory.

Planning needs only a config (every tensor's shape follows from it, see :func:`lsaq.models.families.model_shape`),
so a plan can be made for a model whose weights are not at hand.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class NamedConfig:
    """A HF config dict with the name it was asked for and the file it came from."""

    config: dict[str, Any]
    id: str  # the shipped name (``llama-2-7b``) or the path given
    source: str  # the config file read


def shipped_configs() -> dict[str, Path]:
    """Name -> file of every config shipped with lsaq (published hyperparameters of well-known models)."""
    root = resources.files("lsaq").joinpath("data/configs")
    return {Path(str(f)).stem: Path(str(f)) for f in root.iterdir() if str(f).endswith(".json")}


def load_config(spec: str) -> NamedConfig:
    """A shipped config name, a ``config.json`` path, or a model directory (its ``config.json``)."""
    path = Path(spec).expanduser()
    if path.is_dir():
        path = path / "config.json"
    shipped = shipped_configs()
    named = not path.is_file() and spec in shipped
    if not path.is_file():
        if not named:
            raise ValueError(f"config {spec!r} is neither a file, a model directory nor a shipped config; "
                             f"shipped configs: {', '.join(sorted(shipped))}")
        path = shipped[spec]
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"config {path}: not a readable JSON config ({e})") from e
    if not isinstance(config, dict):
        raise ValueError(f"config {path}: expected a JSON object")
    return NamedConfig(config=config, id=spec if named else str(path), source=str(path))
