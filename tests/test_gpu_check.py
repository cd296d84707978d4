"""benchmarks/gpu_check.py run on this CPU-only machine: `auto` is the CPU, so every comparison is exact; and it
needs no package beyond torch, transformers, safetensors and accelerate (and what they bring)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# lsaq's dependencies a bare GPU image lacks (torch, transformers and accelerate there): importing one fails here.
# boto3 is left alone: accelerate imports it whenever it is installed.
ABSENT = ("prefect", "gguf", "datasets", "lm_eval", "moto")


def test_gpu_check_runs_every_stage_with_only_the_gpu_machines_packages(tmp_path):
    blocked = tmp_path / "blocked"
    for name in ABSENT:
        (blocked / name).mkdir(parents=True)
        (blocked / name / "__init__.py").write_text(f"raise ImportError('{name} is not installed here')\n")
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(blocked), str(ROOT)]), "LSAQ_CACHE": str(tmp_path / "c")}
    proc = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--dir", str(scratch)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "6 of 6 comparisons hold" in out and "FAIL" not in out
    assert "ok   quantize rtn: artifact files identical" in out
    rows = [line for line in out.splitlines() if line.startswith("| ") and "auto" in line]
    assert len(rows) == 7 and all("on cpu (float32), peak host memory" in r for r in rows), rows
    assert list(scratch.iterdir()) == []  # the checkpoint, calibration set and builds removed


def test_gpu_check_script_parses():
    assert subprocess.run(["bash", "-n", str(ROOT / "benchmarks" / "gpu_check.sh")]).returncode == 0
