"""The S3 backend: keys are objects under ``s3://bucket/prefix`` on any S3-compatible endpoint, through boto3.

* Endpoint: the ``endpoint_url`` given, else boto3's own configuration (``AWS_ENDPOINT_URL_S3``,
  ``AWS_ENDPOINT_URL``, the profile's ``endpoint_url``), else AWS. A custom endpoint gets path-style addressing
  (what MinIO, Ceph and moto expect).
* Credentials: boto3's standard chain (environment, shared files, SSO, instance roles). They are never read,
  logged, printed or written by lsaq: URIs and messages name only the bucket, prefix and endpoint, and an
  endpoint with ``user:password@`` in it is refused.
* Large files go up and down in multipart (:class:`boto3.s3.transfer.TransferConfig`); every request is retried
  on transient errors (connection errors, throttling, 5xx) with bounded exponential backoff (botocore's
  ``standard`` retry mode: ``max_attempts`` in total, by default ``AWS_MAX_ATTEMPTS`` or the profile's
  ``max_attempts``, else 3), each failed attempt logged as a warning. A request waits at most ``connect_timeout``
  (default ``LSAQ_S3_CONNECT_TIMEOUT``, else 5 s) to connect and ``read_timeout`` (``LSAQ_S3_READ_TIMEOUT``,
  else 6 s) for each answer, so an endpoint that accepts connections and never answers fails in about 20 s.
* A multipart upload a killed process left is aborted by the next upload (:mod:`lsaq.store.uploads`).
* Create-if-absent is ``PutObject`` with ``If-None-Match: *`` (HTTP 412 when the key exists), supported by AWS S3,
  MinIO, R2 and moto.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import re
import time
from pathlib import Path
from typing import Any, Callable, TypeVar
from urllib.parse import urlsplit

import boto3
from boto3.exceptions import S3TransferFailedError, S3UploadFailedError
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError, PartialCredentialsError
from botocore.exceptions import ReadTimeoutError

from lsaq.paths import cache_dir
from lsaq.store.backend import ObjectInfo, ObjectNotFoundError, StoreError, StoreUnavailableError
from lsaq.store.keys import validate_key
from lsaq.store.uploads import UploadRegistry, abandoned

log = logging.getLogger(__name__)

T = TypeVar("T")

_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
MiB = 2**20
NOT_FOUND = {"NoSuchKey", "404", "NotFound"}
PRECONDITION_FAILED = {"PreconditionFailed", "412"}
CONDITIONAL_CONFLICT = {"ConditionalRequestConflict", "409"}  # AWS: a concurrent conditional write is in flight
SHA256_META = "sha256"  # user metadata x-amz-meta-sha256: the sha256 the publisher computed
DEFAULT_TIMEOUTS = {"LSAQ_S3_CONNECT_TIMEOUT": 5.0, "LSAQ_S3_READ_TIMEOUT": 6.0}  # seconds


def timeout_setting(value: float | None, variable: str) -> float:
    """``value``, else the environment's ``variable``, else its default; ``ValueError`` naming a bad one."""
    if value is None:
        text = os.environ.get(variable)
        if text is None or not text.strip():
            return DEFAULT_TIMEOUTS[variable]
        try:
            value = float(text)
        except ValueError:
            raise ValueError(f"{variable}={text!r} is not a number of seconds") from None
    if not value > 0:
        raise ValueError(f"{variable.removeprefix('LSAQ_S3_').lower()} must be a positive number of seconds, "
                         f"got {value!r}")
    return float(value)


def check_bucket(bucket: str) -> str:
    if not _BUCKET.match(bucket) or ".." in bucket:
        raise ValueError(f"bucket name {bucket!r} is not valid: 3-63 characters of a-z, 0-9, '.' and '-', starting "
                         "and ending with a letter or digit")
    return bucket


def check_endpoint(endpoint_url: str) -> str:
    """An endpoint URL without credentials in it (they belong in the AWS credential chain)."""
    parts = urlsplit(endpoint_url)
    secret = parts.username is not None or parts.password is not None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        shown = f"a {parts.scheme!r} URL with credentials in it" if secret else repr(endpoint_url)
        raise ValueError(f"S3 endpoint must be an http(s) URL such as http://127.0.0.1:9000, got {shown}")
    if secret:
        raise ValueError("S3 endpoint URL must not contain credentials (user:password@); use the AWS credential "
                         "chain (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, ~/.aws, ...)")
    return endpoint_url


class S3Backend:
    """A store under ``s3://bucket/prefix``. The bucket must exist; ``prefix`` may be empty."""

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        max_attempts: int | None = None,
        multipart_threshold: int = 64 * MiB,
        multipart_chunksize: int = 16 * MiB,
        max_concurrency: int = 8,
        connect_timeout: float | None = None,
        read_timeout: float | None = None,
    ) -> None:
        self.bucket = check_bucket(bucket)
        self.prefix = validate_key(prefix.strip("/"), what="S3 prefix", allow_empty=True)
        if max_attempts is not None and max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, got {max_attempts}")
        connect_timeout = timeout_setting(connect_timeout, "LSAQ_S3_CONNECT_TIMEOUT")
        self.read_timeout = read_timeout = timeout_setting(read_timeout, "LSAQ_S3_READ_TIMEOUT")
        self.max_attempts = max_attempts or int(os.environ.get("AWS_MAX_ATTEMPTS", "").strip() or 3)
        # None: botocore's own setting (AWS_MAX_ATTEMPTS, the profile's max_attempts), else 3 attempts in all.
        retries = {"mode": "standard", **({"total_max_attempts": max_attempts} if max_attempts else {})}
        if endpoint_url is not None:
            check_endpoint(endpoint_url)
        session = boto3.session.Session()
        # Checksums only where the API requires them: botocore's default CRC32 trailers on every upload are refused
        # by several S3-compatible stores (older MinIO, Ceph, R2); lsaq verifies sha256 itself on download.
        base = dict(retries=retries, connect_timeout=connect_timeout,
                    read_timeout=read_timeout, request_checksum_calculation="when_required",
                    response_checksum_validation="when_required")
        self.client = session.client("s3", endpoint_url=endpoint_url, config=Config(**base))
        self.endpoint_url = check_endpoint(self.client.meta.endpoint_url)  # also one from the environment/profile
        if ".amazonaws.com" not in urlsplit(self.endpoint_url).hostname:
            # A custom endpoint (MinIO, Ceph, moto, ...): path-style addressing, which they all serve.
            self.client = session.client("s3", endpoint_url=self.endpoint_url,
                                         config=Config(**base, s3={"addressing_style": "path"}))
        self.transfer = TransferConfig(multipart_threshold=multipart_threshold, multipart_chunksize=multipart_chunksize,
                                       max_concurrency=max_concurrency, use_threads=max_concurrency > 1)
        self.uploads = UploadRegistry(cache_dir() / "s3-uploads", self.endpoint_url, self.bucket)
        events = self.client.meta.events
        events.register("after-call.s3.CreateMultipartUpload", self._upload_created)
        events.register("needs-retry.s3", self._attempt_failed)

    def _upload_created(self, parsed: dict[str, Any], **_: Any) -> None:
        if parsed.get("UploadId") and parsed.get("Key"):
            self.uploads.started(parsed["Key"], parsed["UploadId"])

    def _attempt_failed(self, attempts: int, operation: Any = None, response: Any = None,
                        caught_exception: Exception | None = None, **_: Any) -> None:
        """A progress line for each failed attempt (botocore decides whether to retry; this only says so)."""
        status = response[0].status_code if response is not None else None
        if caught_exception is None and (status is None or (status < 500 and status != 429)):
            return
        why = f"{type(caught_exception).__name__}" if caught_exception is not None else f"HTTP {status}"
        then = "retrying" if attempts < self.max_attempts else "giving up"
        log.warning("S3 endpoint %s: %s attempt %d of %d failed (%s); %s", self.endpoint_url,
                    getattr(operation, "name", "request"), attempts, self.max_attempts, why, then)

    def _abort(self, key: str, upload_id: str) -> None:
        """Abort one multipart upload; one already gone is fine, another failure only a warning."""
        try:
            self.client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
            log.info("aborted the multipart upload %s of s3://%s/%s left by an earlier run", upload_id[:12],
                     self.bucket, key)
        except (ClientError, BotoCoreError) as e:
            code = str(e.response.get("Error", {}).get("Code")) if isinstance(e, ClientError) else ""
            if code not in ("NoSuchUpload", "404"):  # one already gone is fine
                log.warning("could not abort multipart upload %s of s3://%s/%s: %s", upload_id[:12], self.bucket,
                            key, e)

    def _clean_uploads(self, key: str) -> None:
        """Abort what killed uploads left: this machine's dead processes', and any of ``key`` past its age."""
        self.uploads.sweep(self._abort)
        try:
            listed = self._call("list uploads", key, self.client.list_multipart_uploads, Bucket=self.bucket,
                                Prefix=key)
        except StoreError as e:  # no s3:ListBucketMultipartUploads permission, say: the upload itself may still work
            log.warning("could not look for abandoned multipart uploads: %s", e)
            return
        for upload_id in abandoned(listed.get("Uploads", ()), key, dt.datetime.now(dt.timezone.utc)):
            self._abort(key, upload_id)

    def __repr__(self) -> str:
        return f"S3Backend({self.uri!r}, endpoint={self.endpoint_url!r})"

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"

    def full_key(self, key: str, *, allow_empty: bool = False) -> str:
        key = validate_key(key, allow_empty=allow_empty)
        return "/".join(p for p in (self.prefix, key) if p)

    def key_uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{self.full_key(key)}"

    def _call(self, what: str, key: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run one boto3 call, turning its exceptions into store errors that name the object and endpoint only."""
        where = f"{what} s3://{self.bucket}/{key}"
        try:
            return fn(*args, **kwargs)
        except ClientError as e:
            err = e.response.get("Error", {})
            code = str(err.get("Code", "?"))
            if code in NOT_FOUND:
                raise ObjectNotFoundError(f"s3://{self.bucket}/{key}: no such object") from None
            if code == "NoSuchBucket":
                raise StoreError(f"{where}: bucket {self.bucket!r} does not exist at {self.endpoint_url}") from None
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            raise StoreError(f"{where}: {code} (HTTP {status}) from {self.endpoint_url}: {err.get('Message', '')}") from e
        except (NoCredentialsError, PartialCredentialsError) as e:
            raise StoreError(f"{where}: no usable AWS credentials ({type(e).__name__}); set them in the standard "
                             "chain (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, AWS_PROFILE, ~/.aws)") from None
        except (S3UploadFailedError, S3TransferFailedError) as e:
            raise StoreUnavailableError(f"{where}: transfer failed at {self.endpoint_url} ({e})") from e
        except BotoCoreError as e:
            waited = (f"; no answer within {self.read_timeout:g} s in {self.max_attempts} attempt(s) "
                      f"(LSAQ_S3_READ_TIMEOUT, AWS_MAX_ATTEMPTS)") if isinstance(e, ReadTimeoutError) else ""
            raise StoreUnavailableError(f"{where}: cannot reach the S3 endpoint {self.endpoint_url} ({type(e).__name__}: "
                                        f"{e}){waited}") from e

    def put_file(self, key: str, path: Path, *, sha256: str | None = None) -> None:
        full = self.full_key(key)
        extra = {"Metadata": {SHA256_META: sha256}} if sha256 else None
        if Path(path).stat().st_size >= self.transfer.multipart_threshold:
            self._clean_uploads(full)
        try:
            self._call("upload", full, self.client.upload_file, str(path), self.bucket, full, ExtraArgs=extra,
                       Config=self.transfer)
        finally:
            self.uploads.finished(full)  # completed, or aborted by boto3's transfer on its failure

    def put_bytes(self, key: str, data: bytes) -> None:
        full = self.full_key(key)
        self._call("put", full, self.client.put_object, Bucket=self.bucket, Key=full, Body=data)

    def create_bytes(self, key: str, data: bytes) -> bool:
        full = self.full_key(key)
        for attempt in range(4):
            try:
                self._call("create", full, self.client.put_object, Bucket=self.bucket, Key=full, Body=data,
                           IfNoneMatch="*")
                return True
            except StoreError as e:
                cause = e.__cause__
                code = str(cause.response.get("Error", {}).get("Code")) if isinstance(cause, ClientError) else ""
                if code in PRECONDITION_FAILED:
                    return False
                if code in CONDITIONAL_CONFLICT and attempt < 3:
                    time.sleep(0.2 * 2**attempt)  # another conditional write is in flight: let it settle
                    continue
                raise
        raise AssertionError("unreachable")

    def get_bytes(self, key: str) -> bytes:
        full = self.full_key(key)
        resp = self._call("get", full, self.client.get_object, Bucket=self.bucket, Key=full)
        return self._call("get", full, resp["Body"].read)

    def get_file(self, key: str, path: Path) -> None:
        full = self.full_key(key)
        self._call("download", full, self.client.download_file, self.bucket, full, str(path), Config=self.transfer)

    def head(self, key: str) -> ObjectInfo | None:
        full = self.full_key(key)
        try:
            resp = self._call("head", full, self.client.head_object, Bucket=self.bucket, Key=full)
        except ObjectNotFoundError:
            return None
        return ObjectInfo(int(resp["ContentLength"]), (resp.get("Metadata") or {}).get(SHA256_META))

    def exists(self, key: str) -> bool:
        return self.head(key) is not None

    def list(self, prefix: str = "") -> list[str]:
        base = self.full_key(prefix, allow_empty=True)
        start = f"{base}/" if base else ""
        out: list[str] = []
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=start)

        def collect() -> None:
            for page in pages:
                out.extend(obj["Key"][len(self.prefix) + 1 if self.prefix else 0:] for obj in page.get("Contents", ()))

        self._call("list", start, collect)
        return sorted(out)

    def delete(self, key: str) -> None:
        full = self.full_key(key)
        self._call("delete", full, self.client.delete_object, Bucket=self.bucket, Key=full)
