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
    file as its source. ``ValueError`` for anything else. The files are listed, not read: identity checks hash them,
    :func:`check_weights_file` checks them before a load."""
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


def check_model_spec(spec: str) -> None:
    """Cheap checks of a model as a user names it, before any work, in the order loading meets them: a local path
    must be a checkpoint (a ``config.json`` of a supported family beside safetensors) whose weights files are whole
    (:func:`check_weights_file`). A hub id is the hub's to resolve. ``ValueError`` naming what is wrong."""
    from lsaq.models.families import family

    path = Path(spec).expanduser()
    if not path.exists() and is_hub_id(spec):
        return
    source, files = weight_files(path)
    if source.suffix != ".gguf":
        config = source / "config.json"
        if not config.is_file():
            raise ValueError(f"model directory {source} has no config.json")
        try:
            model_type = json.loads(config.read_text()).get("model_type", "?")
        except (ValueError, AttributeError) as e:
            raise ValueError(f"{config}: not a JSON object ({e})") from None
        family(str(model_type), f" in {config}")
    for f in files:
        check_weights_file(f)


def check_weights_file(path: Path) -> Path:
    """``path`` after checking that it is a whole safetensors or GGUF file, from its header alone (no tensor is
    read); ``ValueError`` naming the file and what is wrong: truncated, a bad header, sizes that do not match."""
    if path.suffix == ".gguf":
        _check_gguf(path)
    else:
        _check_safetensors(path)
    return path


# safetensors refuses headers over 100 MB; a length beyond that is a damaged or foreign file
_MAX_SAFETENSORS_HEADER = 100_000_000


def safetensors_names(path: Path) -> list[str]:
    """The tensor names a safetensors file holds, after the checks of :func:`check_weights_file`."""
    return _check_safetensors(path)


def _check_safetensors(path: Path) -> list[str]:
    """The layout: an 8-byte little-endian header length N, N bytes of JSON naming each tensor's ``data_offsets``,
    then exactly the bytes those offsets cover. Returns the tensor names."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{path}: truncated or not a safetensors file ({size} bytes, less than the 8-byte "
                             f"header length field)")
        n = int.from_bytes(head, "little")
        if n > min(size - 8, _MAX_SAFETENSORS_HEADER):
            raise ValueError(f"{path}: truncated or not a safetensors file ({size} bytes; its header length field "
                             f"says {n} bytes of header)")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"{path}: bad safetensors header: not JSON ({e})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: bad safetensors header: a {type(header).__name__}, not a mapping of tensors")
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
                and 0 <= offsets[0] <= offsets[1]):
            raise ValueError(f"{path}: bad safetensors header: tensor {name!r} has no valid data_offsets")
        end = max(end, offsets[1])
    data = size - 8 - n
    if end != data:
        what = "truncated" if end > data else "size mismatch"
        raise ValueError(f"{path}: {what}: its header describes {end} bytes of tensor data, the file holds {data}")
    return [name for name in header if name != "__metadata__"]


# GGUF value types (gguf.constants.GGUFValueType) of fixed size -> bytes; 8 is a string, 9 an array
_GGUF_SCALAR = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


def _check_gguf(path: Path) -> None:
    """Walk the header (key-value pairs, then the tensor table) and check that the file holds every tensor's bytes:
    GGUF v2/v3 little-endian, tensor sizes from gguf's own block table. Tens of milliseconds; no data is read."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    size = path.stat().st_size
    with open(path, "rb") as f:

        def take(n: int) -> bytes:
            b = f.read(n)
            if len(b) != n:
                raise ValueError(f"{path}: truncated GGUF file: its header runs past the end ({size} bytes)")
            return b

        def u(n: int) -> int:
            return int.from_bytes(take(n), "little")

        def skip_value(kind: int) -> None:
            if kind in _GGUF_SCALAR:
                take(_GGUF_SCALAR[kind])
            elif kind == 8:
                take(u(8))
            elif kind == 9:
                item, count = u(4), u(8)
                if item in _GGUF_SCALAR:
                    take(_GGUF_SCALAR[item] * count)
                else:
                    for _ in range(count):
                        skip_value(item)
            else:
                raise ValueError(f"{path}: bad GGUF header: unknown value type {kind}")

        magic = f.read(4)
        if magic != b"GGUF":
            raise ValueError(f"{path}: not a GGUF file (it starts with {magic!r}, not b'GGUF')")
        version, n_tensors, n_kv = u(4), u(8), u(8)
        if version not in (2, 3) or n_tensors > 1 << 24 or n_kv > 1 << 24:
            raise ValueError(f"{path}: bad GGUF header (version {version}, {n_tensors} tensors, {n_kv} keys)")
        alignment = 32
        for _ in range(n_kv):
            key = take(u(8))
            kind = u(4)
            if key == b"general.alignment" and kind == 4:
                alignment = u(4)
            else:
                skip_value(kind)
        end = 0
        for _ in range(n_tensors):
            name = take(u(8)).decode("utf-8", "replace")
            dims = [u(8) for _ in range(u(4))]
            kind, offset = u(4), u(8)
            try:
                block, nbytes = GGML_QUANT_SIZES[GGMLQuantizationType(kind)]
            except (ValueError, KeyError):
                raise ValueError(f"{path}: bad GGUF header: tensor {name!r} has unknown type {kind}") from None
            count = 1
            for d in dims:
                count *= d
            end = max(end, offset + count // block * nbytes)
        start = -(-f.tell() // alignment) * alignment  # tensor data begins at the next multiple of the alignment
    if start + end > size:
        raise ValueError(f"{path}: truncated GGUF file: its tensors need {start + end} bytes, the file has {size}")


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
