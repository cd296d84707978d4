"""The pipeline's parts that need no server: content keys, the store-backed result storage, intermediate results."""

from __future__ import annotations

import dataclasses
import os

import anyio
import pytest
from hypothesis import given
from hypothesis import strategies as st

from lsaq.eval.stage import EvalOptions
from lsaq.planning.planner import PlanOptions
from lsaq.store.backend import ObjectNotFoundError, StoreError, StoreUnavailableError
from lsaq.store.keys import CACHE, BadKeyError, cache_key, calibration_prefix, slugify
from lsaq.store.objects import fetch_files, has_files, put_files
from lsaq.store.stage import open_store
from tasks import keys
from tasks.records import ArtifactResult, CalibrationResult, DeviceTarget, EvalResult, ImportanceResult, ModelKey
from tasks.storage import StoreResults, io_failure

MODEL = ModelKey(spec=None, id="default", source="/m.gguf", revision=None, content_hash="ab" * 32,
                 model_type="llama", num_layers=30, config_dir="/c", slug="m", revision_slug="sha256-abab",
                 key="model-1")
CALIB = CalibrationResult(key="calibration-1", uri="/s/c", prefix="m/r/calibration/c", hash="cd" * 32,
                          source="generated", kind="generated", samples=32, seq_len=512, computed=True)
IMP = ImportanceResult(key="importance-1", uri="/s/i", prefix="m/r/importance/i", record_id="i", method="cosine",
                       k=1, importance=(1.0, 0.5), seconds=1.0, computed=True)
DEVICE = DeviceTarget(request="rpi-zero-2w", slug="rpi-zero-2w", profile={"name": "rpi-zero-2w", "memory_bytes": 1},
                      key="device-1")
ART = ArtifactResult(key="quantize-1", path="/a", plan_id="p" * 64, device="rpi-zero-2w", tensor_bytes=1,
                     file_bytes=2)


def test_keys_name_their_stage_and_are_stable():
    k = keys.calibration_key(MODEL, source=None, samples=32, seq_len=512, seed=0)
    assert k.startswith("calibration-") and len(k) == len("calibration-") + keys.KEY_HEX
    assert k == keys.calibration_key(MODEL, source=None, samples=32, seq_len=512, seed=0)


@pytest.mark.parametrize("change", [dict(samples=16), dict(seq_len=256), dict(seed=1), dict(source="wikitext")])
def test_every_calibration_setting_is_in_its_key(change):
    base = dict(source=None, samples=32, seq_len=512, seed=0)
    assert keys.calibration_key(MODEL, **base) != keys.calibration_key(MODEL, **{**base, **change})


def test_the_importance_key_follows_weights_calibration_method_and_k():
    k = keys.importance_key(MODEL, CALIB, method="cosine", k=1)
    other_weights = dataclasses.replace(MODEL, content_hash="ef" * 32)
    assert len({k, keys.importance_key(other_weights, CALIB, method="cosine", k=1),
                keys.importance_key(MODEL, dataclasses.replace(CALIB, hash="00" * 32), method="cosine", k=1),
                keys.importance_key(MODEL, CALIB, method="jaccard", k=1),
                keys.importance_key(MODEL, CALIB, method="cosine", k=10)}) == 5
    # where the model was read from, or what a run called it, does not change what it computes
    assert k == keys.importance_key(dataclasses.replace(MODEL, source="/elsewhere.gguf", spec="x"), CALIB,
                                    method="cosine", k=1)


def test_a_measured_loss_key_names_a_calibrated_quantizer():
    from tasks.stages import MEASURED_LOSS, _importance_key

    rtn = _importance_key(MODEL, CALIB, MEASURED_LOSS, 1)
    assert rtn == _importance_key(MODEL, CALIB, MEASURED_LOSS, 5, "RTN")  # k means nothing to a loss record
    assert rtn == keys.importance_key(MODEL, CALIB, method=MEASURED_LOSS, k=0)  # the keys stores already hold
    assert _importance_key(MODEL, CALIB, MEASURED_LOSS, 1, "gptq") not in (rtn, keys.importance_key(
        MODEL, CALIB, method=MEASURED_LOSS, k=0, quantizer="rtn"))
    assert _importance_key(MODEL, CALIB, "cosine", 1, "gptq") == keys.importance_key(MODEL, CALIB, method="cosine", k=1)
    with pytest.raises(ValueError, match="unknown quantizer 'awq'"):
        _importance_key(MODEL, CALIB, MEASURED_LOSS, 1, "awq")


def test_plan_quantize_evaluate_publish_keys_chain():
    plan = keys.plan_key(IMP, DEVICE, PlanOptions())
    assert plan != keys.plan_key(IMP, DEVICE, PlanOptions(context=2048))
    assert plan != keys.plan_key(dataclasses.replace(IMP, key="importance-2"), DEVICE, PlanOptions())
    assert plan != keys.plan_key(IMP, dataclasses.replace(DEVICE, profile={"name": "x", "memory_bytes": 1}),
                                 PlanOptions())
    assert keys.quantize_key(MODEL, "a" * 64) != keys.quantize_key(MODEL, "b" * 64)
    rtn = keys.quantize_key(MODEL, "a" * 64)
    assert rtn == keys.quantize_key(MODEL, "a" * 64, "rtn", None)  # round-to-nearest keys did not change
    gptq = {keys.quantize_key(MODEL, "a" * 64, "gptq", h) for h in ("1" * 64, "2" * 64)}
    assert len(gptq) == 2 and rtn not in gptq  # a calibrated artifact follows its calibration set
    ev = keys.evaluate_key(ART, EvalOptions())
    assert ev != keys.evaluate_key(ART, EvalOptions(fidelity_windows=2))
    assert ev != keys.evaluate_key(dataclasses.replace(ART, key="quantize-2"), EvalOptions())
    result = EvalResult(key=ev, report="/r.json", plan_id="p", device="d", fidelity=None, seconds=1.0)
    assert keys.publish_key(result, "s3://a/b") != keys.publish_key(result, "s3://a/c")


def test_identity_probe_follows_the_weights_files(tmp_path):
    weights = tmp_path / "m.gguf"
    weights.write_bytes(b"x" * 10)
    first = keys.identity_probe(str(weights), None)
    assert first == keys.identity_probe(str(weights), None)
    os.utime(weights, ns=(1, 1))  # touched: lsaq rehashes, so the identity is looked up again
    assert keys.identity_probe(str(weights), None) != first
    assert keys.identity_probe("org/model", None) is None  # the hub may have moved: never cached
    assert keys.identity_probe("org/model", "abc123") is not None


@given(st.text(min_size=1, max_size=40))
def test_no_slug_collides_with_the_cache_prefix(name):
    try:
        slug = slugify(name)
    except BadKeyError:
        return
    assert not slug.startswith("_") and slug != CACHE


def test_store_results_round_trip_under_the_cache_prefix(tmp_path):
    store = open_store(tmp_path / "store")
    block = StoreResults(uri=str(tmp_path / "store"))
    assert block.write_path("score-123", b'{"result": 1}') == "score-123"
    assert store.get_bytes(cache_key("score-123")) == b'{"result": 1}'
    assert block.read_path("score-123") == b'{"result": 1}'
    assert anyio.run(block.aread_path, "score-123") == b'{"result": 1}'
    anyio.run(block.awrite_path, "plan-9", b"x")
    assert store.list(CACHE) == ["_cache/plan-9", "_cache/score-123"]
    with pytest.raises(ObjectNotFoundError):
        block.read_path("missing")
    with pytest.raises(BadKeyError):
        block.write_path("../escape", b"x")


def test_intermediate_results_are_complete_only_once_their_record_is_there(tmp_path):
    store = open_store(tmp_path / "store")
    src = tmp_path / "src"
    src.mkdir()
    (src / "tokens.safetensors").write_bytes(b"t" * 100)
    (src / "calibration.json").write_text("{}")
    prefix = calibration_prefix("m", "r", "calibration-1")
    files = {n: src / n for n in ("tokens.safetensors", "calibration.json")}
    store.put_file(f"{prefix}/tokens.safetensors", src / "tokens.safetensors")  # an interrupted upload
    assert not has_files(store, prefix, record="calibration.json")
    assert put_files(store, prefix, files, record="calibration.json") is True
    assert has_files(store, prefix, record="calibration.json")
    assert put_files(store, prefix, files, record="calibration.json") is False  # the first copy stays
    got = fetch_files(store, prefix, list(files), tmp_path / "got")
    assert {p.name: p.read_bytes() for p in got.iterdir()} == {n: p.read_bytes() for n, p in files.items()}
    with pytest.raises(ObjectNotFoundError):
        fetch_files(store, prefix, ["missing.bin"], tmp_path / "none")
    assert not (tmp_path / "none").exists()
    with pytest.raises(ValueError, match="record file"):
        put_files(store, prefix, files, record="other.json")


@pytest.mark.parametrize("error, retried", [(StoreUnavailableError("endpoint refused"), True),
                                            (StoreError("503 slow down"), True),
                                            (ValueError("unknown device 'x'"), False),
                                            (RuntimeError("numerics"), False)])
def test_only_store_failures_are_retried(error, retried):
    from prefect.states import Failed

    assert io_failure(None, None, Failed(data=error)) is retried
