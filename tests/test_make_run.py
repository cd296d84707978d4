"""`make run` on a machine with neither a local corpus nor the hub: the defaults bring or make what they need."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from lsaq.store.stage import list_builds, open_store

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_run_offline_without_shared(tmp_path):
    empty = tmp_path / "no-shared"
    empty.mkdir()
    out = tmp_path / "out"
    env = {
        **os.environ,
        "LSAQ_SHARED": str(empty),  # no local corpus (and no ../shared fallback)
        "HF_HUB_OFFLINE": "1",  # the hub is unreachable
        "HF_DATASETS_OFFLINE": "1",
        "HF_ENDPOINT": "http://127.0.0.1:9",  # and would not answer if asked
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"),
    }
    # -o: the venv this test runs in is the set-up; do not reinstall it.
    make = ["make", "-C", str(ROOT), "-o", ".venv/.installed", "run", f"OUT={out}"]
    proc = subprocess.run(make, env=env, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    log = proc.stdout + proc.stderr
    assert "generated" in log  # the one line that says which calibration source was used
    tasks = task_states(log)
    assert len(tasks) == 13 and set(tasks.values()) == {"Completed"}, tasks  # 3 shared + 5 per device

    store = open_store(out / "store")
    builds = {m.device_slug: m for m in list_builds(store)}
    assert set(builds) == {"beaglebone-black", "rpi-zero-2w"}
    assert builds["beaglebone-black"].avg_bits != builds["rpi-zero-2w"].avg_bits  # the plans differ
    for device, m in builds.items():
        assert m.required_bytes <= m.device["usable_bytes"]
        fidelity = m.evaluation["fidelity"]
        assert fidelity["positions"] > 0 and 0 <= fidelity["kl_mean"] <= fidelity["kl_p99"]
        assert 0.5 < fidelity["top1_agreement"] <= 1.0
        assert m.prefix in proc.stdout  # the printed table says where each build is
    calib = [k for k in store.list("") if k.endswith("/calibration.json")]
    assert len(calib) == 1 and json.loads(store.get_bytes(calib[0]))["calibration"]["kind"] == "generated"
    assert "Paris" in proc.stdout or "tokens/s" in proc.stdout  # the downloaded build generates

    again = subprocess.run(make, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    tasks = task_states(again.stdout + again.stderr)
    assert len(tasks) == 13 and set(tasks.values()) == {"Cached"}, tasks
    assert {m.build_id for m in list_builds(store)} == {m.build_id for m in builds.values()}


def task_states(log: str) -> dict[str, str]:
    """Task run name -> final state name, from Prefect's console log."""
    return dict(re.findall(r"Task run '([^']+)' - Finished in state (\w+)", log))
