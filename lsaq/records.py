"""Versioned JSON records and atomic file output.

Every result lsaq writes (importance, plan, report) is a JSON object with a ``schema`` name and an integer
``version``. Writers go through :func:`atomic_write_json`/:func:`atomic_dir`, so a failed or interrupted command
never leaves a half-written file visible under the final name.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, TypeVar

from lsaq.atomic import temp_dir, temp_file, umask

T = TypeVar("T")


class RecordError(ValueError):
    """A JSON record is missing, corrupt, of the wrong schema, or of an unsupported version."""


def canonical_json(obj: Any) -> bytes:
    """Deterministic JSON bytes (sorted keys, no whitespace): the input of content hashes."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """sha256 of a file's bytes, streamed in 4 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to a temporary file beside ``path`` and rename it into place."""
    path = Path(path)
    tmp = temp_file(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented JSON, atomically."""
    return atomic_write_bytes(path, (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode())


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory beside ``path``; on success it replaces ``path``, on error it is removed (and
    after a kill, by the next :func:`atomic_dir` of ``path``: :mod:`lsaq.atomic`)."""
    path = Path(path)
    tmp = temp_dir(path)
    try:
        yield tmp
        for f in tmp.rglob("*"):  # writers that go through a private temporary file (safetensors) leave 0600
            if f.is_file() and not f.is_symlink():
                f.chmod(0o666 & ~umask())
        if path.exists() or path.is_symlink():
            folder = path.is_dir() and not path.is_symlink()
            old = temp_dir(path) if folder else temp_file(path)  # the old contents go aside, then away
            os.replace(path, old)
            os.replace(tmp, path)
            if folder:
                shutil.rmtree(old, ignore_errors=True)
            else:
                old.unlink()
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def parse_record(data: bytes | str, where: str, schema: str, max_version: int) -> dict[str, Any]:
    """A JSON record's object from its bytes, its ``schema`` and ``version`` checked; :class:`RecordError` (naming
    ``where`` it came from: a path, a store URI) otherwise."""
    try:
        obj = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RecordError(f"{where}: not valid JSON ({e})") from None
    if not isinstance(obj, dict) or obj.get("schema") != schema:
        found = obj.get("schema") if isinstance(obj, dict) else type(obj).__name__
        raise RecordError(f"{where}: expected a {schema!r} record, found schema {found!r}")
    version = obj.get("version")
    if not isinstance(version, int) or not 1 <= version <= max_version:
        raise RecordError(f"{where}: {schema} version {version!r} is not supported (supported: 1..{max_version})")
    return obj


def decode_record(obj: Mapping[str, Any], from_json: Callable[[Mapping[str, Any]], T], where: str, what: str) -> T:
    """``from_json(obj)``; a record whose fields are missing or of the wrong type or value is a :class:`RecordError`
    naming ``where`` it came from and ``what`` it should have been."""
    try:
        return from_json(obj)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise RecordError(f"{where}: malformed {what} ({type(e).__name__}: {e})") from e


def read_record(path: str | os.PathLike, schema: str, max_version: int) -> dict[str, Any]:
    """Load a JSON record and check its ``schema`` and ``version``; raise :class:`RecordError` otherwise."""
    path = Path(path)
    if not path.is_file():
        raise RecordError(f"{path}: no such file")
    return parse_record(path.read_bytes(), str(path), schema, max_version)


def read_jsonl(path: str | os.PathLike) -> list[tuple[int, dict[str, Any]]]:
    """``(line number, object)`` for every non-blank line of a JSON Lines file; each line must be a JSON object."""
    path = Path(path)
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not valid JSON ({e})") from e
        if not isinstance(row, dict):
            raise ValueError(f"{path}:{n}: expected a JSON object, got {type(row).__name__}")
        rows.append((n, row))
    return rows
