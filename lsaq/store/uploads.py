"""S3 multipart uploads this machine started, so that those of a killed process are aborted by the next upload.

An object past the multipart threshold goes up as a multipart upload: its parts are stored, and billed, until the
upload is completed or aborted. boto3 aborts it when the transfer fails; a process killed with ``kill -9`` cannot.
So every upload this process creates is written down in lsaq's cache (``<cache>/s3-uploads/<id>.json``: endpoint,
bucket, key, upload id, this machine's tag and process id; no credentials) when S3 answers the
``CreateMultipartUpload``, and crossed out when the transfer returns. Before each upload the store aborts the
uploads whose process no longer runs on this machine (:meth:`UploadRegistry.sweep`), and the uploads of the same key
that any machine started more than :data:`STALE_S` ago (:func:`abandoned`): what another machine left.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from lsaq.atomic import host_tag, running
from lsaq.records import atomic_write_json, sha256_hex

log = logging.getLogger(__name__)

STALE_S = 24 * 3600.0  # an upload of the same key older than this is abandoned, whoever started it


@dataclass(frozen=True)
class Upload:
    """One multipart upload as the registry keeps it."""

    endpoint: str
    bucket: str
    key: str
    upload_id: str
    host: str  # lsaq.atomic.host_tag() of the machine that started it
    pid: int

    @property
    def id(self) -> str:
        return sha256_hex(f"{self.endpoint}\n{self.bucket}\n{self.key}\n{self.upload_id}".encode())[:32]


class UploadRegistry:
    """The uploads of one endpoint's bucket started on this machine, in the folder ``root``."""

    def __init__(self, root: Path, endpoint: str, bucket: str) -> None:
        self.root, self.endpoint, self.bucket = Path(root), endpoint, bucket
        self.written: dict[str, list[Path]] = {}  # key -> the entries this process wrote for it

    def started(self, key: str, upload_id: str) -> None:
        """Write down an upload this process just created."""
        upload = Upload(self.endpoint, self.bucket, key, upload_id, host_tag(), os.getpid())
        file = self.root / f"{upload.id}.json"
        try:
            atomic_write_json(file, asdict(upload))
        except OSError as e:  # a read-only cache only loses the clean-up after a kill
            log.warning("could not record multipart upload of %s in %s: %s", key, self.root, e)
            return
        self.written.setdefault(key, []).append(file)

    def entries(self) -> list[tuple[Path, Upload]]:
        """Every upload written down for this endpoint and bucket (unreadable entries skipped)."""
        out = []
        for file in sorted(self.root.glob("*.json")) if self.root.is_dir() else ():
            try:
                upload = Upload(**json.loads(file.read_text()))
            except (OSError, ValueError, TypeError):
                continue
            if (upload.endpoint, upload.bucket) == (self.endpoint, self.bucket):
                out.append((file, upload))
        return out

    def finished(self, key: str) -> None:
        """Cross out this process's uploads of ``key`` (its transfer returned: completed, or aborted by boto3)."""
        for file in self.written.pop(key, ()):
            with contextlib.suppress(FileNotFoundError):
                file.unlink()

    def sweep(self, abort: Callable[[str, str], None]) -> list[Upload]:
        """Abort (``abort(key, upload_id)``) the uploads of processes of this machine that no longer run, and cross
        them out; returns them."""
        done = []
        for file, upload in self.entries():
            if upload.host == host_tag() and not running(upload.pid):
                abort(upload.key, upload.upload_id)
                with contextlib.suppress(FileNotFoundError):
                    file.unlink()
                done.append(upload)
        return done


def abandoned(listed: Iterable[dict[str, Any]], key: str, now: dt.datetime, stale_s: float = STALE_S) -> list[str]:
    """The upload ids among ``listed`` (``ListMultipartUploads``' ``Uploads``) of exactly ``key`` started more than
    ``stale_s`` seconds before ``now``."""
    return [u["UploadId"] for u in listed
            if u.get("Key") == key and (now - u["Initiated"]).total_seconds() > stale_s]


__all__ = ["STALE_S", "Upload", "UploadRegistry", "abandoned"]
