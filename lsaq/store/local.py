"""The local-directory backend: keys are files under a root directory.

Writes go to a hidden temporary file beside the target (``.NAME.lsaq-HOST-PID-XXXX.tmp``, never a valid key, so
never listed) and are renamed into place, so a reader sees a whole file or none; one a killed writer left is
removed by the next write of the same key (:mod:`lsaq.atomic`). Create-if-absent is a hard link of such a
temporary file to the final name: ``link(2)`` fails with ``EEXIST`` when the name is taken, atomically, also
between processes and over NFS, and the content is complete before the name appears.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Iterator

from lsaq.atomic import temp_file
from lsaq.store.backend import ObjectInfo, ObjectNotFoundError, StoreError
from lsaq.store.keys import validate_key


class LocalBackend:
    """A store in the directory ``root`` (created on the first write)."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(os.path.abspath(Path(root).expanduser()))  # absolute, `x/../y` read as `y`
        if self.root.exists() and not self.root.is_dir():
            raise ValueError(f"store {self.root}: exists and is not a directory")

    def __repr__(self) -> str:
        return f"LocalBackend({str(self.root)!r})"

    @property
    def uri(self) -> str:
        return str(self.root)

    def key_uri(self, key: str) -> str:
        return str(self.path(key))

    def path(self, key: str) -> Path:
        """The file of ``key``."""
        return self.root / validate_key(key)

    @contextlib.contextmanager
    def _temp_beside(self, target: Path) -> Iterator[Path]:
        """A temporary file in ``target``'s directory, removed on exit unless it was renamed or linked away."""
        tmp = temp_file(target)
        try:
            yield tmp
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)

    def _write(self, tmp: Path, data: bytes | None = None, source: Path | None = None) -> None:
        with open(tmp, "wb") as out:
            if source is not None:
                with open(source, "rb") as src:
                    shutil.copyfileobj(src, out, 1 << 22)
            else:
                out.write(data or b"")
            out.flush()
            os.fsync(out.fileno())

    def put_file(self, key: str, path: Path, *, sha256: str | None = None) -> None:
        target = self.path(key)
        with self._temp_beside(target) as tmp:
            self._write(tmp, source=Path(path))
            os.replace(tmp, target)

    def put_bytes(self, key: str, data: bytes) -> None:
        target = self.path(key)
        with self._temp_beside(target) as tmp:
            self._write(tmp, data=data)
            os.replace(tmp, target)

    def create_bytes(self, key: str, data: bytes) -> bool:
        target = self.path(key)
        with self._temp_beside(target) as tmp:
            self._write(tmp, data=data)
            try:
                os.link(tmp, target)
            except FileExistsError:
                return False
            except OSError as e:  # a file system without hard links cannot give an atomic exclusive create
                raise StoreError(f"{target}: cannot create it exclusively ({e.strerror}); the local store needs "
                                 "a file system with hard links") from e
        return True

    def get_bytes(self, key: str) -> bytes:
        target = self.path(key)
        try:
            return target.read_bytes()
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            raise ObjectNotFoundError(f"{target}: no such object") from None

    def get_file(self, key: str, path: Path) -> None:
        target = self.path(key)
        if not target.is_file():
            raise ObjectNotFoundError(f"{target}: no such object")
        shutil.copyfile(target, path)

    def head(self, key: str) -> ObjectInfo | None:
        target = self.path(key)
        return ObjectInfo(target.stat().st_size) if target.is_file() else None

    def exists(self, key: str) -> bool:
        return self.path(key).is_file()

    def list(self, prefix: str = "") -> list[str]:
        validate_key(prefix, what="prefix", allow_empty=True)
        base = self.root / prefix if prefix else self.root
        if not base.is_dir():
            return []
        out = []
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]  # temporary and foreign hidden folders
            rel = Path(dirpath).relative_to(self.root).as_posix()
            for name in filenames:
                if not name.startswith("."):  # temporary files of writes in progress
                    out.append(name if rel == "." else f"{rel}/{name}")
        return sorted(out)

    def delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path(key).unlink()
