"""Store keys and names: every kind of bad key refused, safe slugs, the documented layout, store URIs, and the
store's place in the core (no torch, no Prefect)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from lsaq.models.identity import ModelRef
from lsaq.planning.devices import DeviceProfile, budget_profile
from lsaq.store.keys import (
    MAX_KEY_BYTES,
    BadKeyError,
    build_prefix,
    device_slug,
    importance_prefix,
    latest_key,
    model_slug,
    parse_build_manifest_key,
    plan_key,
    revision_slug,
    slugify,
    validate_key,
)
from lsaq.store.local import LocalBackend
from lsaq.store.stage import open_store

BAD = {
    "empty": ("", "is empty"),
    "absolute": ("/etc/passwd", "absolute"),
    "parent": ("a/../../b", "'..' segment"),
    "parent alone": ("..", "'..' segment"),
    "dot": ("a/./b", "'.' segment"),
    "empty segment": ("a//b", "empty segment"),
    "trailing slash": ("a/b/", "empty segment"),
    "backslash": ("a\\..\\b", "backslash"),
    "nul": ("a\x00b", "control character"),
    "newline": ("a\nb", "control character"),
    "escape": ("a\x1b[2Jb", "control character"),
    "del": ("a\x7f", "control character"),
    "c1": ("a\x85b", "control character"),
    "hidden": ("a/.b", "starts with '.'"),
    "long segment": ("s" * 256, "segment of 256 bytes"),
    "long key": ("/".join(["k" * 250] * 5), f"at most {MAX_KEY_BYTES}"),
    "long utf-8": ("é" * 128, "segment of 256 bytes"),  # 128 characters, 256 bytes
}


@pytest.mark.parametrize("name", BAD)
def test_every_kind_of_bad_key_is_refused_with_its_reason(name):
    key, reason = BAD[name]
    with pytest.raises(BadKeyError, match=reason.replace("(", r"\(").replace("[", r"\[")):
        validate_key(key)


def test_good_keys_pass_unchanged():
    for key in ("a", "a/b.json", "model-00001-of-00002.safetensors", "plots/plan_strip.png", "x" * 255,
                "/".join(["k" * 200] * 5)):
        assert validate_key(key) == key
    assert validate_key("", allow_empty=True) == ""
    with pytest.raises(BadKeyError, match="string"):
        validate_key(None)  # type: ignore[arg-type]


@pytest.mark.parametrize("name, slug", [
    ("HuggingFaceTB/SmolLM2-135M", "huggingfacetb--smollm2-135m"),
    ("NVIDIA RTX 3060 (12 GB)", "nvidia-rtx-3060-12-gb"),
    ("../../etc/passwd", "etc--passwd"),
    ("Jetson Orin Nano 8GB", "jetson-orin-nano-8gb"),
    ("Ünïcödé_dev", "unicode_dev"),
    ("a\x00b\nc", "a-b-c"),
    ("x" * 300, "x" * 96),
])
def test_slugs_are_safe_keys(name, slug):
    assert slugify(name) == slug
    assert validate_key(slugify(name)) == slug


@pytest.mark.parametrize("name", ["", "///", "..", "日本語", "\x00"])
def test_names_without_letters_or_digits_have_no_slug(name):
    with pytest.raises(BadKeyError, match="no letters or digits"):
        slugify(name)


def ref(**kw) -> ModelRef:
    return ModelRef(**{"id": "x", "model_type": "llama", "num_layers": 2, **kw})


def test_model_and_revision_segments():
    hub = ref(id="HuggingFaceTB/SmolLM2-135M", revision="a" * 40, content_hash="c" * 64)
    assert (model_slug(hub), revision_slug(hub)) == ("huggingfacetb--smollm2-135m", "a" * 40)
    gguf = ref(id="default", source="/root/.cache/lsaq/default/SmolLM2-135M-Instruct.Q4_1.gguf", content_hash="b" * 64)
    assert (model_slug(gguf), revision_slug(gguf)) == ("smollm2-135m-instruct.q4_1", "sha256-" + "b" * 16)
    local = ref(id="/models/My Llama/", source="/models/My Llama", content_hash="0123456789abcdef" * 4)
    assert (model_slug(local), revision_slug(local)) == ("my-llama", "sha256-0123456789abcdef")
    with pytest.raises(ValueError, match="neither a hub revision nor a content hash"):
        revision_slug(ref())


def test_device_segments_name_budgets_by_size():
    assert device_slug(budget_profile("160MiB")) == "budget-160mib"
    assert device_slug(budget_profile("6GiB")) == "budget-6gib"
    assert device_slug(budget_profile(123457)) == "budget-123457b"
    assert device_slug(DeviceProfile(name="RTX 3060", memory=1, kind=None, reserve=0)) == "rtx-3060"


def test_the_documented_layout():
    assert build_prefix("m", "r", "d", "b") == "m/r/builds/d/b"
    assert latest_key("m", "r", "d") == "m/r/builds/d/latest.json"
    assert plan_key("m", "r", "p1") == "m/r/plans/p1.json"
    assert importance_prefix("m", "r", "i1") == "m/r/importance/i1"
    assert parse_build_manifest_key("m/r/builds/d/b/manifest.json") == ("m", "r", "d", "b")
    assert parse_build_manifest_key("m/r/builds/d/b/config.json") is None
    assert parse_build_manifest_key("m/r/builds/d/latest.json") is None
    with pytest.raises(BadKeyError):
        build_prefix("m", "..", "d", "b")
    with pytest.raises(BadKeyError):
        latest_key("m", "r", "a/../../x")


def test_store_uris(tmp_path, monkeypatch):
    assert isinstance(open_store(tmp_path / "s"), LocalBackend)
    assert open_store(f"file://{tmp_path}/s").uri == str(tmp_path / "s")
    monkeypatch.setenv("LSAQ_STORE", str(tmp_path / "env"))
    assert open_store().uri == str(tmp_path / "env")
    monkeypatch.delenv("LSAQ_STORE")
    monkeypatch.setenv("LSAQ_CACHE", str(tmp_path / "cache"))
    assert open_store().uri == str(tmp_path / "cache" / "store")
    bad = {
        "gs://bucket/x": "unknown store scheme 'gs'",
        "s3://": "names no bucket",
        "s3://Bad_Bucket/x": "bucket name",
        "s3://ab/x": "bucket name",
        "s3://bucket/a/../b": "'..' segment",
        "s3://bucket/x?versionId=1": "no credentials, query",
        "s3://AKIA:secret@bucket/x": "no credentials",
        "file://otherhost/x": "only local paths",
    }
    for uri, reason in bad.items():
        with pytest.raises(ValueError, match=reason.replace("?", r"\?")):
            open_store(uri)
    with pytest.raises(ValueError, match="must not contain credentials"):
        open_store("s3://bucket/x", endpoint_url="http://user:pw@127.0.0.1:9000")
    with pytest.raises(ValueError, match="http"):
        open_store("s3://bucket/x", endpoint_url="ftp://127.0.0.1")
    with pytest.raises(ValueError, match="local directory"):
        open_store(tmp_path, endpoint_url="http://127.0.0.1:9000")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="not a directory"):
        open_store(tmp_path / "file")


@pytest.mark.parametrize("module", ["lsaq.store.stage", "lsaq.store.s3", "lsaq.commands.store"])
def test_the_store_needs_neither_torch_nor_prefect(module):
    code = (f"import sys, {module}; "
            "print([m for m in ('torch', 'transformers', 'prefect') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]", f"{module} pulls in {out}"
