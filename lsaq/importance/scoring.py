"""Layer importance: LSAQ's top-k Jaccard through the logit lens, the LWQ cosine baseline, measured sensitivity.

For decoder layer i with input hidden state ``h_i`` and output ``h_{i+1}`` (both ``[B, T, H]``):

* ``jaccard`` (LSAQ): decode both through the logit lens (final norm, then LM head), take the top-k token set
  at every position and score ``1 - mean Jaccard(topk(lens(h_i)), topk(lens(h_{i+1})))``.
* ``cosine`` (LWQ): ``1 - mean cos(h_i, h_{i+1})``.
* ``sensitivity``: the KL divergence of next-token distributions when only layer i is INT4 (the ground truth the
  two proxies estimate; about L/2 forward passes per batch instead of one, see :mod:`lsaq.importance.sensitivity`).

One forward pass per batch does it all: hooks on the decoder layers see every hidden state as it is produced,
project it through the lens in chunks of positions (one ``[chunk, V]`` logits buffer, reused) and keep only the
top-k indices of the previous state, so the L+1 lens projections are shared between neighbouring layers and
full-vocabulary logits never exist for more than one chunk at a time.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from lsaq.importance.calibration import CalibrationSet
from lsaq.importance.record import LayerImportance
from lsaq.importance.similarity import cosine, jaccard, topk_indices
from lsaq.methods import DEFAULT_K, DEFAULT_METHOD, SENSITIVITY_PROBE, Method
from lsaq.models.identity import ModelInfo
from lsaq.models.parts import decoder_parts, layer_output


class _Lens:
    """Top-k token ids of hidden states through the logit lens, chunked over positions with one buffer."""

    def __init__(self, final_norm: nn.Module, lm_head: nn.Module, k: int, chunk: int):
        self.norm, self.head, self.k, self.chunk = final_norm, lm_head, k, chunk
        weight = getattr(lm_head, "weight", None)
        self.linear = isinstance(lm_head, nn.Linear) and weight is not None
        self.buffer: torch.Tensor | None = None

    def topk(self, h: torch.Tensor) -> torch.Tensor:
        """``h``: ``[B, T, H]`` -> ``[B, T, k]`` token ids."""
        flat = h.reshape(-1, h.shape[-1])
        out = torch.empty(flat.shape[0], self.k, dtype=torch.int64)
        for s in range(0, flat.shape[0], self.chunk):
            z = self.norm(flat[s : s + self.chunk])
            if self.linear:
                w = self.head.weight  # [V, H]
                if self.buffer is None or self.buffer.shape[0] < z.shape[0]:
                    self.buffer = torch.empty(z.shape[0], w.shape[0], dtype=z.dtype)
                logits = torch.mm(z, w.t(), out=self.buffer[: z.shape[0]])  # [chunk, V], reused memory
                if self.head.bias is not None:
                    logits += self.head.bias
            else:
                logits = self.head(z)
            out[s : s + z.shape[0]] = topk_indices(logits, self.k)
        return out.view(*h.shape[:-1], self.k)


def score_samples(
    model: nn.Module,
    calib: CalibrationSet,
    method: str | Method = DEFAULT_METHOD,
    k: int = DEFAULT_K,
    *,
    batch_size: int = 4,
    chunk: int = 1024,
    progress: Callable[[int], None] | None = None,
) -> np.ndarray:
    """Per-sample, per-layer importance ``[N, num_layers]`` (float64), one forward pass per batch.

    ``sensitivity`` is delegated to :func:`lsaq.importance.sensitivity.sensitivity_samples` (per-channel INT4 probe).
    """
    method = Method.parse(method)
    if method is Method.SENSITIVITY:
        from lsaq.importance.sensitivity import sensitivity_samples

        return sensitivity_samples(model, calib, batch_size=batch_size, chunk=chunk, progress=progress)
    parts = decoder_parts(model)
    vocab = parts.lm_head.weight.shape[0] if hasattr(parts.lm_head, "weight") else model.config.vocab_size
    if method is Method.JACCARD and not 1 <= k <= vocab:
        raise ValueError(f"k must be in [1, {vocab}] (the vocabulary size), got k={k}")
    n, n_layers = calib.samples, len(parts.layers)
    scores = np.zeros((n, n_layers), dtype=np.float64)
    lens = _Lens(parts.final_norm, parts.lm_head, k, chunk)
    # "prev" holds the representation of the current layer's input: top-k ids [B, T, k] or the hidden state.
    state: dict[str, Any] = {}

    def represent(h: torch.Tensor) -> torch.Tensor:
        return lens.topk(h) if method is Method.JACCARD else h

    def on_input(module: nn.Module, args: tuple, kwargs: dict) -> None:
        state["prev"] = represent(args[0] if args else kwargs["hidden_states"])

    def on_output(index: int) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            cur = represent(layer_output(output))
            sim = jaccard(state["prev"], cur) if method is Method.JACCARD else cosine(state["prev"], cur)
            state["sim"][:, index] = (1.0 - sim.double()).mean(-1)  # [B] mean over positions
            state["prev"] = cur

        return hook

    handles = [parts.layers[0].register_forward_pre_hook(on_input, with_kwargs=True)]
    handles += [layer.register_forward_hook(on_output(i), with_kwargs=True) for i, layer in enumerate(parts.layers)]
    try:
        with torch.inference_mode():
            for s in range(0, n, batch_size):
                ids = calib.tokens[s : s + batch_size]
                state["sim"] = torch.zeros(ids.shape[0], n_layers, dtype=torch.float64)
                # The decoder stack alone: the model's own LM head output is not needed (the lens computes it).
                parts.base(input_ids=ids, use_cache=False)
                scores[s : s + ids.shape[0]] = state["sim"].numpy()
                if progress is not None:
                    progress(ids.shape[0])
    finally:
        for h in handles:
            h.remove()
    return scores


def score_importance(
    model: nn.Module,
    info: ModelInfo,
    calib: CalibrationSet,
    method: str | Method = DEFAULT_METHOD,
    k: int = DEFAULT_K,
    *,
    batch_size: int = 4,
    progress: Callable[[int], None] | None = None,
) -> LayerImportance:
    """Score every decoder layer of ``model`` on ``calib``; returns the :class:`LayerImportance` record."""
    method = Method.parse(method)
    start = time.perf_counter()
    per_sample = score_samples(model, calib, method, k, batch_size=batch_size, progress=progress)
    std = per_sample.std(axis=0, ddof=1) if per_sample.shape[0] > 1 else np.zeros(per_sample.shape[1])
    return LayerImportance(
        model=info,
        method=method.value,
        k=k if method is Method.JACCARD else None,
        params={"probe": SENSITIVITY_PROBE.value, "group_size": None} if method is Method.SENSITIVITY else {},
        calibration=calib.info(),
        importance=tuple(float(x) for x in per_sample.mean(axis=0)),
        std=tuple(float(x) for x in std),
        wall_time_s=round(time.perf_counter() - start, 3),
    )
