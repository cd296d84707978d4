"""The contract every store backend keeps (a local directory, an S3-compatible bucket), and the store's errors.

Keys are relative (:func:`lsaq.store.keys.validate_key`, checked by every method); a backend maps them under its
root. Every write is atomic: a reader sees an object whole or not at all. :meth:`Backend.create_bytes` is the one
conditional write (create only if absent), the basis of publishing a build exactly once.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable


class StoreError(RuntimeError):
    """A store operation failed (unreachable endpoint, refused request, missing bucket, ...)."""


class StoreUnavailableError(StoreError):
    """The store could not be reached (connection refused or dropped, timeouts after the bounded retries)."""


class ObjectNotFoundError(StoreError, FileNotFoundError):
    """No object under a key."""


class ConflictError(StoreError):
    """A different build is already published under the same id: refused, nothing overwritten."""


class VerificationError(StoreError):
    """What was read from the store does not match its manifest (size or sha256); the message names the file."""


@dataclass(frozen=True)
class ObjectInfo:
    """An object's size, and the sha256 its writer recorded beside it (None when the backend keeps none)."""

    size: int
    sha256: str | None = None


@runtime_checkable
class Backend(Protocol):
    """Put and get files and bytes, exists, list under a prefix, create-if-absent, delete."""

    @property
    def uri(self) -> str:
        """Where the store is, without credentials: ``/abs/dir`` or ``s3://bucket/prefix``."""

    def key_uri(self, key: str) -> str:
        """The URI of one key (for messages and printed results)."""

    def put_file(self, key: str, path: Path, *, sha256: str | None = None) -> None:
        """Store the file ``path`` under ``key`` (replacing any object), atomically; ``sha256`` is recorded
        beside it when the backend can (see :meth:`head`)."""

    def put_bytes(self, key: str, data: bytes) -> None:
        """Store ``data`` under ``key`` (replacing any object), atomically."""

    def create_bytes(self, key: str, data: bytes) -> bool:
        """Store ``data`` under ``key`` only if no object is there: True when created, False when one existed."""

    def get_bytes(self, key: str) -> bytes:
        """The object's bytes; :class:`ObjectNotFoundError` when absent."""

    def get_file(self, key: str, path: Path) -> None:
        """Write the object into the file ``path`` (its directory exists); :class:`ObjectNotFoundError` when absent."""

    def head(self, key: str) -> ObjectInfo | None:
        """The object's size (and recorded sha256), or None when absent."""

    def exists(self, key: str) -> bool:
        """Whether an object is stored under ``key``."""

    def list(self, prefix: str = "") -> list[str]:
        """Every key under ``prefix`` (a key prefix ending at a segment boundary, or "" for all), sorted."""

    def delete(self, key: str) -> None:
        """Remove the object under ``key``; no error when it is absent."""
