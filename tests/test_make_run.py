"""`make run` on a machine with neither a local corpus nor the hub: the defaults bring or make what they need."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


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
    proc = subprocess.run(["make", "-C", str(ROOT), "-o", ".venv/.installed", "run", f"OUT={out}"],
                          env=env, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    log = proc.stdout + proc.stderr
    assert "generated" in log  # the one line that says which calibration source was used

    importance = json.loads((out / "importance.json").read_text())
    assert importance["calibration"]["kind"] == "generated"
    plan = json.loads((out / "plan.json").read_text())
    assert plan["budget"]["fits"] and plan["importance"]["id"] == importance["id"]
    manifest = json.loads((out / "artifact" / "lsaq_artifact.json").read_text())
    assert manifest["plan_id"] == plan["id"]
    report = json.loads((out / "report.json").read_text())
    fidelity = report["fidelity"]
    assert fidelity["positions"] > 0 and 0 <= fidelity["kl_mean"] <= fidelity["kl_p99"]
    assert 0.5 < fidelity["top1_agreement"] <= 1.0
