"""The build flow end to end: a real Prefect server (``prefect_test_harness``, its own PREFECT_HOME), a real S3 API
(moto's server on 127.0.0.1, through the store's boto3 code path) and the real SmolLM2-135M.

One store serves the whole module, as one team's bucket would: machine 1 builds two devices, reruns (all
``Cached``), then machine 2 (a fresh PREFECT_HOME and server, its own scratch directory, the same bucket) reruns
and adds a third device. Task states, not timing, say what was computed.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import os
import re
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

import pytest

from lsaq.store.stage import download, list_builds, open_store

pytest.importorskip("moto")
pytestmark = [pytest.mark.model, pytest.mark.slow]

CACHED = re.compile(r"_cache/[a-z-]+-[0-9a-f]+")  # the record of a cached result, under its content key
# a board running torch (compressed-tensors, FP16/INT8) and one running llama.cpp (GGUF, INT8/INT4): plans differ
DEVICES = ["board-torch", "rpi-zero-2w"]
BOARDS = Path(__file__).with_name("boards.yaml")  # board-torch
# a small importance run and evaluation, ranked and rounded to nearest: semantics, not quality
FAST = dict(samples=4, seq_len=64, fidelity_windows=1, strategy="lsaq", quantizer="rtn")


@pytest.fixture(scope="module")
def s3_store(s3_env):
    """One team's bucket on moto, reached through the environment (see conftest)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
        yield s3_env


@contextlib.contextmanager
def machine(home: Path):
    """A Prefect 'machine': its own PREFECT_HOME and a fresh server with an empty database."""
    from prefect.testing.utilities import prefect_test_harness

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PREFECT_HOME", str(home))
        with prefect_test_harness(server_startup_timeout=90):
            yield


def run(model: Path, store: str, work: Path, **params):
    """Run the flow; ``(final state, {task: Counter of state names})`` of that flow run."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from flows.build import build

    state = build(model=str(model), store=store, work=str(work), **{**FAST, "device_file": str(BOARDS), **params},
                  return_state=True)
    # The server records task states from events, asynchronously: wait until it has every run's final state
    # (a read straight after the flow returned has seen a Cached task still 'Running').
    deadline = time.monotonic() + 60
    with get_client(sync_client=True) as client:
        while True:
            runs = client.read_task_runs(flow_run_filter=FlowRunFilter(
                id=FlowRunFilterId(any_=[state.state_details.flow_run_id])))
            if all(r.state and r.state.is_final() for r in runs) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
    states: dict[str, Counter] = {}
    for r in runs:
        states.setdefault(r.name.split()[0], Counter())[r.state.name] += 1
    return state, states


@pytest.fixture(scope="module")
def machine1(s3_store, shared_gguf, tmp_path_factory):
    """Machine 1: a first two-device build, then the same run again; both runs' states."""
    root = tmp_path_factory.mktemp("machine1")
    with machine(root / "prefect"):
        first = run(shared_gguf, s3_store, root / "work", devices=DEVICES)
        again = run(shared_gguf, s3_store, root / "work", devices=DEVICES)
    return first, again


def test_two_devices_publish_two_verified_builds_from_one_importance_run(machine1, s3_store, tmp_path):
    from tasks.summary import format_table, rows

    (state, states), _ = machine1
    assert state.is_completed(), state.message
    summary = state.result()
    assert [o.device for o in summary.outcomes] == DEVICES and not summary.failed
    # one identity, one calibration set and one importance run serve both devices
    for stage in ("identify", "calibrate", "score"):
        assert states[stage] == Counter({"Completed": 1}), (stage, states[stage])
    for stage in ("resolve", "plan", "quantize", "evaluate", "publish"):
        assert states[stage] == Counter({"Completed": 2}), (stage, states[stage])

    store = open_store(s3_store)
    builds = {m.device_slug: m for m in list_builds(store)}
    assert set(builds) == set(DEVICES)
    bits = {d: m.avg_bits["quantizable_linears"] for d, m in builds.items()}
    assert 4 < bits["rpi-zero-2w"] < bits["board-torch"] < 16  # the plans differ
    weights = {"board-torch": "model.safetensors", "rpi-zero-2w": "model.gguf"}  # torch's format, llama.cpp's
    assert builds["rpi-zero-2w"].runtimes == ("llama.cpp",) and "transformers" in builds["board-torch"].runtimes
    for d, m in builds.items():
        assert m.required_bytes <= m.device["usable_bytes"] and m.evaluation["fidelity"]["positions"] > 0
        got = download(store, tmp_path / d, device=d)  # every file checked against the manifest's sha256
        assert got.manifest.build_id == m.build_id and (got.path / weights[d]).is_file()
        outcome = next(o for o in summary.outcomes if o.device == d)
        assert outcome.build.build_id == m.build_id and outcome.build.fidelity["top1_agreement"] > 0.3
        # where each stage computed and the most memory it held, as the summary shows it
        assert {s: r["device"] for s, r in outcome.build.memory.items()} == {"quantize": "cpu", "evaluate": "cpu"}
        assert all(r["peak_host_bytes"] > 2**20 and r["peak_device_bytes"] is None
                   for r in outcome.build.memory.values())
    assert summary.importance_memory["device"] == "cpu" and summary.importance_memory["peak_host_bytes"] > 2**20
    assert summary.calibration_memory["device"] == "cpu" and summary.calibration_memory["peak_host_bytes"] > 2**20
    assert "peak memory" in format_table(summary) and "GiB" in rows(summary)[0]["peak memory"]
    runs_in = {r["device"]: r["runs in"] for r in rows(summary)}  # llama.cpp's resident memory while generating
    assert runs_in["board-torch"] == "-" and runs_in["rpi-zero-2w"].endswith("MiB")
    generation = builds["rpi-zero-2w"].evaluation["generation"]
    assert generation["fits"] and generation["peak_rss_bytes"] <= generation["predicted_bytes"]
    keys = store.list("")
    assert sum("/importance/" in k for k in keys) == 1 and sum("/calibration/" in k for k in keys) == 2
    assert not any(os.environ["AWS_SECRET_ACCESS_KEY"] in store.get_bytes(k).decode(errors="ignore")
                   for k in keys if k.endswith(".json") or k.startswith("_cache/"))


def test_a_rerun_is_all_cached(machine1):
    _, (state, states) = machine1
    assert state.is_completed(), state.message
    assert {name for c in states.values() for name in c} == {"Cached"}, states
    assert sum(sum(c.values()) for c in states.values()) == 13  # 3 shared + 2 x 5 per device
    assert [o.state for o in state.result().outcomes] == ["Cached", "Cached"]


def test_a_second_machine_sharing_only_the_store_reuses_everything(machine1, s3_store, shared_gguf,
                                                                   tmp_path_factory):
    root = tmp_path_factory.mktemp("machine2")
    with machine(root / "prefect"):
        state, states = run(shared_gguf, s3_store, root / "work", devices=DEVICES)
        assert state.is_completed(), state.message
        assert {name for c in states.values() for name in c} == {"Cached"}, states
        # a third device: importance reused, only its own stages run (its artifact is made here)
        state, states = run(shared_gguf, s3_store, root / "work", devices=[*DEVICES, "rpi-3b"])
    assert state.is_completed(), state.message
    for stage in ("identify", "calibrate", "score"):
        assert states[stage] == Counter({"Cached": 1}), (stage, states[stage])
    for stage in ("plan", "quantize", "evaluate", "publish"):
        assert states[stage] == Counter({"Cached": 2, "Completed": 1}), (stage, states[stage])
    assert {m.device_slug for m in list_builds(open_store(s3_store))} == {*DEVICES, "rpi-3b"}


def test_a_bad_device_fails_early_and_publishes_nothing(machine1, s3_store, shared_gguf, tmp_path):
    store = open_store(s3_store)
    before = store.list("")
    with machine(tmp_path / "prefect"):
        state, states = run(shared_gguf, s3_store, tmp_path / "work", devices=["beaglebone-black", "no-such-board"])
    assert state.is_failed()
    assert "unknown device 'no-such-board'" in state.message and "rpi-zero-2w" in state.message
    assert set(states) <= {"identify", "resolve"}  # nothing was loaded, nothing planned
    assert not (set(store.list("")) - set(before) - set(store.list("_cache")))
    assert not [k for k in set(store.list("_cache")) - set(before) if not CACHED.fullmatch(k)]  # no failure records


def test_a_bad_parameter_fails_before_any_task(s3_store, shared_gguf, tmp_path):
    """A deployment run with a bad parameter fails with the line lsaq-build prints, before any task: nothing is
    written to the store, its cache included."""
    store = open_store(s3_store)
    before = store.list("")
    with machine(tmp_path / "prefect"):
        for bad, message in ((dict(method="magic"), "unknown importance method 'magic'; valid methods: jaccard"),
                             (dict(budget="1e400GiB"), "--budget: '1e400GiB' is over an exabyte"),
                             (dict(samples=0), "samples must be an integer of at least 1, got 0")):
            state, states = run(shared_gguf, s3_store, tmp_path / "work", devices=DEVICES, **bad)
            assert state.is_failed() and message in state.message, (bad, state.message)
            assert states == {}
    assert store.list("") == before and not (tmp_path / "work").exists()


def test_an_infeasible_device_fails_alone(machine1, s3_store, shared_gguf, tmp_path):
    with machine(tmp_path / "prefect"):
        state, states = run(shared_gguf, s3_store, tmp_path / "work", devices=["rpi-zero-2w"], budget="64MiB")
    assert state.is_failed()
    assert "1 of 2 device builds failed (built: rpi-zero-2w)" in state.message
    assert "budget=64MiB" in state.message and "does not fit" in state.message
    assert states["publish"] == Counter({"Cached": 1})  # the feasible device went through
    assert all(CACHED.fullmatch(k) for k in open_store(s3_store).list("_cache"))  # no failed run's record
    assert not any(m.device_slug.startswith("budget") for m in list_builds(open_store(s3_store)))


def test_two_concurrent_measured_builds_measure_the_layer_loss_once(s3_store, shared_gguf, tmp_path):
    """Two flows on one host, on a fresh store prefix, with strategy 'measured', need the same layer-loss record at
    the same time: one measures it, the other waits on the lock and finds it cached; both plans minimise it, each
    weighing INT4 per-channel against groups of 64 (group_size 'auto': the record measures both). The record is
    measured on a calibration set of its own (measure_samples < samples)."""
    store = s3_store + f"/concurrent-{uuid.uuid4().hex[:6]}"
    results = {}
    with machine(tmp_path / "prefect"):
        def go(device):
            results[device] = run(shared_gguf, store, tmp_path / "work", devices=[device], fidelity_windows=1,
                                  strategy="measured", group_size="auto", measure_samples=2, quantizer="rtn")

        # each thread runs in a copy of this context: the harness's settings (its server) are context variables
        threads = [threading.Thread(target=contextvars.copy_context().run, args=(go, d)) for d in DEVICES]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert all(state.is_completed() for state, _ in results.values()), results
    scored = Counter(name for _, states in results.values() for name in states["score"].elements())
    assert scored == Counter({"Completed": 1, "Cached": 1}), scored
    keys = open_store(store).list("")
    calibrations = [json.loads(open_store(store).get_bytes(k)) for k in keys if k.endswith("/calibration.json")]
    assert sorted(c["calibration"]["samples"] for c in calibrations) == [2, FAST["samples"]]
    [loss] = [k for k in keys if "/importance/" in k]
    assert loss.endswith("/loss.json") and json.loads(open_store(store).get_bytes(loss))["probes"] == [
        "int8", "int4", "int4-g64"]
    plans = [json.loads(open_store(store).get_bytes(k)) for k in keys if "/plans/" in k]
    assert len(plans) == 2 and all(p["options"]["strategy"] == "measured" and p["loss"]["predicted"] > 0
                                   and p["options"]["group_size"] in (None, 64) for p in plans)
