"""Which files hold a model's weights, and their content hash: torch-free, so that identity checks (the pipeline's
keys, the watch flow's revision check) never load the numeric stack.

A model is a ``.gguf`` file, an HF directory of ``*.safetensors`` (only safetensors are loaded), or a directory
holding exactly one ``.gguf``. Its content hash is the sha256 of its one weights file, or the sha256 over the
per-file sha256s in name order; per-file hashes are cached by (path, size, mtime) in ``<lsaq cache>/hashes.json``.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

from lsaq.paths import cache_dir
from lsaq.records import atomic_write_json, canonical_json, file_sha256, sha256_hex

log = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors",)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def is_hub_id(s: str) -> bool:
    """``org/name`` with no leading ``.``/``/``/``~`` and no ``.gguf`` suffix: worth asking the hub."""
    return bool(_HUB_ID.match(s)) and not s.endswith(".gguf")


def weight_files(path: Path) -> tuple[Path, list[Path]]:
    """``(the weights' source, its weight files)`` of a local model: a ``.gguf`` file is its own source; a directory
    of safetensors is the source of those files; a directory with no safetensors and exactly one ``.gguf`` has that
    file as its source. ``ValueError`` for anything else."""
    if path.is_file() and path.suffix == ".gguf":
        return path, [path]
    if path.is_dir():
        weights = sorted(p for p in path.iterdir() if p.suffix in WEIGHT_SUFFIXES)
        ggufs = sorted(path.glob("*.gguf"))
        if not weights and len(ggufs) == 1:
            return ggufs[0], ggufs
        if not weights:
            raise ValueError(f"model directory {path} has no *.safetensors weights (only safetensors are loaded)")
        return path, weights
    if path.exists():
        raise ValueError(f"model path {path} is neither a directory nor a .gguf file")
    raise ValueError(f"model path {path} does not exist")


def content_hash(files: list[Path]) -> str:
    """sha256 over the sha256 of each file (by name order). Per-file hashes are cached by (path, size, mtime)."""
    cache_file = cache_dir() / "hashes.json"
    try:
        cache = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        cache = {}
    digests, changed = [], False
    for f in sorted(files, key=lambda p: p.name):
        st = f.stat()
        key = f"{f.resolve()}:{st.st_size}:{st.st_mtime_ns}"
        if key not in cache:
            cache[key], changed = file_sha256(f), True
        digests.append([f.name, cache[key]])
    if changed:
        try:
            atomic_write_json(cache_file, cache)
        except OSError as e:  # a read-only cache only costs speed
            log.warning("could not update hash cache %s: %s", cache_file, e)
    return digests[0][1] if len(digests) == 1 else sha256_hex(canonical_json(digests))
