"""A safetensors checkpoint as a float GGUF file: llama.cpp's own converter, run once per model and cached.

A GGUF build (:mod:`lsaq.quantization.gguf_build`) is written from a GGUF source, whose tensors are in llama.cpp's
names and layouts and whose metadata (architecture, hyperparameters, tokenizer with its pre-tokenizer, chat
template) llama.cpp reads. For a Hugging Face checkpoint that source is made by llama.cpp's ``convert_hf_to_gguf.py``
(the reference for every architecture llama.cpp runs: q/k row order, rope tables, which tokenizer and
pre-tokenizer a vocabulary is), in a subprocess, tensor by tensor. lsaq runs the copy that came with the llama.cpp
it compiled: ``make setup`` unpacks it from the same llama-cpp-python sdist into ``.venv/share/llama.cpp``
(``$LSAQ_LLAMA_CONVERT`` names another ``convert_hf_to_gguf.py``).

The float type is the checkpoint's own (BF16, F16, else F32), so the GGUF holds exactly the values every lsaq stage
reads. The file is cached under the checkpoint's content hash: ``<lsaq cache>/hf-gguf/<hash>-<type>.gguf``, written
through a temporary beside it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
from pathlib import Path

from lsaq.atomic import temp_file
from lsaq.paths import cache_dir

log = logging.getLogger(__name__)

CONVERT_ENV = "LSAQ_LLAMA_CONVERT"
OUTTYPES = {"bfloat16": "bf16", "float16": "f16"}  # the checkpoint's declared dtype -> converter --outtype; else f32


def converter() -> Path:
    """llama.cpp's ``convert_hf_to_gguf.py``: ``$LSAQ_LLAMA_CONVERT``, else the set-up's copy beside this Python
    (``<prefix>/share/llama.cpp``); ``ValueError`` saying where it was looked for and how to get it."""
    env = os.environ.get(CONVERT_ENV)
    path = Path(env).expanduser() if env else Path(sys.prefix) / "share" / "llama.cpp" / "convert_hf_to_gguf.py"
    if not path.is_file():
        where = f"${CONVERT_ENV} names {path}, which is not a file" if env else f"no {path}"
        raise ValueError(f"a GGUF build of a safetensors checkpoint needs llama.cpp's convert_hf_to_gguf.py ({where}): "
                         "`make setup` unpacks it from llama-cpp-python's sdist, or set "
                         f"{CONVERT_ENV} to a llama.cpp checkout's copy")
    return path


def outtype(declared_dtype: str | None) -> str:
    """The converter's ``--outtype`` that keeps a checkpoint's values: bf16, f16, else f32."""
    return OUTTYPES.get(declared_dtype or "", "f32")


def hf_to_gguf(load_dir: Path, content_hash: str, declared_dtype: str | None) -> Path:
    """The float GGUF of the Hugging Face checkpoint in ``load_dir`` (content hash ``content_hash``), converted once
    by llama.cpp's converter and cached. ``ValueError`` with the converter's last line when it fails (an architecture
    or vocabulary llama.cpp does not know); nothing is left behind."""
    script = converter()
    kind = outtype(declared_dtype)
    target = cache_dir() / "hf-gguf" / f"{content_hash[:24]}-{kind}.gguf"
    if target.is_file():
        return target
    log.info("converting %s to GGUF (%s) with llama.cpp's converter into %s", load_dir, kind, target)
    tmp = temp_file(target)
    try:
        proc = subprocess.run([sys.executable, str(script), str(load_dir), "--outtype", kind, "--outfile", str(tmp)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            lines = [line for line in (proc.stderr or proc.stdout).splitlines() if line.strip()]
            raise ValueError(f"llama.cpp's converter could not convert {load_dir} to GGUF: "
                             f"{lines[-1].strip() if lines else f'exit status {proc.returncode}'}")
        os.replace(tmp, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    return target


__all__ = ["CONVERT_ENV", "converter", "hf_to_gguf", "outtype"]
