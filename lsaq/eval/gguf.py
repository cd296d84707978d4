"""Evaluating a GGUF build in its own runtime: llama.cpp's logits against the float model's on the same windows.

A GGUF build is what runs on the device, so it is measured there, not through a torch re-implementation:

* **fidelity** (KL, top-1): the float model is walked one decoder layer at a time as for any build, and each
  window's token ids go unchanged into llama.cpp (``logits_all``: the ``[T, V]`` logits of every position), one
  window at a time (:func:`lsaq.eval.fidelity.stream_fidelity` with a per-window candidate);
* **perplexity**: the same windows and statistic as a float model's (:func:`lsaq.eval.perplexity.perplexity`) from
  llama.cpp's logits;
* **resident memory while generating**: the build generates in a fresh process at its plan's context
  (:mod:`lsaq.quantization.gguf_runtime`); its peak RSS is recorded beside the plan's prediction, and a build
  that takes more than its device's usable memory fails its evaluation.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from torch import nn

from lsaq.eval.models import EvalModel, ModelSource
from lsaq.eval.options import DEFAULT_FIDELITY_SEQ_LEN, EvalOptions
from lsaq.planning.planner import Plan
from lsaq.units import format_bytes

PROMPT = "The history of the city begins"
GENERATED_TOKENS = 32


class GgufModel(nn.Module):
    """A GGUF build opened in llama.cpp (``llama_cpp.Llama`` with ``logits_all``) as the evaluation calls a model:
    ``model(input_ids=[B, T]).logits`` -> ``[B, T, V]`` float32, each row evaluated from an empty cache."""

    def __init__(self, llm: Any) -> None:
        super().__init__()
        self.llm = llm
        self.config = SimpleNamespace(max_position_embeddings=int(llm.n_ctx()))

    def window(self, ids: torch.Tensor) -> torch.Tensor:
        """The logits ``[T, V]`` float32 of one window of token ids ``[T]``."""
        tokens = [int(t) for t in ids.tolist()]
        if len(tokens) > self.config.max_position_embeddings:
            raise ValueError(f"a window of {len(tokens)} tokens is longer than the context llama.cpp was opened "
                             f"with ({self.config.max_position_embeddings})")
        self.llm.reset()
        self.llm.eval(tokens)
        return torch.from_numpy(np.array(self.llm.scores[:len(tokens)], dtype=np.float32))

    def forward(self, input_ids: torch.Tensor, use_cache: bool = False) -> SimpleNamespace:
        return SimpleNamespace(logits=torch.stack([self.window(row) for row in input_ids]))


@dataclass(frozen=True)
class GenerationMemory:
    """A build generating in a fresh process: peak resident memory against the plan's prediction and the
    device's usable memory."""

    peak_rss_bytes: int
    predicted_bytes: int  # the plan's run-time requirement (weights, KV cache, compute buffer, process)
    usable_bytes: int
    context: int
    tokens: int
    tokens_per_second: float

    @property
    def fits(self) -> bool:
        return self.peak_rss_bytes <= self.usable_bytes

    def to_json(self) -> dict[str, Any]:
        return {"peak_rss_bytes": self.peak_rss_bytes, "predicted_bytes": self.predicted_bytes,
                "usable_bytes": self.usable_bytes, "context": self.context, "tokens": self.tokens,
                "tokens_per_second": self.tokens_per_second, "fits": self.fits}


def generation_memory(build: str | Path, plan: Plan, tokens: int = GENERATED_TOKENS) -> GenerationMemory:
    """Generate ``tokens`` from the GGUF build directory ``build`` in a fresh Python process and read its peak
    resident memory (:func:`lsaq.quantization.gguf_runtime.main`)."""
    cmd = [sys.executable, "-m", "lsaq.quantization.gguf_runtime", str(build), PROMPT, str(tokens)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"{build}: llama.cpp could not generate from the build ({tail})")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    return GenerationMemory(
        peak_rss_bytes=int(out["peak_rss_bytes"]), predicted_bytes=plan.breakdown.required,
        usable_bytes=plan.device.usable, context=plan.options.context, tokens=int(out["tokens"]),
        tokens_per_second=out["tokens"] / out["seconds"] if out["seconds"] > 0 else 0.0)


def check_fits_device(build: str | Path, plan: Plan, memory: GenerationMemory) -> None:
    """``ValueError`` when the build took more resident memory while generating than its device can give."""
    if not memory.fits:
        raise ValueError(
            f"{build}: llama.cpp took {format_bytes(memory.peak_rss_bytes)} resident while generating at context "
            f"{memory.context}, more than the {format_bytes(memory.usable_bytes)} usable on {plan.device.name} "
            f"(the plan predicted {format_bytes(memory.predicted_bytes)}); plan with a shorter --context or a "
            "smaller budget")


def open_gguf_build(path: str, base_src: str | None, options: EvalOptions) -> EvalModel:
    """A GGUF build opened in llama.cpp for windows as long as the evaluation's, with its float model's tokenizer
    and identity (the build holds the same vocabulary: token ids go into llama.cpp unchanged)."""
    from lsaq.models.loading import empty_model, load_tokenizer, locate_model, model_info
    from lsaq.quantization.gguf_runtime import load_gguf
    from lsaq.quantization.record import GGUF_WEIGHTS

    located = locate_model(base_src)
    fid_len = options.fidelity_seq_len or (options.seq_len if options.ppl else DEFAULT_FIDELITY_SEQ_LEN)
    context = max(fid_len, options.seq_len if options.ppl else 0)
    llm = load_gguf(Path(path) / GGUF_WEIGHTS, context=context, logits_all=True, batch=context)  # caller closes it
    weights = (Path(path) / GGUF_WEIGHTS).stat().st_size
    return EvalModel(ModelSource(path, options.dtype, artifact=True), GgufModel(llm), load_tokenizer(located),
                     model_info(located, empty_model(located.load_dir)), whole_bytes=weights)


__all__ = ["GENERATED_TOKENS", "GenerationMemory", "GgufModel", "check_fits_device", "generation_memory",
           "open_gguf_build"]
