"""Checking a build directory against its manifest: every file present, of its recorded size and sha256, every
weights file whole. Torch-free, so a GGUF build is checked and run without the numeric stack in the process."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

from lsaq.quantization.record import (GGUF_REQUIRED, GGUF_WEIGHTS, MANIFEST, REQUIRED, SCHEMA, VERSION, WEIGHTS,
                                      WEIGHTS_INDEX)
from lsaq.records import file_sha256, read_record


class ArtifactError(ValueError):
    """An artifact directory is incomplete, truncated, corrupted or inconsistent with its plan."""


def _check_safetensors(path: Path) -> None:
    """Header sanity and exact size: a truncated file is named as such before any tensor is read."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ArtifactError(f"{path}: truncated ({size} bytes, not even a safetensors header)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise ArtifactError(f"{path}: corrupted or truncated safetensors header (claims {n} bytes, file has "
                                f"{size})")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ArtifactError(f"{path}: corrupted safetensors header ({e})") from e
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end != size:
        raise ArtifactError(f"{path}: truncated or padded: header describes {8 + n + end} bytes, file has {size}")


def verify_artifact(path: str | Path, *, checksums: bool = True) -> dict[str, Any]:
    """Check that every file is present, has its recorded size and (optionally) sha256, that every weights file is a
    whole safetensors file and a sharded artifact's index maps exactly its shards' tensors; return the manifest."""
    path = Path(path)
    if not path.is_dir():
        raise ArtifactError(f"{path}: not an artifact directory (no such directory)")
    if (path / GGUF_WEIGHTS).is_file():  # a GGUF build: one file for llama.cpp
        missing = [f for f in GGUF_REQUIRED if not (path / f).is_file()]
    else:
        missing = [f for f in REQUIRED if not (path / f).is_file()]
        if not (path / WEIGHTS).is_file() and not (path / WEIGHTS_INDEX).is_file():
            missing.insert(1, WEIGHTS)
    if missing:
        raise ArtifactError(f"{path}: incomplete artifact, missing {', '.join(missing)}")
    try:
        manifest = read_record(path / MANIFEST, SCHEMA, VERSION)
    except ValueError as e:
        raise ArtifactError(str(e)) from e
    for name, meta in manifest["files"].items():
        f = path / name
        if not f.is_file():
            raise ArtifactError(f"{path}: incomplete artifact, missing {name}")
        if f.stat().st_size != meta["bytes"]:
            raise ArtifactError(f"{f}: size {f.stat().st_size} differs from the recorded {meta['bytes']} (truncated?)")
    for name in sorted(n for n in manifest["files"] if n.endswith(".safetensors")):
        _check_safetensors(path / name)
    if (path / WEIGHTS_INDEX).is_file():
        from lsaq.engine.checkpoint import read_index  # torch: only for a sharded compressed-tensors build

        try:
            read_index(path / WEIGHTS_INDEX)
        except ValueError as e:
            raise ArtifactError(str(e)) from e
    if checksums:
        for name, meta in manifest["files"].items():
            if file_sha256(path / name) != meta["sha256"]:
                raise ArtifactError(f"{path / name}: sha256 differs from the manifest (corrupted file)")
    return manifest


__all__ = ["ArtifactError", "verify_artifact"]
