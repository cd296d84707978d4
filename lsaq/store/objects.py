"""Intermediate results in the store: a few files under one prefix, complete once their record file is there.

A pipeline keeps what it computed between stages (a calibration set, an importance record, a plan) in the store,
so every machine sharing the store finds it. The convention mirrors a build's: the data files first, then the
small record file, created only if absent. A reader treats a prefix without its record as absent, so an
interrupted upload is invisible and the next writer completes it; two writers of one content key race harmlessly
(the first record stays, the second writer adopts it).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Mapping, Sequence

from lsaq.records import atomic_dir, file_sha256
from lsaq.store.backend import Backend
from lsaq.store.keys import join, validate_key

log = logging.getLogger(__name__)


def put_files(store: Backend, prefix: str, files: Mapping[str, Path], *, record: str) -> bool:
    """Store ``files`` (name within ``prefix`` -> local file) under ``prefix``, the one named ``record`` last and
    only if absent. True when this call created the record, False when it was already there (the stored copy wins:
    the content is the same by construction of the key)."""
    if record not in files:
        raise ValueError(f"the record file {record!r} is not among the files to store ({', '.join(files)})")
    record_key = join(prefix, validate_key(record, what="file name"))
    if store.exists(record_key):
        return False
    for name, path in sorted(files.items()):
        if name == record:
            continue
        key = join(prefix, validate_key(name, what="file name"))
        size, sha = path.stat().st_size, file_sha256(path)
        have = store.head(key)
        if have is None or have.size != size or (have.sha256 is not None and have.sha256 != sha):
            store.put_file(key, path, sha256=sha)
    created = store.create_bytes(record_key, files[record].read_bytes())
    log.debug("%s %s", "stored" if created else "already stored", store.key_uri(prefix))
    return created


def has_files(store: Backend, prefix: str, *, record: str) -> bool:
    """Whether the result under ``prefix`` is complete (its record file is there)."""
    return store.exists(join(prefix, record))


def fetch_files(store: Backend, prefix: str, names: Sequence[str], dest: str | Path) -> Path:
    """Download ``names`` from under ``prefix`` into the directory ``dest``, replaced as a whole and only once
    every file arrived (:class:`~lsaq.store.backend.ObjectNotFoundError` when one is missing)."""
    dest = Path(dest)
    with atomic_dir(dest) as tmp:
        for name in names:
            store.get_file(join(prefix, validate_key(name, what="file name")), tmp / name)
    return dest
