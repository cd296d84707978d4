"""GPTQ: choose the integer codes of a weight with second-order error feedback (Frantar et al., 2022).

Round-to-nearest (RTN, :mod:`lsaq.quantization.primitives`) rounds every weight on its own. GPTQ instead
minimises the layer's output error on calibration activations ``X [n, in]``::

    ||X W^T - X Q^T||_F^2 = (n / 2) * tr((W - Q) H (W - Q)^T),     H = 2/n * X^T X   [in, in]

It quantizes one input column at a time and spreads each column's rounding error over the columns not yet
quantized, weighted by the inverse Hessian (the Optimal Brain Surgeon update). The upper Cholesky factor ``U`` of
``H^-1`` (``H^-1 = U^T U``) holds every update the sequence needs, and the updates of columns beyond the current
block are deferred and applied as one matrix product per block ("lazy batch updates").

The result is stored in exactly RTN's format (:class:`~lsaq.quantization.primitives.QuantizedWeight`: same
tensors, dtypes, shapes and byte counts); only the integer codes, and for group-wise INT4 possibly the scales and
zero points, differ:

* per-channel (INT8; INT4 with ``group_size=None``): the per-row scale is RTN's, computed from the original
  weight; GPTQ only picks the codes ``clamp(round(w / s), qmin, qmax)`` of the error-updated weights.
* group-wise INT4: each group's scale and zero point are computed with RTN's arithmetic from the group's
  *current* (error-updated) columns when the sweep reaches the group's first column; with ``act_order`` all
  groups use RTN's parameters of the original weight ("static groups"), since the permuted sweep visits a
  group's columns out of order.

:func:`gptq_quantize` never returns a result worse than RTN on the calibration objective: it evaluates
:func:`proxy_loss` for both and returns RTN's quantization when that is lower.
"""

from __future__ import annotations

import math

import torch

from lsaq.precision import Precision
from lsaq.resources import trim_heap
from lsaq.quantization.primitives import (
    INT4_QMAX,
    INT4_QMIN,
    INT4_UMAX,
    INT8_QMAX,
    INT8_QMIN,
    QuantizedWeight,
    quantize_int4,
)

DEFAULT_BLOCK_SIZE = 128  # columns per lazy-update block (the paper's choice)
DEFAULT_DAMP = 0.01  # dampening, as a fraction of the mean diagonal of H (the paper's choice)
PROXY_BLOCK = 1024  # columns of H widened to fp64 at a time by proxy_loss
SOLVE_BLOCK = 512  # rows per band, and the largest triangle inverted directly, in _invert_lower_


class HessianAccumulator:
    """Running GPTQ Hessian ``H = 2/n * sum_rows x x^T`` of one linear layer's inputs.

    The sum ``sum x x^T`` is kept un-normalised in ``dtype`` (fp32 by default) together with the row count ``n``,
    so :meth:`hessian` is the exact mean over every row seen, whatever the batch sizes were.
    """

    def __init__(self, in_features: int, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None):
        if not isinstance(in_features, int) or isinstance(in_features, bool) or in_features <= 0:
            raise ValueError(f"in_features must be a positive int, got {in_features!r}")
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"accumulator dtype must be torch.float32 or torch.float64, got {dtype}")
        self._sum = torch.zeros((in_features, in_features), dtype=dtype, device=device)  # [in, in]
        self._n = 0

    @property
    def in_features(self) -> int:
        return int(self._sum.shape[0])

    @property
    def n_samples(self) -> int:
        """Rows (tokens) seen so far."""
        return self._n

    def add(self, x: torch.Tensor) -> None:
        """Add activations ``x [..., in]`` (any float dtype); leading dimensions are flattened into rows."""
        if not x.is_floating_point():
            raise ValueError(f"activations must be floating point, got {x.dtype}")
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(f"activations must have shape [..., {self.in_features}], got {tuple(x.shape)}")
        rows = x.detach().reshape(-1, self.in_features).to(dtype=self._sum.dtype, device=self._sum.device)  # [r, in]
        if rows.shape[0] == 0:
            return
        self._sum.addmm_(rows.T, rows)
        self._n += int(rows.shape[0])

    def hessian(self) -> torch.Tensor:
        """``2/n * X^T X`` over all rows seen, ``[in, in]`` in the accumulator's dtype (a new tensor)."""
        if self._n == 0:
            raise ValueError("no activations added: the Hessian of zero samples is undefined")
        return self._sum * (2.0 / self._n)


def proxy_loss(w: torch.Tensor, q_dequantized: torch.Tensor, hessian: torch.Tensor) -> float:
    """GPTQ's objective ``tr((W - Q) H (W - Q)^T)``, computed in fp64.

    With ``H = 2/n X^T X`` this is ``2/n * ||X W^T - X Q^T||_F^2``.

    Args:
        w: float weight ``[out, in]``.
        q_dequantized: its quantized approximation ``[out, in]``.
        hessian: ``[in, in]``.
    """
    if w.dim() != 2 or q_dequantized.shape != w.shape:
        raise ValueError(
            f"w and q_dequantized must both be [out, in]; got {tuple(w.shape)} and {tuple(q_dequantized.shape)}"
        )
    _check_hessian_shape(hessian, w.shape)
    d = w.detach().to(torch.float64) - q_dequantized.detach().to(device=w.device, dtype=torch.float64)  # [out, in]
    total = 0.0
    for c0 in range(0, d.shape[1], PROXY_BLOCK):  # fp64 columns of H a block at a time, not a whole fp64 copy
        h = hessian[:, c0:c0 + PROXY_BLOCK].detach().to(device=w.device, dtype=torch.float64)  # [in, block]
        total += float(((d @ h) * d[:, c0:c0 + PROXY_BLOCK]).sum())
    return total


def gptq_quantize(
    w: torch.Tensor,
    hessian: torch.Tensor,
    precision: Precision | str,
    group_size: int | None = None,
    scale_dtype: torch.dtype = torch.float16,
    *,
    block_size: int = DEFAULT_BLOCK_SIZE,
    damp: float = DEFAULT_DAMP,
    act_order: bool = False,
) -> QuantizedWeight:
    """Quantize ``w [out, in]`` with GPTQ, in RTN's storage format (see the module docstring).

    Args:
        w: float weight ``[out, in]`` (``nn.Linear`` layout, any float dtype).
        hessian: ``[in, in]``, e.g. :meth:`HessianAccumulator.hessian` of the layer's inputs.
        precision: INT8 or INT4 (``Precision`` or its name).
        group_size: INT4 only: None for per-channel symmetric, a positive int for asymmetric groups.
        scale_dtype: torch.float16 or torch.bfloat16.
        block_size: columns per lazy-update block; changes speed, not the result (up to fp32 rounding).
        damp: ``H += damp * mean(diag H) * I`` before inversion (numerical stability).
        act_order: quantize columns in order of descending ``diag(H)`` (static group parameters).
    Returns:
        The GPTQ :class:`QuantizedWeight`, or RTN's (:meth:`QuantizedWeight.quantize`) when RTN has the lower
        :func:`proxy_loss` on the undamped ``hessian``.
    Raises:
        ValueError: FP16 or an unknown precision, INT8 with a group size, a non-2-D or non-float weight, a
            Hessian that is not ``[in, in]`` or not finite, a bad block size or damp, or a Hessian that is not
            positive definite after dampening.
    """
    p = Precision.parse(precision)
    if p not in (Precision.INT8, Precision.INT4):
        raise ValueError(f"GPTQ cannot quantize to {p.value}; valid precisions: int8, int4")
    if w.dim() != 2:
        raise ValueError(f"expected a 2-D weight [out, in], got shape {tuple(w.shape)}")
    _check_hessian_shape(hessian, w.shape)
    if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size <= 0:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    if not (isinstance(damp, (int, float)) and math.isfinite(damp) and damp >= 0):
        raise ValueError(f"damp must be a finite number >= 0, got {damp!r}")
    # RTN validates the weight, group size and scale dtype, and provides the per-channel / static-group scales.
    rtn = QuantizedWeight.quantize(w, p, group_size, scale_dtype)
    h = hessian.detach().to(device=w.device)  # [in, in] as given; widened to fp64 where it is used
    if not bool(torch.isfinite(h).all()):
        raise ValueError("hessian has non-finite values")
    if w.numel() == 0:
        return rtn
    gptq = _gptq(w, h, rtn, block_size, damp, act_order)
    # Never worse than RTN on the calibration objective (the lazy sweep is greedy, not optimal).
    if proxy_loss(w, rtn.dequantize(), h) < proxy_loss(w, gptq.dequantize(), h):
        return rtn
    return gptq


def _check_hessian_shape(hessian: torch.Tensor, w_shape: torch.Size) -> None:
    cols = int(w_shape[1])
    if tuple(hessian.shape) != (cols, cols):
        raise ValueError(
            f"hessian must be [in, in] = [{cols}, {cols}] for weight {tuple(w_shape)}, got {tuple(hessian.shape)}"
        )


def _inverse_cholesky(h: torch.Tensor, perm: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor ``U`` of ``(H_p + lambda I)^-1`` (``U^T U = H_p^-1``) for ``H_p = h[perm][:, perm]``
    (the sweep order), fp32 ``[in, in]``; ``h`` (any float dtype, ``[in, in]``) is not modified.

    Dead inputs (zero diagonal) are decoupled first: their row and column are zeroed and the diagonal set to 1, so
    their columns get no error feedback and give none. Computed in fp64 in one ``[in, in]`` buffer: the damped
    Hessian, overwritten by its Cholesky factor, overwritten by the factor's inverse (:func:`_invert_lower_`).
    Memory: ``h`` plus 1.5 fp64 ``[in, in]`` at the peak (the fp32 result beside the buffer)."""
    # One Cholesky and one triangular inverse instead of Cholesky, inverse, Cholesky: with J the reversal
    # permutation, J H J = L L^T (L lower) gives H^-1 = (J L^-1 J)^T (J L^-1 J), and J L^-1 J is upper with a
    # positive diagonal, hence the (unique) upper Cholesky factor of H^-1.
    rev = perm.flip(0)
    # J H_p J in column-major order (LAPACK's, so the factorization works in place): the row-major transpose
    buf = h.mT.index_select(0, rev).index_select(1, rev).to(torch.float64).mT  # [in, in], column-major
    diag = buf.diagonal()  # a view, in reversed sweep order
    dead = torch.nonzero(diag == 0).flatten()
    if dead.numel():
        buf[dead, :] = 0.0
        buf[:, dead] = 0.0
        buf[dead, dead] = 1.0
    diag.add_(damp * float(diag.flip(0).mean()))  # the mean in sweep order
    info = torch.empty((), dtype=torch.int32, device=buf.device)
    torch.linalg.cholesky_ex(buf, out=(buf, info))  # L, lower, in place
    if int(info) != 0:
        raise ValueError(f"hessian is not positive definite after dampening (damp={damp}); use a larger damp")
    _invert_lower_(buf)  # L^-1
    trim_heap()  # the inversion's band temporaries, kept by the C heap, before the fp32 copy is made
    lower = buf.to(torch.float32)
    del buf, diag
    return lower.flip(0, 1).contiguous()


def _invert_lower_(m: torch.Tensor) -> None:
    """Invert the invertible lower-triangular ``m [n, n]`` in place, by blocks: with ``m = [[A, 0], [B, C]]``,
    ``m^-1 = [[A^-1, 0], [-C^-1 B A^-1, C^-1]]``; ``B`` is overwritten a band of rows at a time, so the only
    temporaries are ``SOLVE_BLOCK`` rows wide."""
    n = m.shape[0]
    if n <= SOLVE_BLOCK:
        eye = torch.eye(n, dtype=m.dtype, device=m.device)
        m.copy_(torch.linalg.solve_triangular(m, eye, upper=False))
        return
    k = n // 2
    a, b, c = m[:k, :k], m[k:, :k], m[k:, k:]
    _invert_lower_(a)
    _invert_lower_(c)
    rows = n - k
    for r0 in range(0, rows, SOLVE_BLOCK):  # B <- B A^-1, band by band
        b[r0:r0 + SOLVE_BLOCK] = b[r0:r0 + SOLVE_BLOCK] @ a
    # B <- -C^-1 B from the bottom band up: band r needs B's rows up to its own end, not yet overwritten
    for r0 in reversed(range(0, rows, SOLVE_BLOCK)):
        r1 = min(r0 + SOLVE_BLOCK, rows)
        b[r0:r1] = -(c[r0:r1, :r1] @ b[:r1])


def _gptq(
    w: torch.Tensor, h: torch.Tensor, rtn: QuantizedWeight, block_size: int, damp: float, act_order: bool
) -> QuantizedWeight:
    """GPTQ without the RTN fallback. ``h``: ``[in, in]`` (not modified); ``rtn``: RTN's result for ``w``."""
    cols = int(w.shape[1])
    group_size = rtn.group_size
    grouped = rtn.zero is not None
    dynamic_groups = grouped and not act_order
    if act_order:
        # dead inputs (diag 0) sort last; their order does not matter, they are decoupled from the rest
        perm = torch.argsort(h.diagonal(), descending=True, stable=True)  # [in]: sweep position -> column
    else:
        perm = torch.arange(cols, device=w.device)
    u = _inverse_cholesky(h, perm, damp)  # [in, in] upper, in sweep order

    # Transposed layout: sweep column j is the contiguous row wt[j]. wt is updated in place.
    wt = w.detach().to(torch.float32)[:, perm].T.contiguous()  # [in, out]
    codes_t = torch.empty(wt.shape, dtype=torch.int8, device=w.device)  # [in, out]; uint8 codes 0..15 fit too

    if grouped:
        scale16 = rtn.scale.clone()  # [out, G]; overwritten per group when dynamic
        zero = rtn.zero.clone()  # [out, G] uint8
        s_groups = scale16.to(torch.float32).T.contiguous()  # [G, out]
        z_groups = zero.to(torch.float32).T.contiguous()  # [G, out]
        group_of = torch.div(perm, group_size, rounding_mode="floor").tolist()  # sweep position -> group
        qmin, qmax = 0, INT4_UMAX
    else:
        scale16, zero = rtn.scale.clone(), None  # [out, 1]
        s_row = scale16.to(torch.float32)[:, 0]  # [out]
        qmin, qmax = (INT8_QMIN, INT8_QMAX) if rtn.precision is Precision.INT8 else (INT4_QMIN, INT4_QMAX)

    for b0 in range(0, cols, block_size):
        b1 = min(b0 + block_size, cols)
        w_blk = wt[b0:b1]  # [B, out] view: in-block updates land in wt directly
        u_blk = u[b0:b1, b0:b1]  # [B, B]
        err_blk = torch.empty_like(w_blk)  # [B, out] scaled errors (w - q) / U[j, j]
        for i in range(b1 - b0):
            j = b0 + i
            if dynamic_groups and j % group_size == 0:
                g = j // group_size
                cur = _current_columns(wt, u, err_blk, b0, b1, j, min(j + group_size, cols))  # [width, out]
                _, s16, z8 = quantize_int4(cur.T, group_size, scale16.dtype)  # RTN's arithmetic: [out, 1] each
                scale16[:, g] = s16[:, 0]
                zero[:, g] = z8[:, 0]
                s_groups[g] = s16[:, 0].to(torch.float32)
                z_groups[g] = z8[:, 0].to(torch.float32)
            col = w_blk[i]  # [out]
            if grouped:
                s, z = s_groups[group_of[j]], z_groups[group_of[j]]
                c = torch.round(col / s).add_(z).clamp_(qmin, qmax)
                deq = (c - z).mul_(s)
            else:
                c = torch.round(col / s_row).clamp_(qmin, qmax)
                deq = c * s_row
            codes_t[j] = c  # integral floats in range: exact
            err = (col - deq).div_(u_blk[i, i])  # [out]
            err_blk[i] = err
            if i + 1 < b1 - b0:  # error feedback within the block: rows i+1.. of w_blk
                w_blk[i + 1 :].addr_(u_blk[i, i + 1 :], err, alpha=-1.0)
        if b1 < cols:  # lazy update of every later column: [in-b1, out] -= [in-b1, B] @ [B, out]
            wt[b1:].addmm_(u[b0:b1, b1:].T, err_blk, alpha=-1.0)

    if act_order:
        codes_t = codes_t[torch.argsort(perm)]  # back to column order
    codes = codes_t.T.contiguous()  # [out, in]
    if grouped:
        codes = codes.view(torch.uint8)  # values 0..15 have the same bits
    return QuantizedWeight(rtn.precision, codes, scale16, zero, group_size)


def _current_columns(
    wt: torch.Tensor, u: torch.Tensor, err_blk: torch.Tensor, b0: int, b1: int, j: int, end: int
) -> torch.Tensor:
    """Sweep columns ``j..end-1`` as rows ``[end-j, out]`` with every error update so far applied.

    Columns inside the current block ``[b0, b1)`` are up to date in ``wt``; later ones still lack the lazy update
    from this block's columns ``b0..j-1``, which is applied here to a copy."""
    inside = wt[j : min(end, b1)]
    if end <= b1:
        return inside
    outside = wt[b1:end]
    if j > b0:
        outside = outside - u[b0:j, b1:end].T @ err_blk[: j - b0]  # [end-b1, out]
    return torch.cat((inside, outside))
