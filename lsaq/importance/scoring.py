"""Layer importance: LSAQ's top-k Jaccard through the logit lens, the LWQ cosine baseline, measured sensitivity.

For decoder layer i with input hidden state ``h_i`` and output ``h_{i+1}`` (both ``[B, T, H]``):

* ``jaccard`` (LSAQ): decode both through the logit lens (final norm, then LM head), take the top-k token set
  at every position and score ``1 - mean Jaccard(topk(lens(h_i)), topk(lens(h_{i+1})))``.
* ``cosine`` (LWQ): ``1 - mean cos(h_i, h_{i+1})``.
* ``sensitivity``: the KL divergence of next-token distributions when only layer i is INT4 (the ground truth the
  two proxies estimate; about L/2 forward passes per batch instead of one, see :mod:`lsaq.importance.sensitivity`).

One walk over the decoder layers does it all (:mod:`lsaq.engine`; the model in memory or streamed from its
checkpoint one layer at a time): each layer's outputs are projected through the lens in chunks of positions (one
``[chunk, V]`` logits buffer, reused) and only their top-k indices are kept for the next layer, so the L+1 lens
projections are shared between neighbouring layers and full-vocabulary logits never exist for more than one
chunk at a time.
"""

from __future__ import annotations

import time
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from lsaq.engine.calls import record_calls
from lsaq.engine.skeleton import Layers, Resident
from lsaq.engine.walk import walk
from lsaq.calibration.sets import CalibrationSet
from lsaq.importance.record import LayerImportance
from lsaq.importance.similarity import cosine, jaccard, topk_indices
from lsaq.methods import DEFAULT_K, DEFAULT_METHOD, SENSITIVITY_PROBE, Method
from lsaq.models.identity import ModelInfo
from lsaq.models.parts import DecoderParts, decoder_parts


class _Lens:
    """Top-k token ids of hidden states through the logit lens, chunked over positions with one buffer."""

    def __init__(self, parts: DecoderParts, k: int, chunk: int):
        self.parts, self.k, self.chunk = parts, k, chunk
        self.buffer: torch.Tensor | None = None  # [chunk, V] logits, reused

    def topk(self, h: torch.Tensor) -> torch.Tensor:
        """``h``: ``[B, T, H]`` -> ``[B, T, k]`` token ids."""
        flat = h.reshape(-1, h.shape[-1])
        out = torch.empty(flat.shape[0], self.k, dtype=torch.int64, device=h.device)
        for s in range(0, flat.shape[0], self.chunk):
            z = self.parts.final_norm(flat[s : s + self.chunk])  # [c, H]
            if self.buffer is None or self.buffer.shape[0] < z.shape[0]:
                self.buffer = torch.empty(z.shape[0], self.parts.lm_head.weight.shape[0], dtype=z.dtype,
                                          device=z.device)
            logits = self.parts.project(z, out=self.buffer[: z.shape[0]])  # [c, V]
            out[s : s + z.shape[0]] = topk_indices(logits, self.k)
        return out.view(*h.shape[:-1], self.k)


def score_samples(
    model: nn.Module | Layers,
    calib: CalibrationSet,
    method: str | Method = DEFAULT_METHOD,
    k: int = DEFAULT_K,
    *,
    batch_size: int = 4,
    chunk: int = 1024,
    progress: Callable[[int], None] | None = None,
) -> np.ndarray:
    """Per-sample, per-layer importance ``[N, num_layers]`` (float64) in one walk over the decoder layers
    (:func:`lsaq.engine.walk.walk`): ``model`` in memory, or a :class:`~lsaq.engine.skeleton.Skeleton` whose layers
    are read one at a time. ``progress`` is called with 1 after each layer.

    ``sensitivity`` is delegated to :func:`lsaq.importance.sensitivity.sensitivity_samples` (per-channel INT4
    probe, its own walk).
    """
    method = Method.parse(method)
    if method is Method.SENSITIVITY:
        from lsaq.importance.sensitivity import sensitivity_samples

        return sensitivity_samples(model, calib, batch_size=batch_size, chunk=chunk, progress=progress)
    layers = Resident(decoder_parts(model)) if isinstance(model, nn.Module) else model
    parts = layers.parts
    vocab = parts.lm_head.weight.shape[0]
    if method is Method.JACCARD and not 1 <= k <= vocab:
        raise ValueError(f"k must be in [1, {vocab}] (the vocabulary size), got k={k}")
    lens = _Lens(parts, k, chunk)

    def represent(h: torch.Tensor) -> torch.Tensor:  # [B, T, H] -> top-k ids [B, T, k], or the hidden state
        return lens.topk(h) if method is Method.JACCARD else h

    calls = record_calls(parts, calib.tokens, batch_size)
    sims = torch.zeros(calib.samples, len(parts.layers), dtype=torch.float64)
    prev: list[torch.Tensor] = []  # the representation of the current layer's inputs, per batch

    def visit(index: int, _layer: nn.Module, inputs: Sequence[torch.Tensor], outputs: Sequence[torch.Tensor]) -> None:
        if index == 0:
            prev.extend(represent(h) for h in inputs)
        start = 0
        for b, out in enumerate(outputs):
            cur = represent(out)
            sim = jaccard(prev[b], cur) if method is Method.JACCARD else cosine(prev[b], cur)
            sims[start:start + out.shape[0], index] = (1.0 - sim.double()).mean(-1).cpu()  # [B] over positions
            prev[b], start = cur, start + out.shape[0]
        if progress is not None:
            progress(1)

    walk(layers, calls, visit)
    return sims.numpy()


def score_importance(
    model: nn.Module | Layers,
    info: ModelInfo,
    calib: CalibrationSet,
    method: str | Method = DEFAULT_METHOD,
    k: int = DEFAULT_K,
    *,
    batch_size: int = 4,
    progress: Callable[[int], None] | None = None,
) -> LayerImportance:
    """Score every decoder layer of ``model`` (in memory, or a layer stream) on ``calib``; returns the
    :class:`LayerImportance` record."""
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
