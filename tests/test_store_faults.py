"""Faults, each ending with nothing incomplete visible and nothing lost: an error after k of n files (a rerun
completes), the S3 endpoint stopping mid-publish (a rerun after restart completes), two concurrent publishes of
one build, a flipped byte / truncated / missing object (download refuses, names the file, writes nothing), and
a recognizable fake secret key that never appears in any record, log line, output or error."""

from __future__ import annotations

import logging
import socket
import threading
from pathlib import Path

import pytest
from test_store_contract import (  # noqa: F401  (fixtures)
    FAKE_SECRET,
    S3_OPTIONS,
    artifact,
    artifacts,
    aws_env,
    moto_endpoint,
    new_bucket,
    store,
)

from lsaq.cli import main
from lsaq.quantization.artifact import verify_artifact
from lsaq.store.backend import ObjectNotFoundError, StoreError, StoreUnavailableError, VerificationError
from lsaq.store.manifest import build_id, record_bytes
from lsaq.store.stage import download, list_builds, open_store, publish


class Interrupted(RuntimeError):
    pass


class Faulty:
    """A backend that runs ``action`` before its (k+1)-th file upload, or makes manifest creations meet at a
    barrier; everything else goes to the real backend."""

    def __init__(self, inner, *, after: int | None = None, action=None, barrier: threading.Barrier | None = None):
        self.inner, self.after, self.action, self.barrier, self.files = inner, after, action, barrier, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def put_file(self, key, path, *, sha256=None):
        if self.files == self.after:
            self.action()
        self.files += 1
        return self.inner.put_file(key, path, sha256=sha256)

    def create_bytes(self, key, data):
        if self.barrier is not None and key.endswith("/manifest.json"):
            self.barrier.wait(timeout=30)  # both publishers have uploaded every file and found no manifest
        return self.inner.create_bytes(key, data)


def raise_interrupted():
    raise Interrupted("injected failure")


def nothing_visible(store, tmp_path: Path) -> None:
    """No build is listed, no manifest or latest.json exists, and a download finds nothing and writes nothing."""
    assert list_builds(store) == []
    assert not [k for k in store.list("") if k.endswith(("/manifest.json", "/latest.json"))]
    with pytest.raises(ObjectNotFoundError):
        download(store, tmp_path / "nothing", model="tiny", device=None)
    assert not (tmp_path / "nothing").exists()


def download_verifies(store, tmp_path: Path, name: str = "dl") -> Path:
    got = download(store, tmp_path / name, model="tiny")
    verify_artifact(got.path)
    return got.path


@pytest.mark.parametrize("k", [0, 4])
def test_an_error_after_k_files_leaves_nothing_visible_and_a_rerun_completes(store, artifact, tmp_path, k):
    with pytest.raises(Interrupted):
        publish(Faulty(store, after=k, action=raise_interrupted), artifact)
    nothing_visible(store, tmp_path)
    result = publish(store, artifact)
    assert result.created
    total = result.manifest.file_bytes
    if hasattr(store, "client"):  # S3 skips the files already stored whole (size and recorded sha256 match)
        assert (result.uploaded_bytes < total) == (k > 0)
    download_verifies(store, tmp_path)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_s3_endpoint_stopping_mid_publish_fails_clearly_and_a_rerun_after_restart_completes(
        aws_env, artifact, tmp_path):
    from moto.server import ThreadedMotoServer

    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    running = True
    try:
        uri = f"s3://{new_bucket(endpoint)}/p"

        def stop():
            nonlocal running
            server.stop()
            running = False

        with pytest.raises(StoreUnavailableError) as err:
            publish(Faulty(open_store(uri, endpoint_url=endpoint, **S3_OPTIONS), after=3, action=stop), artifact)
        assert endpoint in str(err.value) and "cannot reach" in str(err.value)
        assert FAKE_SECRET not in str(err.value)

        server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)  # same endpoint, same data
        server.start()
        running = True
        store = open_store(uri, endpoint_url=endpoint, **S3_OPTIONS)
        assert store.list("") and list_builds(store) == []  # files of the interrupted publish, but no build
        result = publish(store, artifact)
        assert result.created and result.uploaded_bytes < result.manifest.file_bytes
        download_verifies(store, tmp_path)
    finally:
        if running:
            server.stop()


def test_two_concurrent_publishes_of_one_build_both_succeed_with_one_manifest(store, artifact, tmp_path):
    barrier = threading.Barrier(2)
    second = open_store(store.uri, endpoint_url=getattr(store, "endpoint_url", None),
                        **(S3_OPTIONS if hasattr(store, "client") else {}))
    results, errors = [], []

    def run(backend):
        try:
            results.append(publish(Faulty(backend, barrier=barrier), artifact))
        except BaseException as e:  # noqa: BLE001 (reported below)
            errors.append(e)

    threads = [threading.Thread(target=run, args=(b,)) for b in (store, second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert sorted(r.created for r in results) == [False, True]  # one manifest created, the other found it
    assert results[0].manifest.same_content(results[1].manifest)
    assert [m.build_id for m in list_builds(store)] == [results[0].manifest.build_id]
    download_verifies(store, tmp_path)


@pytest.mark.parametrize("fault", ["flip", "truncate", "delete"])
def test_a_damaged_object_is_refused_by_name_and_nothing_is_written(store, artifact, tmp_path, fault):
    m = publish(store, artifact).manifest
    key = f"{m.prefix}/model.safetensors"
    data = bytearray(store.get_bytes(key))
    if fault == "flip":
        data[len(data) // 2] ^= 0x01
        store.put_bytes(key, bytes(data))
    elif fault == "truncate":
        store.put_bytes(key, bytes(data[:-100]))
    else:
        store.delete(key)
    dest = tmp_path / "out" / "artifact"
    dest.parent.mkdir()
    match = {"flip": "model.safetensors: sha256 differs", "truncate": "model.safetensors: .* bytes in the store",
             "delete": "model.safetensors: listed in the manifest but missing"}[fault]
    with pytest.raises(VerificationError, match=match):
        download(store, dest, model="tiny")
    assert list(dest.parent.iterdir()) == []  # no destination, no temporary directory beside it


def test_a_manifest_naming_files_outside_the_build_is_never_used(store, artifact, tmp_path, caplog):
    m = publish(store, artifact).manifest
    store.delete(m.key)  # only the forged build is left
    files = {"../../escape.txt": (3, "0" * 64)}
    forged = m.to_json()  # a well-formed manifest with a consistent id, but a file name that climbs out
    forged["files"] = {n: {"bytes": b, "sha256": h} for n, (b, h) in files.items()}
    forged["build_id"] = build_id(m.plan_id, files)
    store.create_bytes(f"{'/'.join(m.prefix.split('/')[:-1])}/{forged['build_id']}/manifest.json",
                       record_bytes(forged))
    with caplog.at_level(logging.WARNING, logger="lsaq"):
        assert list_builds(store) == []
    assert "escape" in caplog.text
    with pytest.raises(ObjectNotFoundError):
        download(store, tmp_path / "x" / "y", model="tiny")
    assert not (tmp_path / "escape.txt").exists() and not (tmp_path / "x").exists()


def test_a_fake_secret_never_appears_in_records_logs_output_or_errors(aws_env, moto_endpoint, artifacts, tmp_path,
                                                                      capsys, caplog):
    caplog.set_level(logging.DEBUG)  # every logger, boto's request signing included
    uri = f"s3://{new_bucket(moto_endpoint)}/lsaq"
    store_args = ["--store", uri, "--endpoint-url", moto_endpoint]
    assert main(["-v", "publish", str(artifacts["evaluated"]), *store_args]) == 0
    assert main(["-v", "publish", str(artifacts["evaluated"]), *store_args]) == 0  # identical: no-op
    assert main(["-v", "ls", *store_args]) == 0
    assert main(["-v", "download", "--model", "tiny", "--device", "budget", "--to", str(tmp_path / "none"),
                 *store_args]) == 2  # "budget" names no build: a budget is named by its size
    store = open_store(uri, endpoint_url=moto_endpoint, **S3_OPTIONS)
    device = list_builds(store)[0].device_slug
    assert main(["-v", "download", "--model", "tiny", "--device", device, "--to", str(tmp_path / "ok"),
                 *store_args]) == 0
    verify_artifact(tmp_path / "ok")

    errors = []
    m = list_builds(store)[0]
    store.put_bytes(f"{m.prefix}/config.json", b"{}")  # damaged
    assert main(["download", "--model", "tiny", "--device", device, "--to", str(tmp_path / "bad"), *store_args]) == 2
    dead = f"http://127.0.0.1:{free_port()}"
    assert main(["publish", str(artifacts["artifact"]), "--store", uri, "--endpoint-url", dead]) == 2
    assert main(["ls", "--store", "s3://no-such-bucket-lsaq", "--endpoint-url", moto_endpoint]) == 2
    for call in (lambda: download(store, tmp_path / "bad2", model="tiny"),
                 lambda: publish(open_store(uri, endpoint_url=dead, **S3_OPTIONS), artifacts["artifact"]),
                 lambda: open_store("s3://u:" + FAKE_SECRET + "@bucket/x")):
        with pytest.raises((StoreError, ValueError)) as e:
            call()
        chain, exc = [], e.value
        while exc is not None:
            chain += [str(exc), repr(exc)]
            exc = exc.__cause__ or exc.__context__
        errors += chain

    out = capsys.readouterr()
    records = [store.get_bytes(k) for k in store.list("")] + [p.read_bytes() for p in (tmp_path / "ok").iterdir()]
    assert "cannot reach the S3 endpoint" in out.err and "config.json" in out.err and "no-such-bucket" in out.err
    assert "Authorization" in caplog.text  # the signed requests were logged at DEBUG ...
    for text in (out.out, out.err, caplog.text, *errors):
        assert FAKE_SECRET not in text  # ... and the secret is in none of it
    assert all(FAKE_SECRET.encode() not in r for r in records)


def test_publish_says_what_happened_also_to_the_loser_of_a_race():
    from types import SimpleNamespace

    from lsaq.commands.store import publish_state

    assert publish_state(SimpleNamespace(created=True, uploaded_bytes=10)) == "published"
    assert publish_state(SimpleNamespace(created=False, uploaded_bytes=0)) == \
        "already published (identical build; nothing uploaded)"
    assert publish_state(SimpleNamespace(created=False, uploaded_bytes=10)).startswith(
        "published first by a concurrent run (identical build")


@pytest.fixture
def silent_endpoint():
    """A socket on 127.0.0.1 that accepts connections (the kernel's backlog) and never answers."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(64)
        yield f"http://127.0.0.1:{server.getsockname()[1]}"


def test_a_silent_endpoint_fails_within_30_s_by_default_saying_so(silent_endpoint, monkeypatch, capsys, caplog):
    import time

    for var in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_MAX_ATTEMPTS", "LSAQ_S3_READ_TIMEOUT",
                "LSAQ_S3_CONNECT_TIMEOUT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIASILENTTEST000000")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "silent-test-secret")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    start = time.monotonic()
    assert main(["ls", "--store", "s3://quiet-bucket/lsaq", "--endpoint-url", silent_endpoint]) == 2
    seconds = time.monotonic() - start
    err = capsys.readouterr().err
    assert seconds < 30, seconds
    last = err.strip().splitlines()[-1]
    assert last.startswith("lsaq ls: error: ") and silent_endpoint in last and \
        "no answer within 6 s in 3 attempt(s) (LSAQ_S3_READ_TIMEOUT, AWS_MAX_ATTEMPTS)" in last, err
    # a progress line for each attempt
    assert "ListObjectsV2 attempt 1 of 3 failed (ReadTimeoutError); retrying" in caplog.text
    assert "attempt 3 of 3 failed (ReadTimeoutError); giving up" in caplog.text


def test_s3_timeouts_are_configurable(silent_endpoint, monkeypatch):
    import time

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIASILENTTEST000000")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "silent-test-secret")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("LSAQ_S3_READ_TIMEOUT", "0.5")
    store = open_store("s3://quiet-bucket", endpoint_url=silent_endpoint, max_attempts=2)
    start = time.monotonic()
    with pytest.raises(StoreUnavailableError, match=r"no answer within 0.5 s in 2 attempt\(s\)"):
        store.exists("x")
    assert time.monotonic() - start < 5
    monkeypatch.setenv("LSAQ_S3_READ_TIMEOUT", "soon")
    with pytest.raises(ValueError, match="LSAQ_S3_READ_TIMEOUT='soon' is not a number of seconds"):
        open_store("s3://quiet-bucket", endpoint_url=silent_endpoint)
    with pytest.raises(ValueError, match="connect_timeout must be a positive number of seconds, got 0"):
        open_store("s3://quiet-bucket", endpoint_url=silent_endpoint, connect_timeout=0)
