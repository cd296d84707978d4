"""The product end to end, as a team runs it: a real ``prefect server start``, ``lsaq-serve``, moto's S3 server, and
only the command lines a user types (``prefect deployment run``, ``lsaq download``, ``lsaq generate``).

Every server and process runs on 127.0.0.1 with its own PREFECT_HOME and lsaq cache, and is stopped by this test
(each in its own process group, so the flow runs that ``serve`` started go with it). The model is a copy of the
shared GGUF, so that the watch flow can see it change.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest

from lsaq.paths import shared_dir
from lsaq.store.stage import list_builds, open_store

pytestmark = [pytest.mark.model, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SMALL = ["--param", "samples=4", "--param", "seq_len=64", "--param", "fidelity_windows=1",  # semantics, not quality
         "--param", "strategy=lsaq", "--param", "quantizer=rtn"]
STAGES = {"identify", "resolve", "calibrate", "score", "plan", "quantize", "evaluate", "publish"}  # task run names
FINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def started(args: list[str], log: Path, env: dict[str, str]) -> Iterator[subprocess.Popen]:
    """A background process in its own process group, logging to ``log``; on exit the whole group is stopped
    (SIGTERM, then SIGKILL after 30 s) and must be gone."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO, start_new_session=True)
    try:
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # a flow run process left behind by serve
        time.sleep(0.5)
        with pytest.raises(ProcessLookupError):
            os.killpg(proc.pid, 0)  # nothing of the group is left


class Api:
    """The Prefect server's REST API, read directly (this process's Prefect settings stay untouched)."""

    def __init__(self, url: str) -> None:
        self.http = httpx.Client(base_url=url, timeout=30)

    def healthy(self) -> bool:
        try:
            return self.http.get("/health").status_code == 200
        except httpx.HTTPError:
            return False

    def deployment(self, name: str) -> dict[str, Any] | None:
        r = self.http.get(f"/deployments/name/{name}")
        return r.json() if r.status_code == 200 else None

    def flow_runs(self, **filters: Any) -> list[dict[str, Any]]:
        return self.http.post("/flow_runs/filter", json={**filters, "sort": "EXPECTED_START_TIME_ASC"}).json()

    def runs_of(self, deployment: str) -> list[dict[str, Any]]:
        return self.flow_runs(deployments={"id": {"any_": [self.deployment(deployment)["id"]]}})

    def latest_table(self, key: str) -> list[dict[str, Any]]:
        """The rows of the newest table artifact under ``key``."""
        (artifact,) = self.http.post("/artifacts/filter", json={
            "artifacts": {"key": {"any_": [key]}}, "sort": "CREATED_DESC", "limit": 1}).json()
        data = artifact["data"]
        return json.loads(data) if isinstance(data, str) else data

    def flow_run(self, run_id: str) -> dict[str, Any]:
        return self.http.get(f"/flow_runs/{run_id}").json()

    def wait_final(self, run_id: str, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while (run := self.flow_run(run_id))["state"]["type"] not in FINAL and time.monotonic() < deadline:
            time.sleep(2)
        return run

    def task_states(self, run_id: str) -> dict[str, Counter]:
        """``{stage: Counter(state names)}`` of a flow run's tasks, once the server has every final state (it
        records them from events, a moment after the flow run ends)."""
        deadline = time.monotonic() + 60
        while True:
            runs = self.http.post("/task_runs/filter", json={"flow_runs": {"id": {"any_": [run_id]}}}).json()
            if all(r["state"]["type"] in FINAL for r in runs) or time.monotonic() > deadline:
                break
            time.sleep(1)
        states: dict[str, Counter] = {}
        for r in runs:
            states.setdefault(r["name"].split()[0], Counter())[r["state"]["name"]] += 1
        return states


def rename_gguf(path: Path, char: bytes) -> None:
    """Change one character of the GGUF's ``general.name`` in place: new bytes (a new revision), same model."""
    with open(path, "r+b") as f:
        head = f.read(1 << 16)
        at = head.index(b"general.name") + len(b"general.name")
        kind, size = struct.unpack("<IQ", head[at:at + 12])
        assert kind == 8 and size > 0, (kind, size)  # a GGUF string
        f.seek(at + 12)
        f.write(char)


def test_a_team_builds_serves_watches_and_downloads_through_prefect_and_s3(shared_gguf, moto_s3, s3_env, tmp_path):
    model_dir = tmp_path / "models"
    model_dir.mkdir()
    for f in shared_gguf.parent.iterdir():  # the GGUF and the HF tokenizer/config files beside it
        if f.is_file():
            shutil.copyfile(f, model_dir / f.name)
    model = str(model_dir / shared_gguf.name)
    watch_config = tmp_path / "watch.yaml"
    watch_config.write_text(f"version: 1\nmodels:\n  - model: {json.dumps(model)}\n    devices: [rpi-zero-2w]\n")

    port = free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "AWS_", "LSAQ_"))}
    env.update(moto_s3.env, PREFECT_HOME=str(tmp_path / "prefect"), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_API_URL=api_url, LSAQ_CACHE=str(tmp_path / "lsaq-cache"), LSAQ_SHARED=str(shared_dir()),
               PYTHONUNBUFFERED="1")
    api = Api(api_url)
    serve_log = tmp_path / "serve.log"
    t0 = time.monotonic()

    def step(what: str) -> None:  # shown with -s: where the minutes go
        print(f"[e2e {time.monotonic() - t0:6.1f}s] {what}", flush=True)

    def cli(*args: str, timeout: float = 420) -> str:
        r = subprocess.run(args, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
        out = r.stdout + r.stderr
        assert r.returncode == 0, f"{args} exited {r.returncode}:\n{out[-3000:]}\n--- serve:\n" \
                                  f"{serve_log.read_text()[-6000:]}"
        return out

    def deployment_run(name: str, *params: str) -> str:
        out = cli(str(BIN / "prefect"), "deployment", "run", name, *params, "--watch")
        assert "Completed" in out, out
        return re.search(r"UUID: ([0-9a-f-]{36})", out).group(1)

    server = [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    with started(server, tmp_path / "server.log", env):
        deadline = time.monotonic() + 120
        while not api.healthy():
            assert time.monotonic() < deadline, (tmp_path / "server.log").read_text()[-3000:]
            time.sleep(1)
        step("server healthy")
        serve = [str(BIN / "lsaq-serve"), "--store", moto_s3.uri, "--watch-config", str(watch_config)]
        with started(serve, serve_log, env):
            deadline = time.monotonic() + 120
            while api.deployment("lsaq/build") is None or api.deployment("lsaq-watch/scheduled") is None:
                assert time.monotonic() < deadline, serve_log.read_text()[-3000:]
                time.sleep(1)
            step("deployments served")
            # the server's scheduler creates the watch's upcoming runs (it did not with SQLAlchemy 2.1: see
            # constraints.txt)
            while not any(r["state"]["type"] == "SCHEDULED" for r in api.runs_of("lsaq-watch/scheduled")):
                assert time.monotonic() < deadline, (tmp_path / "server.log").read_text()[-3000:]
                time.sleep(1)

            step("watch runs scheduled")
            # 1. One device, through the CLI a user types: the build lands in S3 with a verifying manifest.
            deployment_run("lsaq/build", "--param", "device=rpi-zero-2w", "--param", f"model={model}", *SMALL)
            store = open_store(s3_env)
            (first,) = list_builds(store)
            assert first.device_slug == "rpi-zero-2w" and first.required_bytes <= first.device["usable_bytes"]
            got = cli(str(BIN / "lsaq"), "download", "--store", moto_s3.uri, "--model", first.model_slug,
                      "--device", "rpi-zero-2w", "--to", str(tmp_path / "rpi"))
            assert f"downloaded build {first.build_id}" in got
            text = cli(str(BIN / "lsaq"), "generate", str(tmp_path / "rpi"), "--prompt", "The capital of France is",
                       "--max-new-tokens", "8")
            assert "The capital of France is" in text

            step("one device built, downloaded, generated")
            # 2. Both devices, each as its own flow run of lsaq/build (the scale-out path): the new device's run
            #    reuses the importance run (Cached) and computes only its own stages; the old one is all Cached.
            parent = deployment_run("lsaq/build", "--param", 'devices=["rpi-zero-2w", "beaglebone-black"]',
                                    "--param", f"model={model}", "--param", "dispatch=lsaq/build", *SMALL)
            dispatched = api.flow_runs(flow_runs={"tags": {"all_": ["dispatched"]}})
            children = {r["parameters"]["device"]: r for r in dispatched}
            assert set(children) == {"rpi-zero-2w", "beaglebone-black"}
            assert all(r["state"]["type"] == "COMPLETED" for r in children.values())
            old, new = (api.task_states(children[d]["id"]) for d in ("rpi-zero-2w", "beaglebone-black"))
            assert {name for c in old.values() for name in c} == {"Cached"}, old
            for stage in ("identify", "calibrate", "score"):
                assert new[stage] == Counter({"Cached": 1}), (stage, new)
            for stage in ("plan", "quantize", "evaluate", "publish"):
                assert new[stage] == Counter({"Completed": 1}), (stage, new)
            in_parent = api.task_states(parent)
            assert in_parent.pop("dispatch") == Counter({"Completed": 2})
            stand_ins = [in_parent.pop(k) for k in list(in_parent) if k not in STAGES]
            assert sum(stand_ins, Counter()) == Counter({"Completed": 2})  # the task runs standing for the subflows
            assert in_parent.pop("resolve") == Counter({"Cached": 1, "Completed": 1}), in_parent  # a new device
            assert {name for c in in_parent.values() for name in c} == {"Cached"}, in_parent  # records read back

            step("two devices dispatched")
            # 3. On-device selection under an imposed memory limit: the most faithful build that fits.
            builds = {m.device_slug: m for m in list_builds(store)}
            small, large = builds["rpi-zero-2w"], builds["beaglebone-black"]
            assert small.required_bytes < large.required_bytes
            for limit, expect in [(large.required_bytes, "beaglebone-black"),
                                  (large.required_bytes - 1, "rpi-zero-2w")]:
                got = cli(str(BIN / "lsaq"), "download", "--store", moto_s3.uri, "--model", first.model_slug,
                          "--device", "local", "--max-memory", str(limit), "--to", str(tmp_path / "local"), "--force")
                assert f"chose {expect} {builds[expect].build_id}" in got, got
            r = subprocess.run([str(BIN / "lsaq"), "download", "--store", moto_s3.uri, "--model", first.model_slug,
                                "--device", "local", "--max-memory", str(small.required_bytes - 1),
                                "--to", str(tmp_path / "none")], env=env, capture_output=True, text=True)
            assert r.returncode != 0 and "no build of" in r.stderr and "beaglebone-black" in r.stderr, r.stderr
            assert not (tmp_path / "none").exists()

            step("local selection")
            # 4. The watch: nothing changed, nothing starts; the model changes, one rebuild starts (once, however
            #    often the watch runs meanwhile) and publishes the new revision.
            # the rebuild also quantizes with GPTQ on the stored calibration set, its codes kept in the board's GGUF
            # (INT4 as Q4_0)
            watch = ["--param", 'build_parameters={"samples": 4, "seq_len": 64, "fidelity_windows": 1, '
                                '"strategy": "lsaq", "quantizer": "gptq", "gguf_int4": "q4_0"}']
            before = len(api.runs_of("lsaq/build"))
            deployment_run("lsaq-watch/scheduled", *watch)
            assert len(api.runs_of("lsaq/build")) == before
            step("watch no-op")
            rename_gguf(Path(model), b"T")
            deployment_run("lsaq-watch/scheduled", *watch)
            deployment_run("lsaq-watch/scheduled", *watch)  # while that build runs (or, if it was quick, after it)
            (row,) = api.latest_table("lsaq-watch")
            assert "rpi-zero-2w" in (row["building"], row["built"]) and row["run"] == "-", row
            triggered = api.runs_of("lsaq/build")[before:]
            assert len(triggered) == 1, [(r["name"], r["parameters"]) for r in triggered]
            assert triggered[0]["parameters"]["model"] == model
            assert triggered[0]["parameters"]["devices"] == ["rpi-zero-2w"]
            step("watch triggered once")
            assert api.wait_final(triggered[0]["id"], timeout=300)["state"]["type"] == "COMPLETED"
            rebuilt = [m for m in list_builds(store) if m.revision != first.revision]
            assert [m.device_slug for m in rebuilt] == ["rpi-zero-2w"]
            made = json.loads(store.get_bytes(f"{rebuilt[0].prefix}/lsaq_artifact.json"))
            assert made["quantizer"] == "gptq" and made["calibration"] and made["format"] == "gguf"
            assert first.runtimes == rebuilt[0].runtimes == ("llama.cpp",)
            assert rebuilt[0].required_bytes <= rebuilt[0].device["usable_bytes"]
            step("rebuilt")
            before = len(api.runs_of("lsaq/build"))
            deployment_run("lsaq-watch/scheduled", *watch)  # built now: nothing to do
            assert len(api.runs_of("lsaq/build")) == before
            step("watch no-op after the rebuild")
