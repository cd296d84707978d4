"""The store's contract, the same suite against both backends: a local directory, and S3 through the real boto3
code path against moto's server on 127.0.0.1. Then publish / list / download of a real (tiny) artifact.

The artifact fixtures live here and are imported by the other store tests; they are built once per session."""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

import boto3
import pytest

from lsaq.store.backend import ConflictError, ObjectNotFoundError
from lsaq.store.keys import BadKeyError
from lsaq.store.manifest import BuildManifest, record_bytes
from lsaq.store.stage import download, list_builds, open_store, publish

MiB = 2**20
FAKE_KEY_ID = "AKIALSAQFAKEKEYID000"
FAKE_SECRET = "lsaqFAKEsecretKEY/do+not+leak/0123456789AB"  # recognizable: must never show up anywhere
S3_OPTIONS = dict(max_attempts=2, multipart_threshold=5 * MiB, multipart_chunksize=5 * MiB, max_concurrency=2,
                  connect_timeout=2.0, read_timeout=10.0)

_BUILT: dict[str, dict[str, Path]] = {}


def build_artifacts(root: Path) -> dict[str, Path]:
    """A tiny real artifact (tiny Llama -> plan for a budget -> quantize), and a copy with its real ``lsaq eval``
    report (perplexity on a word corpus, fidelity) inside. Built once per session."""
    if "art" in _BUILT:
        return _BUILT["art"]
    from test_calibration import tiny_model_dir, word_text

    import lsaq
    from lsaq.models.configs import load_config
    from lsaq.models.families import model_shape
    from lsaq.planning.planner import budget_for
    from lsaq.precision import Precision

    model = tiny_model_dir(root / "tiny")
    options = lsaq.PlanOptions(context=64)
    b = budget_for(model_shape(load_config(str(model)).config), options)
    budget = b.fixed + sum(b.layer_costs[p] for p in Precision)  # room for one layer at each precision
    plan = lsaq.plan(lsaq.DeviceRequest(budget=budget), config=str(model), options=options)
    art = lsaq.quantize(plan, root / "artifact", model=str(model)).path
    corpus = root / "corpus.txt"
    corpus.write_text(word_text(2000))
    evaluated = root / "artifact-evaluated"
    shutil.copytree(art, evaluated)
    options = lsaq.EvalOptions(ppl=True, ppl_source=str(corpus), seq_len=32, max_windows=2, fidelity_windows=2,
                               fidelity_seq_len=24)
    lsaq.evaluate(evaluated, evaluated / "report.json", options=options, baseline=str(model))
    _BUILT["art"] = {"artifact": art, "evaluated": evaluated}
    return _BUILT["art"]


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory) -> dict[str, Path]:
    return build_artifacts(tmp_path_factory.mktemp("store-artifacts"))


@pytest.fixture(scope="session")
def artifact(artifacts) -> Path:
    return artifacts["artifact"]


@pytest.fixture
def aws_env(monkeypatch):
    """Fake, recognizable credentials in the standard chain (environment) and no other AWS configuration."""
    for var in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", FAKE_KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", FAKE_SECRET)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")  # the command line's S3 stores: a dead endpoint fails fast
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)


@pytest.fixture(scope="module")
def moto_endpoint():
    """moto's S3 server on 127.0.0.1 (an ephemeral port), stopped when the module's tests are done."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        assert host == "127.0.0.1"
        yield f"http://{host}:{port}"
    finally:
        server.stop()


def new_bucket(endpoint: str) -> str:
    name = f"lsaq-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=name)
    return name


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path, aws_env):
    """One empty store per test, of each backend kind (S3 under a prefix in a fresh bucket)."""
    if request.param == "local":
        return open_store(tmp_path / "store")
    endpoint = request.getfixturevalue("moto_endpoint")
    return open_store(f"s3://{new_bucket(endpoint)}/team/lsaq", endpoint_url=endpoint, **S3_OPTIONS)


# ------------------------------------------------------------------------------------------ the contract


def test_bytes_round_trip_exists_head_and_overwrite(store):
    assert not store.exists("a/b.json") and store.head("a/b.json") is None
    store.put_bytes("a/b.json", b'{"x": 1}')
    assert store.exists("a/b.json") and store.get_bytes("a/b.json") == b'{"x": 1}'
    assert store.head("a/b.json").size == 8
    store.put_bytes("a/b.json", b"")  # replaced, and empty objects are objects
    assert store.get_bytes("a/b.json") == b"" and store.head("a/b.json").size == 0


def test_file_round_trip_is_exact_also_in_multipart(store, tmp_path):
    data = os.urandom(11 * MiB + 12345)  # above the 5 MiB multipart threshold of S3_OPTIONS: 3 parts
    src = tmp_path / "big.bin"
    src.write_bytes(data)
    store.put_file("x/big.bin", src, sha256="ab" * 32)
    got = tmp_path / "got.bin"
    store.get_file("x/big.bin", got)
    assert got.read_bytes() == data
    info = store.head("x/big.bin")
    assert info.size == len(data) and info.sha256 in (None, "ab" * 32)  # S3 keeps the publisher's sha256
    if hasattr(store, "client"):  # S3: it went up in 3 parts (a multipart ETag ends in -<parts>)
        etag = store.client.head_object(Bucket=store.bucket, Key=store.full_key("x/big.bin"))["ETag"]
        assert etag.strip('"').endswith("-3")


def test_create_if_absent_creates_once_and_never_overwrites(store):
    assert store.create_bytes("m/manifest.json", b"first") is True
    assert store.create_bytes("m/manifest.json", b"second") is False
    assert store.get_bytes("m/manifest.json") == b"first"


def test_list_under_a_prefix_respects_segment_boundaries(store):
    for key in ("a/b/1", "a/b/2", "a/bc/3", "z"):
        store.put_bytes(key, key.encode())
    assert store.list("a/b") == ["a/b/1", "a/b/2"]
    assert store.list("") == ["a/b/1", "a/b/2", "a/bc/3", "z"]
    assert store.list("nothing") == []


def test_delete_and_missing_objects(store, tmp_path):
    store.put_bytes("d/x", b"1")
    store.delete("d/x")
    store.delete("d/x")  # absent: no error
    assert not store.exists("d/x") and store.list("d") == []
    with pytest.raises(ObjectNotFoundError, match="d/x"):
        store.get_bytes("d/x")
    with pytest.raises(ObjectNotFoundError, match="d/x"):
        store.get_file("d/x", tmp_path / "x")
    assert not (tmp_path / "x").exists()


BAD_KEYS = ["", "/abs/key", "a/../b", "..", "a/./b", "a//b", "a/", "a\\b", "a\x00b", "a\nb", "tab\there", "a\x7fb",
            ".hidden", "a/.tmp", "x" * 256, "/".join(["y" * 200] * 6)]


@pytest.mark.parametrize("key", BAD_KEYS, ids=range(len(BAD_KEYS)))
def test_every_method_refuses_a_bad_key_and_writes_nothing(store, key, tmp_path):
    src = tmp_path / "f"
    src.write_bytes(b"1")
    for call in (lambda: store.put_bytes(key, b"1"), lambda: store.create_bytes(key, b"1"),
                 lambda: store.put_file(key, src), lambda: store.get_bytes(key), lambda: store.exists(key),
                 lambda: store.head(key), lambda: store.delete(key), lambda: store.get_file(key, tmp_path / "g")):
        with pytest.raises(BadKeyError):
            call()
    assert store.list("") == []


def test_uris_name_the_store_only(store):
    assert store.key_uri("a/b").endswith("a/b") and store.key_uri("a/b").startswith(store.uri)
    assert FAKE_SECRET not in repr(store) and FAKE_KEY_ID not in repr(store)


# ------------------------------------------------------------------------------------------ builds


def test_publish_list_download_round_trip(store, artifacts, tmp_path):
    from lsaq.quantization.artifact import verify_artifact
    from lsaq.quantization.record import Artifact

    art = Artifact.load(artifacts["artifact"])
    first = publish(store, artifacts["artifact"])
    m = first.manifest
    assert first.created and m.model_slug == "tiny" and m.revision == f"sha256-{art.model.content_hash[:16]}"
    assert m.device_slug.startswith("budget-") and m.plan_id == art.plan_id and m.evaluation is None
    assert set(m.files) == {*art.files, "lsaq_artifact.json"}
    assert first.uri == store.key_uri(m.prefix) + "/"
    assert store.exists(f"{m.prefix}/manifest.json") and store.exists(m.latest_key)
    assert store.exists(f"tiny/{m.revision}/plans/{art.plan_id}.json")

    again = publish(store, artifacts["artifact"])  # identical: a no-op that succeeds
    assert not again.created and again.uploaded_bytes == 0 and again.manifest.same_content(m)

    evaluated = publish(store, artifacts["evaluated"])  # the same artifact with its report: another build
    e = evaluated.manifest
    assert evaluated.created and e.build_id != m.build_id and e.plan_id == m.plan_id
    assert {"report.json", "report.md"} <= set(e.files)
    report = json.loads((artifacts["evaluated"] / "report.json").read_text())
    assert e.evaluation["fidelity"]["kl_mean"] == report["fidelity"]["kl_mean"]
    assert e.evaluation["metrics"]["perplexity"]["quantized"] == report["quantized"]["perplexity"]["ppl"]

    builds = list_builds(store)
    assert {b.build_id for b in builds} == {m.build_id, e.build_id}
    assert all(x.published_at >= y.published_at for x, y in zip(builds, builds[1:]))  # newest first
    assert list_builds(store, model="tiny", device=m.device_slug) == builds
    assert list_builds(store, model="other") == [] and list_builds(store, device="rtx3060") == []
    assert list_builds(store, device="budget") == []  # every budget is "budget": only the slug names one

    got = download(store, tmp_path / "dl", model="tiny", device=m.device_slug)  # latest.json: the evaluated build
    assert got.manifest.build_id == e.build_id
    verify_artifact(tmp_path / "dl")
    for name in e.files:
        assert (tmp_path / "dl" / name).read_bytes() == (artifacts["evaluated"] / name).read_bytes()
    assert BuildManifest.parse((tmp_path / "dl" / "manifest.json").read_bytes(), "dl").same_content(e)

    older = download(store, tmp_path / "dl2", build=m.build_id)
    assert older.manifest.build_id == m.build_id and not (tmp_path / "dl2" / "report.json").exists()
    with pytest.raises(ValueError, match="not empty"):
        download(store, tmp_path / "dl2", build=m.build_id)
    download(store, tmp_path / "dl2", build=e.build_id, force=True)
    assert (tmp_path / "dl2" / "report.json").is_file()
    with pytest.raises(ObjectNotFoundError, match="no complete build"):
        download(store, tmp_path / "dl3", model="tiny", device="rtx3060")
    assert not (tmp_path / "dl3").exists()


def test_a_different_build_under_an_existing_id_is_refused_and_nothing_is_overwritten(store, artifact):
    m = publish(store, artifact).manifest
    before = {k: store.get_bytes(k) for k in store.list("")}
    # Another writer's manifest under this id (same id, other content): publishing must not touch anything.
    forged = json.loads(store.get_bytes(m.key))
    forged["files"]["config.json"]["sha256"] = "0" * 64
    store.delete(m.key)
    store.create_bytes(m.key, record_bytes(forged))
    before[m.key] = store.get_bytes(m.key)
    with pytest.raises(ConflictError, match="altered"):
        publish(store, artifact)
    assert {k: store.get_bytes(k) for k in store.list("")} == before
