"""Where Prefect keeps the pipeline's cache records: in the lsaq store itself, under ``_cache/``.

Prefect finds a cached task run by reading the record stored under its cache key from the task's result
storage. :class:`StoreResults` is that storage, a Prefect block over :func:`lsaq.open_store` (the same local or
boto3 code path as every other store access), so the cache lives with the artifacts: a second machine (another
``PREFECT_HOME``, another server) that shares the store reads the same records and shows the runs ``Cached``.
The block holds only the store's URI; credentials stay in the AWS chain of whichever process reads it.

Only the records of cached results go to the store, under their content keys (``<stage>-<hash>``). Prefect
also writes the exception of every failed task run (and the result of a run without a cache key) under a random
key (a uuid's 32 hex digits) that no later run looks up: those stay in this process's memory, where the flow
that ran the task reads them, so failed runs leave nothing in ``_cache/``.

Two runs of one key on one host compute once: the cache policy is ``SERIALIZABLE`` with a file lock in lsaq's
cache directory (the second run waits, then reads the first one's record). Across hosts the store's
create-if-absent keeps one copy of each result (:func:`lsaq.store.objects.put_files`).
"""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Any, Callable

import anyio.to_thread
from prefect.cache_policies import CacheKeyFnPolicy, CachePolicy
from prefect.filesystems import WritableFileSystem
from prefect.locking.filesystem import FileSystemLockManager

from lsaq.paths import cache_dir
from lsaq.records import sha256_hex
from lsaq.store.backend import Backend, StoreError
from lsaq.store.keys import cache_key
from lsaq.store.stage import open_store

IO_RETRIES = 2  # store uploads and downloads only; numerics never retry
IO_RETRY_DELAY_S = 5
RANDOM_KEY = re.compile(r"[0-9a-f]{32}")  # Prefect's storage key when there is no cache key: uuid4().hex
# Records under a random key (a failed run's exception, an uncached result): read back only in this process.
_UNKEYED: dict[str, bytes] = {}


@functools.lru_cache(maxsize=16)
def backend(uri: str) -> Backend:
    """One opened store per URI and process (boto3 clients are thread-safe and slow to make)."""
    return open_store(uri)


class StoreResults(WritableFileSystem):
    """Prefect result storage in an lsaq store: ``read_path(key)`` reads ``<store>/_cache/<key>``."""

    _block_type_name = "lsaq store results"
    _block_type_slug = "lsaq-store-results"
    _description = "Prefect cache records kept in an lsaq artifact store (a local directory or s3://bucket/prefix)."

    uri: str

    def read_path(self, path: str, _sync: bool | None = None) -> bytes:
        if path in _UNKEYED:
            return _UNKEYED[path]
        return backend(self.uri).get_bytes(cache_key(path))

    def write_path(self, path: str, content: bytes, _sync: bool | None = None) -> str:
        if RANDOM_KEY.fullmatch(path):
            _UNKEYED[path] = content
        else:
            backend(self.uri).put_bytes(cache_key(path), content)
        return path

    async def aread_path(self, path: str) -> bytes:
        return await anyio.to_thread.run_sync(self.read_path, path)

    async def awrite_path(self, path: str, content: bytes) -> str:
        return await anyio.to_thread.run_sync(self.write_path, path, content)


def result_storage(store_uri: str) -> StoreResults:
    """The saved :class:`StoreResults` block of a store (saved on the Prefect server in use, as Prefect requires of
    result storage; named by a hash of the URI, so every run on one store shares it)."""
    block = StoreResults(uri=backend(store_uri).uri)
    block.save(f"lsaq-{sha256_hex(block.uri.encode())[:16]}", overwrite=True)
    return block


def lock_dir() -> Path:
    """This host's lock files for serializable cache transactions (the lock manager creates it when it locks)."""
    return cache_dir() / "locks"


def cache_policy(key_fn: Callable[..., str | None]) -> CachePolicy:
    """A policy keyed by ``key_fn(parameters)`` alone, serializable on this host."""

    def cache_key_fn(_context: Any, parameters: dict[str, Any]) -> str | None:
        return key_fn(**parameters)

    return CacheKeyFnPolicy(cache_key_fn=cache_key_fn).configure(
        isolation_level="SERIALIZABLE", lock_manager=FileSystemLockManager(lock_files_directory=lock_dir()))


def io_failure(_task: Any, _run: Any, state: Any) -> bool:
    """Retry condition: only a store that failed (unreachable, refused); never a numeric or input error."""
    try:
        state.result()
    except (StoreError, ConnectionError, TimeoutError):  # StoreUnavailableError is a StoreError
        return True
    except BaseException:
        return False
    return False
