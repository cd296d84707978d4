"""Pure tensor primitives for layer importance: deterministic top-k sets, their Jaccard similarity, cosine, and the
KL divergence between two models' next-token distributions.

Everything here works on the last dimension and keeps the leading ones, so the same function serves a single
position (shape ``[V]``), a batch of positions (``[P, V]``) or whole sequences (``[B, T, V]``).
"""

from __future__ import annotations

import torch


def topk_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` largest entries along the last dim, with ties broken towards the lower index.

    ``scores``: ``[..., V]`` floating point. Returns ``[..., k]`` int64, in descending order of score and,
    among equal scores, ascending index, so the *set* (and the order) is a pure function of the values.

    ``torch.topk`` picks an arbitrary member of a tie that straddles the k-th place. Asking it for k+1 values
    shows such rows cheaply (the (k+1)-th value equals the k-th); they are rare for real logits, so only those
    rows, and rows whose kept ties came out of index order, are redone with a stable sort.
    """
    if scores.ndim == 0:
        raise ValueError("topk_indices needs at least one dimension")
    v = scores.shape[-1]
    if not 1 <= k <= v:
        raise ValueError(f"k must be in [1, {v}] (the size of the last dimension), got k={k}")
    flat = scores.reshape(-1, v)
    values, idx = torch.topk(flat, min(k + 1, v), dim=-1, largest=True, sorted=True)
    ambiguous = (values[:, k] == values[:, k - 1] if k < v
                 else torch.zeros(flat.shape[0], dtype=torch.bool, device=flat.device))
    values, idx = values[:, :k], idx[:, :k].contiguous()
    # Within the kept set, equal values must also come in ascending index order.
    unordered = ((values[:, 1:] == values[:, :-1]) & (idx[:, 1:] < idx[:, :-1])).any(-1)
    redo = (ambiguous | unordered).nonzero().flatten()
    if redo.numel():
        _, order = torch.sort(flat[redo], dim=-1, descending=True, stable=True)
        idx[redo] = order[:, :k]
    return idx.reshape(*scores.shape[:-1], k)


def intersection_size(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``|A ∩ B|`` per row for index sets ``a``: ``[..., ka]`` and ``b``: ``[..., kb]`` (no repeats in a row).

    Sort ``b`` once, then binary-search every element of ``a`` in it: O(k log k) per row instead of the
    O(k^2) of a broadcast comparison, which matters for large k.
    """
    if a.shape[:-1] != b.shape[:-1]:
        raise ValueError(f"leading shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    b_sorted = torch.sort(b, dim=-1).values.contiguous()
    pos = torch.searchsorted(b_sorted, a.contiguous()).clamp_(max=b.shape[-1] - 1)
    return (b_sorted.gather(-1, pos) == a).sum(-1)


def jaccard(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Jaccard similarity ``|A ∩ B| / |A ∪ B|`` of two index sets per row; returns ``[...]`` float32 in [0, 1]."""
    inter = intersection_size(a, b).to(torch.float32)
    union = a.shape[-1] + b.shape[-1] - inter
    return inter / union


def topk_jaccard(x: torch.Tensor, y: torch.Tensor, k: int) -> torch.Tensor:
    """Jaccard similarity of the top-k index sets of two score tensors ``[..., V]``; returns ``[...]``."""
    return jaccard(topk_indices(x, k), topk_indices(y, k))


def cosine(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cosine similarity along the last dim, computed in float32; ``[..., H]`` x2 -> ``[...]``.

    A zero vector has similarity 0 with anything (``eps`` guards the division), never NaN.
    """
    return torch.nn.functional.cosine_similarity(x.float(), y.float(), dim=-1, eps=1e-8)


def kl_divergence(reference: torch.Tensor, candidate: torch.Tensor) -> torch.Tensor:
    """``KL(softmax(reference) || softmax(candidate))`` along the last dim, in nats: logits ``[..., V]`` x2 (any
    float dtype; ``candidate`` may live on another device) -> ``[...]`` float64 on ``reference``'s device.

    Log-probabilities are taken in float64. In fp32 each log-probability carries a rounding error of about
    ``eps32 * |log p|`` (~1e-6 nats where ``|log p| ~ 10``), the size of a well-quantized layer's whole KL; in
    float64 the result is the exact KL of the given logits to ~1e-15 relative. A token that the reference gives
    probability 0 contributes 0 (also where the candidate gives it -inf); one that only the candidate rules out
    makes the KL inf. A sum below 0 can only be rounding (KL >= 0) and is clamped.

    Memory: two float64 ``[..., V]`` buffers and one logsumexp temporary, all updated in place.
    """
    if reference.shape != candidate.shape:
        raise ValueError(f"logits differ in shape: {tuple(reference.shape)} vs {tuple(candidate.shape)}")
    logp = reference.to(torch.float64, copy=True)
    logp -= torch.logsumexp(logp, dim=-1, keepdim=True)
    diff = candidate.to(reference.device, torch.float64, copy=True)
    diff -= torch.logsumexp(diff, dim=-1, keepdim=True)
    impossible = torch.isneginf(logp)  # p_v = 0: its term is 0, never 0 * nan
    diff.neg_().add_(logp)  # log p - log q
    terms = logp.exp_().mul_(diff).masked_fill_(impossible, 0.0)  # p * (log p - log q)
    return terms.sum(dim=-1).clamp_min(0.0)


def spearman(x: "list[float] | tuple[float, ...] | torch.Tensor", y: "list[float] | tuple[float, ...] | torch.Tensor") -> float:
    """Spearman rank correlation of two equally long score vectors (ties get their average rank), in [-1, 1].

    Used to compare layer rankings: two importance methods, or two halves of a calibration set.
    """
    a, b = torch.as_tensor(x, dtype=torch.float64).flatten(), torch.as_tensor(y, dtype=torch.float64).flatten()
    if a.numel() != b.numel() or a.numel() < 2:
        raise ValueError(f"spearman needs two vectors of equal length >= 2, got {a.numel()} and {b.numel()}")
    ra, rb = _average_ranks(a), _average_ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = float((ra.square().sum() * rb.square().sum()).sqrt())
    return float((ra * rb).sum()) / den if den > 0 else float("nan")


def _average_ranks(v: torch.Tensor) -> torch.Tensor:
    """Ranks 0..n-1 of ``v`` ``[n]`` with ties sharing the mean of their ranks."""
    order = torch.argsort(v, stable=True)
    ranks = torch.empty_like(v)
    ranks[order] = torch.arange(v.numel(), dtype=v.dtype)
    uniq, inverse = torch.unique(v, return_inverse=True)
    sums = torch.zeros(uniq.numel(), dtype=v.dtype).index_add_(0, inverse, ranks)
    counts = torch.zeros(uniq.numel(), dtype=v.dtype).index_add_(0, inverse, torch.ones_like(v))
    return (sums / counts)[inverse]
