"""Fidelity of a quantized model to its float original: how much its next-token distributions moved.

This is what llama.cpp's perplexity tool reports with ``--kl-divergence``: over the same token windows
``[N, T]``, at every position t the float (reference) model gives ``p = softmax(logits_float[t])`` and the
quantized (candidate) model ``q = softmax(logits_quant[t])``, and we measure

* ``KL(p || q) = sum_v p_v (log p_v - log q_v)`` in nats: its mean over all ``N * T`` positions and its 99th
  percentile (numpy's ``percentile``, linear interpolation), which shows the rare positions where the
  quantized model goes badly wrong even when the mean is small;
* the share of positions where both models' most likely next token (argmax; ties to the lower id) agree.

Unlike perplexity it needs no reference text to be right: every position counts, the last one of a window too
(its prediction has no target in the window, but it still has a distribution), and generated text works as well
as a corpus. The models are only called as ``model(input_ids=ids, use_cache=False)`` and their ``.logits`` read.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping

import numpy as np
import torch
from torch import nn

from lsaq.engine.logits import PASS_BYTES, branch_logits
from lsaq.engine.skeleton import Layers
from lsaq.importance.similarity import kl_divergence

# Positions per forward pass when batch_size is not given: both models' logits for a batch exist at once,
# [B*T, V] each (fp32: 1024 x 49152 x 4 bytes = 200 MB per model for SmolLM2, 525 MB for a 128k vocabulary).
AUTO_BATCH_TOKENS = 1024
# Positions whose full-vocabulary float64 log-probabilities exist at a time (two [CHUNK, V] buffers and a
# temporary: 3 x 256 x 49152 x 8 bytes = 300 MB for SmolLM2).
CHUNK = 256
PERCENTILE = 99.0


@dataclass(frozen=True)
class FidelityResult:
    """Next-token fidelity of a candidate model to a reference over ``positions = windows * seq_len`` positions."""

    kl_mean: float  # mean KL(p_reference || p_candidate), nats
    kl_p99: float  # 99th percentile of the per-position KL, nats
    top1_agreement: float  # share of positions with the same argmax token, in [0, 1]
    positions: int
    windows: int
    seq_len: int
    source: str  # the text the windows came from (a path or dataset name), or "generated"
    source_hash: str  # that source's hash (for "generated": model content hash, seed and sampler)
    seconds: float  # wall time of the forward passes and statistics

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> "FidelityResult":
        return cls(kl_mean=float(obj["kl_mean"]), kl_p99=float(obj["kl_p99"]),
                   top1_agreement=float(obj["top1_agreement"]), positions=int(obj["positions"]),
                   windows=int(obj["windows"]), seq_len=int(obj["seq_len"]), source=str(obj["source"]),
                   source_hash=str(obj["source_hash"]), seconds=float(obj["seconds"]))


def position_stats(
    reference: torch.Tensor, candidate: torch.Tensor, chunk: int = CHUNK
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position ``(KL(p_ref || p_cand) [P] float64, same argmax [P] bool)`` of logits ``[P, V]`` each.

    Works through ``chunk`` positions at a time, so float64 log-probabilities exist for one chunk only
    (:func:`lsaq.importance.similarity.kl_divergence`).
    """
    if reference.shape != candidate.shape or reference.ndim != 2:
        raise ValueError(f"logits must both be [positions, vocab]; got {tuple(reference.shape)} and "
                         f"{tuple(candidate.shape)} (do the two models share a vocabulary?)")
    kl = torch.empty(reference.shape[0], dtype=torch.float64)
    agree = torch.empty(reference.shape[0], dtype=torch.bool)
    for s in range(0, reference.shape[0], chunk):
        ref, cand = reference[s : s + chunk], candidate[s : s + chunk]  # [c, V] each
        kl[s : s + chunk] = kl_divergence(ref, cand).cpu()
        agree[s : s + chunk] = (ref.argmax(dim=-1) == cand.to(ref.device).argmax(dim=-1)).cpu()
    return kl, agree


def _check_windows(windows: torch.Tensor, batch_size: int | None) -> None:
    """``ValueError`` unless ``windows`` is ``[N>=1, T>=1]`` and ``batch_size`` None or at least 1."""
    if windows.ndim != 2 or windows.shape[0] < 1 or windows.shape[1] < 1:
        raise ValueError(f"windows must have shape [N>=1, T>=1], got {tuple(windows.shape)}")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be at least 1 when given, got {batch_size}")


def _device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


@torch.inference_mode()
def fidelity(
    reference: nn.Module,
    candidate: nn.Module,
    windows: torch.Tensor,
    *,
    source: str,
    source_hash: str,
    batch_size: int | None = None,
    chunk: int = CHUNK,
    progress: Callable[[int], None] | None = None,
) -> FidelityResult:
    """KL divergence and top-1 agreement of ``candidate``'s next-token distributions against ``reference``'s.

    ``windows``: ``[N, T]`` token ids, each row scored independently by both models. ``batch_size`` windows per
    forward pass (default: about ``AUTO_BATCH_TOKENS`` positions); ``progress(n)`` after each batch of n windows.
    ``source``/``source_hash`` say where the windows came from and are recorded as given.
    """
    _check_windows(windows, batch_size)
    if chunk < 1:
        raise ValueError(f"chunk must be at least 1, got {chunk}")
    n, t = windows.shape
    batch_size = batch_size or max(1, AUTO_BATCH_TOKENS // t)
    ids = windows.to(torch.int64)
    modes = (reference.training, candidate.training)
    reference.eval()
    candidate.eval()
    kls, agrees = [], []
    start = time.perf_counter()
    try:
        for s in range(0, n, batch_size):
            batch = ids[s : s + batch_size]  # [b, T]
            ref = reference(input_ids=batch.to(_device(reference)), use_cache=False).logits  # [b, T, V]
            cand = candidate(input_ids=batch.to(_device(candidate)), use_cache=False).logits  # [b, T, V]
            kl, agree = position_stats(ref.reshape(-1, ref.shape[-1]), cand.reshape(-1, cand.shape[-1]), chunk)
            kls.append(kl)
            agrees.append(agree)
            del ref, cand
            if progress is not None:
                progress(batch.shape[0])
    finally:
        reference.train(modes[0])
        candidate.train(modes[1])
    return _result(torch.cat(kls), torch.cat(agrees), windows, source, source_hash, start)


def stream_fidelity(
    reference: Layers,
    candidate: Layers | Callable[[torch.Tensor], torch.Tensor],
    windows: torch.Tensor,
    *,
    source: str,
    source_hash: str,
    batch_size: int | None = None,
    chunk: int = CHUNK,
    pass_bytes: int = PASS_BYTES,
    progress: Callable[[int], None] | None = None,
) -> FidelityResult:
    """:func:`fidelity` of two models walked one decoder layer at a time side by side
    (:func:`lsaq.engine.logits.branch_logits`: a float checkpoint's :class:`~lsaq.engine.skeleton.Skeleton` and its
    build's :class:`~lsaq.quantization.reader.ArtifactLayers`), so neither model is ever held whole. Same
    statistics as :func:`fidelity` within float rounding; ``progress(n)`` after each pass of n windows. ``chunk``
    and ``pass_bytes``: positions projected at once and the hidden states of a pass (:mod:`lsaq.eval.budget`).

    A candidate outside torch's layers (a GGUF build in llama.cpp) is a function giving the logits of one window at
    a time, ``candidate(window [T]) -> [T, V]``: only the reference walks, and the candidate's logits of at most the
    two windows a chunk spans exist at once."""
    _check_windows(windows, batch_size)
    t = windows.shape[1]
    per_window = callable(candidate)  # layers are walked, not called
    walk = branch_logits([reference] if per_window else [reference, candidate], windows, chunk=chunk,
                         budget=pass_bytes, progress=progress, batch_size=batch_size or max(1, AUTO_BATCH_TOKENS // t))

    def by_window() -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        cached: dict[int, torch.Tensor] = {}  # window -> its candidate logits [T, V]
        for first, (ref,) in walk:
            end = first + ref.shape[0]
            rows = range(first // t, (end - 1) // t + 1)
            for done in [r for r in cached if r < rows.start]:
                del cached[done]
            parts = []
            for r in rows:
                if r not in cached:
                    cached[r] = candidate(windows[r])
                parts.append(cached[r][max(first, r * t) - r * t:min(end, (r + 1) * t) - r * t])
            yield first, ref, torch.cat(parts)

    pairs = by_window() if per_window else ((first, ref, cand) for first, (ref, cand) in walk)
    return _collect(pairs, windows, source, source_hash, chunk)


def _collect(pairs: Iterator[tuple[int, torch.Tensor, torch.Tensor]], windows: torch.Tensor, source: str,
             source_hash: str, chunk: int) -> FidelityResult:
    """The result of ``(first position, reference logits [c, V], candidate logits [c, V])`` over ``windows``."""
    n, t = windows.shape
    kl = torch.empty(n * t, dtype=torch.float64)
    agree = torch.empty(n * t, dtype=torch.bool)
    start = time.perf_counter()
    for first, ref, cand in pairs:
        kl[first:first + ref.shape[0]], agree[first:first + ref.shape[0]] = position_stats(ref, cand, chunk)
    return _result(kl, agree, windows, source, source_hash, start)


def _result(kl: torch.Tensor, agree: torch.Tensor, windows: torch.Tensor, source: str, source_hash: str,
            start: float) -> FidelityResult:
    """The record of per-position ``kl`` ``[N*T]`` float64 and ``agree`` ``[N*T]`` bool over ``windows`` [N, T]."""
    kl_all = kl.numpy()
    return FidelityResult(
        kl_mean=float(kl_all.mean()),
        kl_p99=float(np.percentile(kl_all, PERCENTILE)),
        top1_agreement=float(agree.double().mean()),
        positions=int(kl_all.shape[0]),
        windows=windows.shape[0],
        seq_len=windows.shape[1],
        source=source,
        source_hash=source_hash,
        seconds=time.perf_counter() - start,
    )


__all__ = ["AUTO_BATCH_TOKENS", "CHUNK", "FidelityResult", "fidelity", "position_stats", "stream_fidelity"]
