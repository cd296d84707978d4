"""A Hugging Face checkpoint read one module at a time: ``model.safetensors``, or shards named by
``model.safetensors.index.json``; any 16- or 32-bit float dtype, read memory-mapped.

Opening checks every file's header (a damaged shard or index is named before any tensor is read) and that the
index's shards hold exactly the tensors it maps to them; :meth:`Checkpoint.read` then reads the tensors asked for
and nothing else, in the dtype asked for.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lsaq.models.weights import safetensors_names

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
FLOATS = (torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class Checkpoint:
    """``weight_map``: every tensor name -> the file holding it; ``config``: the directory's ``config.json``."""

    path: Path
    config: dict[str, Any]
    weight_map: dict[str, Path]

    @classmethod
    def open(cls, path: str | Path) -> "Checkpoint":
        """The checkpoint in directory ``path``; ``ValueError`` naming the file when one is missing or damaged."""
        path = Path(path)
        config_file = path / "config.json"
        if not config_file.is_file():
            raise ValueError(f"model directory {path} has no config.json")
        try:
            config = json.loads(config_file.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{config_file}: not valid JSON ({e})") from e
        if (path / INDEX).is_file():
            weight_map = read_index(path / INDEX)
        elif (path / SINGLE).is_file():
            weight_map = {name: path / SINGLE for name in safetensors_names(path / SINGLE)}
        else:
            raise ValueError(f"model directory {path} has neither {SINGLE} nor {INDEX}")
        return cls(path, config, weight_map)

    def names(self, prefix: str = "") -> list[str]:
        """The tensor names starting with ``prefix``, sorted."""
        return sorted(n for n in self.weight_map if n.startswith(prefix))

    def read(self, names: list[str], dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """The tensors ``names`` (float ones as ``dtype``; None: as stored), each shard opened once."""
        from safetensors import safe_open

        by_file: dict[Path, list[str]] = {}
        for n in names:
            by_file.setdefault(self.weight_map[n], []).append(n)
        out: dict[str, torch.Tensor] = {}
        for file, in_file in by_file.items():
            with safe_open(str(file), framework="pt") as f:
                for n in in_file:
                    t = f.get_tensor(n)
                    out[n] = t.to(dtype) if dtype is not None and t.dtype in FLOATS else t
        return out


def read_index(index: Path) -> dict[str, Path]:
    """``weight_map`` of a sharded checkpoint's index, resolved to files and checked against each shard's header:
    every shard exists and is whole, and holds exactly the tensors the index maps to it."""
    try:
        obj = json.loads(index.read_text())
        raw = obj["weight_map"]
        if not isinstance(raw, dict) or not raw or not all(isinstance(v, str) for v in raw.values()):
            raise TypeError("weight_map must map tensor names to shard file names")
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{index}: not a safetensors index ({type(e).__name__}: {e})") from e
    shards: dict[str, set[str]] = {}
    for name, shard in raw.items():
        if Path(shard).name != shard:
            raise ValueError(f"{index}: shard {shard!r} of {name!r} is not a file name in the index's directory")
        shards.setdefault(shard, set()).add(name)
    for shard, mapped in sorted(shards.items()):
        file = index.parent / shard
        if not file.is_file():
            raise ValueError(f"{index}: shard {shard} (holding {sorted(mapped)[0]!r}) does not exist")
        held = set(safetensors_names(file))
        if held != mapped:
            missing, extra = sorted(mapped - held), sorted(held - mapped)
            what = f"lacks {missing[0]!r}" if missing else f"holds {extra[0]!r}, which the index maps elsewhere"
            raise ValueError(f"{file}: does not match {index.name}: it {what}")
    return {name: index.parent / shard for name, shard in raw.items()}
