"""A safetensors checkpoint written one tensor at a time, in shards of a bounded size, with transformers' names.

:class:`ShardWriter` never holds more than the tensor being added: each tensor's bytes go to the current shard's
spool file on arrival; when the shard is full (the next tensor would pass ``max_shard_bytes``) it is finished:
its header, then its tensors copied from the spool in safetensors' own order (descending dtype alignment, then
name). The result is byte for byte what ``safetensors.torch.save_file`` writes for the same tensors and metadata.

Shards are assigned as ``huggingface_hub.split_torch_state_dict_into_shards`` does (in arrival order, a new shard
when the next tensor would pass the bound, a larger tensor alone in its own shard). One shard is
``model.safetensors``; several are ``model-0000i-of-0000N.safetensors`` with ``model.safetensors.index.json``
(``{"metadata": {"total_size": ...}, "weight_map": {...}}``, sorted, as transformers writes it).
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import torch

from lsaq.engine.checkpoint import INDEX, SINGLE

DEFAULT_MAX_SHARD_BYTES = 50 * 10**9  # transformers' save_pretrained default, "50GB"
_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}
# safetensors' data order: dtypes in descending order of its Rust enum (BOOL < U8 < I8 < I16 < F16 < BF16 < I32 <
# F32 < F64 < I64), then names bytewise
_ORDER = {code: rank for rank, code in
          enumerate(("BOOL", "U8", "I8", "I16", "F16", "BF16", "I32", "F32", "F64", "I64"))}
_COPY_CHUNK = 64 * 2**20


@dataclass
class _Shard:
    """Tensors spooled for one shard: name -> (dtype code, shape, offset in the spool, bytes)."""

    spool: Path
    file: BinaryIO
    entries: dict[str, tuple[str, list[int], int, int]] = field(default_factory=dict)
    size: int = 0


def shard_name(index: int, count: int) -> str:
    """transformers' name of shard ``index`` (0-based) of ``count``."""
    return SINGLE if count == 1 else f"model-{index + 1:05d}-of-{count:05d}.safetensors"


class ShardWriter:
    """Writes tensors into ``directory`` (which must exist) as a checkpoint of shards of at most
    ``max_shard_bytes`` tensor bytes each (one larger tensor gets a shard of its own).

    Use: ``add(name, tensor)`` for every tensor, then :meth:`finish` (the file names written). Until
    ``finish`` the directory holds spool files; write into a temporary directory that is removed on failure."""

    def __init__(self, directory: str | Path, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                 metadata: dict[str, str] | None = None):
        if not isinstance(max_shard_bytes, int) or isinstance(max_shard_bytes, bool) or max_shard_bytes <= 0:
            raise ValueError(f"max_shard_bytes must be a positive int, got {max_shard_bytes!r}")
        self.directory = Path(directory)
        self.max_shard_bytes = max_shard_bytes
        self.metadata = dict(metadata) if metadata is not None else None
        self._done: list[tuple[Path, list[str]]] = []  # finished shards in order: (file, tensor names)
        self._current: _Shard | None = None
        self._spools = 0
        self._names: set[str] = set()
        self.total_bytes = 0

    @property
    def written(self) -> frozenset[str]:
        """The names of the tensors added so far."""
        return frozenset(self._names)

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Append ``tensor`` (any dtype safetensors stores, on any device) under ``name``."""
        if name in self._names:
            raise ValueError(f"tensor {name!r} added twice")
        if tensor.dtype not in _DTYPES:
            raise ValueError(f"tensor {name!r}: dtype {tensor.dtype} cannot be stored; valid: "
                             f"{', '.join(str(d).removeprefix('torch.') for d in _DTYPES)}")
        nbytes = tensor.numel() * tensor.element_size()
        self._names.add(name)
        self.total_bytes += nbytes
        if nbytes > self.max_shard_bytes:  # a shard of its own, finished now; the current shard stays open
            alone = self._spool()
            self._append(alone, name, tensor, nbytes)
            self._finish_shard(alone)
            return
        if self._current is not None and self._current.size + nbytes > self.max_shard_bytes:
            self._finish_shard(self._current)
            self._current = None
        if self._current is None:
            self._current = self._spool()
        self._append(self._current, name, tensor, nbytes)

    def _spool(self) -> _Shard:
        path = self.directory / f".spool-{self._spools:05d}"
        self._spools += 1
        return _Shard(path, open(path, "wb"))

    @staticmethod
    def _append(shard: _Shard, name: str, tensor: torch.Tensor, nbytes: int) -> None:
        data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()  # little-endian bytes
        shard.file.write(memoryview(data))
        shard.entries[name] = (_DTYPES[tensor.dtype], list(tensor.shape), shard.size, nbytes)
        shard.size += nbytes

    def finish(self) -> list[str]:
        """Write the last shard, name every shard, write the index when there are several; the file names."""
        if self._current is not None or not self._done:  # no tensor at all: one empty file, as safetensors writes
            self._finish_shard(self._current or self._spool())
            self._current = None
        count = len(self._done)
        names = [shard_name(i, count) for i in range(count)]
        weight_map = {}
        for (file, tensors), final in zip(self._done, names):
            file.rename(self.directory / final)
            weight_map.update({t: final for t in tensors})
        if count > 1:
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
            (self.directory / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
            names.append(INDEX)
        return names

    def _finish_shard(self, shard: _Shard) -> None:
        """Write ``shard``'s file (header, then its tensors in safetensors' order) and drop its spool."""
        shard.file.close()
        order = sorted(shard.entries, key=lambda n: (-_ORDER[shard.entries[n][0]], n.encode()))
        header: dict[str, object] = {} if self.metadata is None else {"__metadata__": self.metadata}
        offset = 0
        for n in order:
            dtype, shape, _, nbytes = shard.entries[n]
            header[n] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        text += b" " * (-len(text) % 8)
        out = self.directory / f".shard-{len(self._done):05d}.safetensors"  # renamed by finish()
        with open(out, "wb") as dst:
            dst.write(struct.pack("<Q", len(text)) + text)
            if shard.entries:
                with open(shard.spool, "rb") as src:
                    for n in order:
                        _, _, start, nbytes = shard.entries[n]
                        _copy_range(src, dst, start, nbytes)
        shard.spool.unlink()
        self._done.append((out, order))


def _copy_range(src, dst, start: int, nbytes: int) -> None:
    """Copy ``nbytes`` of ``src`` from ``start`` to the end of ``dst``, in chunks."""
    src.seek(start)
    while nbytes:
        chunk = src.read(min(nbytes, _COPY_CHUNK))
        if not chunk:
            raise OSError(f"{src.name}: spool ended {nbytes} bytes early")
        dst.write(chunk)
        nbytes -= len(chunk)


__all__ = ["DEFAULT_MAX_SHARD_BYTES", "ShardWriter", "shard_name"]
