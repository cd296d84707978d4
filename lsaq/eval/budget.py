"""What an evaluation's layer walk holds in host memory, and how it keeps within ``--max-memory``.

Fidelity and perplexity walk one model, or the float checkpoint beside its build, one decoder layer at a time
(:func:`lsaq.engine.logits.branch_logits`). On the CPU the walk holds, besides the runtime:

* per model, its resident parts (embedding, final norm, LM head), one layer and a layer call's activations in the
  evaluation's dtype (:func:`lsaq.compute.step_bytes`);
* per branch, three fp32 copies of a pass's hidden states ``[n, T, H]`` (the recorded inputs, a layer's inputs and
  its outputs);
* per chunk of positions, each branch's logits ``[chunk, V]`` in fp32 and the float64 log-probabilities
  :func:`lsaq.eval.fidelity.position_stats` makes of them.

A limit must first hold all of that at one window per pass and :data:`MIN_CHUNK` positions per chunk, else the run
is refused before any work with each part named; what it leaves buys larger chunks (up to
:data:`~lsaq.engine.logits.CHUNK`) and passes (up to :data:`~lsaq.engine.logits.PASS_BYTES`). On a GPU the hidden
states and logits live on the device, and the host holds the runtime and a layer as it is read.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lsaq.compute import RUNTIME_BYTES, Compute, host_need, step_bytes, within_max_memory
from lsaq.engine.logits import CHUNK, PASS_BYTES
from lsaq.models.shapes import ModelShape

MIN_CHUNK = 16  # positions whose logits exist at once at the smallest
LOG_PROB_COPIES = 3  # float64 [chunk, V] buffers of position_stats: both log-softmaxes and their difference
HINT = "use shorter windows (--seq-len, --fidelity-seq-len) or fewer per forward pass (--ppl-batch-size)"


@dataclass(frozen=True)
class WalkBudget:
    """How an evaluation walk splits its windows: ``pass_bytes`` of one fp32 copy of a pass's hidden states
    (:func:`lsaq.engine.logits.pass_windows`) and ``chunk`` positions projected onto the vocabulary at once."""

    pass_bytes: int = PASS_BYTES
    chunk: int = CHUNK


def logit_bytes(vocab_size: int, models: int) -> int:
    """Bytes per position of the logits of ``models`` branches and the float64 statistics made of them."""
    return vocab_size * (models * 4 + LOG_PROB_COPIES * 8)


def eval_need(shape: ModelShape, seq_len: int, call_positions: int, models: int, compute: Compute,
              dtype: torch.dtype) -> dict[str, int]:
    """What the walk of ``models`` models (1: perplexity alone; 2: a build beside its float model) holds in host
    memory at least, by part (bytes), with windows of ``seq_len`` tokens and ``call_positions`` tokens per layer
    call, in ``dtype``."""
    if compute.on_gpu:
        return host_need(shape, call_positions, 0, compute)  # the runtime and a layer as read
    return {"runtime": RUNTIME_BYTES,
            f"one step of {models} model(s) (resident parts, a layer, a call's activations)":
                models * step_bytes(shape, call_positions, dtype),
            "hidden states of one window": 3 * models * seq_len * shape.hidden_size * 4,
            f"logits of {MIN_CHUNK} positions": MIN_CHUNK * logit_bytes(shape.vocab_size, models)}


def eval_budget(max_memory: int | None, shape: ModelShape, seq_len: int, call_positions: int, models: int,
                compute: Compute, dtype: torch.dtype) -> WalkBudget:
    """The passes and chunks that keep the walk within ``max_memory`` bytes (None: the defaults); ``ValueError``
    before any work when even one window and :data:`MIN_CHUNK` positions would pass it. Half of what the limit
    leaves goes to larger chunks, the rest to longer passes."""
    left = within_max_memory(max_memory, eval_need(shape, seq_len, call_positions, models, compute, dtype), HINT)
    if left is None or compute.on_gpu:
        return WalkBudget()
    per_position = logit_bytes(shape.vocab_size, models)
    chunk = min(CHUNK, MIN_CHUNK + left // 2 // per_position)
    left -= (chunk - MIN_CHUNK) * per_position
    window = seq_len * shape.hidden_size * 4
    return WalkBudget(pass_bytes=min(PASS_BYTES, window + left // (3 * models)), chunk=chunk)


__all__ = ["MIN_CHUNK", "WalkBudget", "eval_budget", "eval_need", "logit_bytes"]
