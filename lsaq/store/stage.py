"""The store's public functions: :func:`open_store`, then :func:`publish`, :func:`list_builds`, :func:`download`.

Like the pipeline stages they take small records and paths and return typed records; no Prefect, no torch, no
print. The store is where every result finds a stable home that all machines reach: a local directory (the
default, ``$LSAQ_STORE`` or ``<cache>/store``) or ``s3://bucket/prefix`` on any S3-compatible endpoint.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from lsaq.paths import cache_dir
from lsaq.store.backend import Backend
from lsaq.store.download import Downloaded, download, list_builds
from lsaq.store.local import LocalBackend
from lsaq.store.manifest import BuildManifest
from lsaq.store.publish import Published, publish

__all__ = ["Backend", "BuildManifest", "Downloaded", "Published", "default_store_uri", "download", "list_builds",
           "open_store", "publish"]

STORE_ENV = "LSAQ_STORE"
SCHEMES = ("a local path", "file:///abs/path", "s3://bucket[/prefix]")


def default_store_uri() -> str:
    """``$LSAQ_STORE`` when set, else the local directory ``<lsaq cache>/store``."""
    return os.environ.get(STORE_ENV) or str(cache_dir() / "store")


def open_store(uri: str | Path | None = None, *, endpoint_url: str | None = None, **s3_options: Any) -> Backend:
    """The store at ``uri`` (default :func:`default_store_uri`): a local directory (a path or ``file://`` URI) or
    ``s3://bucket/prefix``.

    S3 only: ``endpoint_url`` (else ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` / the AWS profile, else AWS) and
    ``s3_options`` for :class:`~lsaq.store.s3.S3Backend` (``max_attempts``, ``multipart_threshold``,
    ``multipart_chunksize``, ``max_concurrency``, timeouts). Credentials come from the standard AWS chain.
    """
    text = str(uri if uri is not None else default_store_uri())
    if "://" not in text:
        if endpoint_url is not None or s3_options:
            raise ValueError(f"store {text!r} is a local directory: S3 options (endpoint, retries, ...) do not apply")
        if not text.strip():
            raise ValueError(f"empty store location; give one of: {', '.join(SCHEMES)}")
        return LocalBackend(text)
    parts = urlsplit(text)
    if parts.query or parts.fragment or parts.username or parts.password:
        raise ValueError("a store URI takes no credentials, query or fragment (credentials come from the AWS chain)")
    if parts.scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise ValueError(f"file:// store on host {parts.netloc!r}: only local paths (file:///abs/path)")
        if endpoint_url is not None or s3_options:
            raise ValueError("a file:// store is a local directory: S3 options (endpoint, retries, ...) do not apply")
        return LocalBackend(unquote(parts.path))
    if parts.scheme == "s3":
        from lsaq.store.s3 import S3Backend  # boto3 only when S3 is used

        if not parts.netloc:
            raise ValueError(f"S3 store {text!r} names no bucket; use s3://bucket[/prefix]")
        return S3Backend(parts.netloc, unquote(parts.path).strip("/"), endpoint_url=endpoint_url, **s3_options)
    raise ValueError(f"unknown store scheme {parts.scheme!r} in {text!r}; valid: {', '.join(SCHEMES)}")
