"""lsaq's integer codes written as ggml blocks, exactly: a GPTQ (or any lsaq) weight kept code for code in GGUF.

Three lsaq formats are ggml block formats with other bookkeeping (blocks of 32 values along a row, a float16 ``d``
per block; :mod:`lsaq.quantization.primitives` for lsaq's side):

* INT8 per channel -> ``Q8_0`` (34 bytes: ``d``, 32 int8 ``q``; value ``d * q``): ``d`` = the row's scale, ``q`` =
  the codes. Exact (ggml's kernels take -128 in a weight block: only activation blocks stay within +-127).
* INT4 per channel, symmetric -> ``Q4_0`` (18 bytes: ``d``, 16 bytes of nibbles; value ``d * (nibble - 8)``):
  ``d`` = the row's scale, nibble = code + 8. Exact.
* INT4 asymmetric in groups of a multiple of 32 -> ``Q4_1`` (20 bytes: ``d``, ``m``, 16 bytes of nibbles; value
  ``d * nibble + m``): ``d`` = the group's scale, nibble = the unsigned code, ``m = -zero * scale`` rounded to
  float16. Exact wherever float16 holds ``zero * scale`` (it has 11 significant bits, ``zero * scale`` up to 15):
  else within half a float16 step of ``m``.

Nibbles of a block: byte ``j`` (0..15) holds value ``j`` in its low half and value ``j + 16`` in its high half.
A bfloat16 scale becomes float16 exactly within float16's normal range (2^-14 .. 65504); outside it the nearest
float16. Row order is the tensor's as given: a llama q/k projection is permuted by the caller
(:func:`permute_rope_rows`), which moves whole rows and their scales.
"""

from __future__ import annotations

import numpy as np
import torch

from lsaq.planning.ggml import BLOCKS, GgmlType
from lsaq.precision import Precision
from lsaq.quantization.primitives import INT4_OFFSET, QuantizedWeight

QK = 32  # values per block of Q8_0, Q4_0, Q4_1


def code_type(qw: QuantizedWeight) -> GgmlType:
    """The ggml type that holds ``qw``'s codes exactly (module doc); ``ValueError`` naming why none does."""
    cols = qw.shape[1]
    if cols % QK:
        raise ValueError(f"a row of {cols} values is not whole blocks of {QK}: no ggml block format holds it")
    if qw.precision is Precision.INT8:
        return GgmlType.Q8_0
    if qw.group_size is None:
        return GgmlType.Q4_0
    if qw.group_size % QK:
        raise ValueError(f"INT4 groups of {qw.group_size} are not whole blocks of {QK}: Q4_1 holds groups of 32, 64, "
                         "128, ... only")
    return GgmlType.Q4_1


def _half(x: torch.Tensor) -> np.ndarray:
    """float16 bytes of a scale-like tensor: uint8 ``[..., 2]`` (little-endian, as ggml stores them)."""
    return x.to(torch.float32).numpy().astype("<f2").view(np.uint8).reshape(*x.shape, 2)


def _nibbles(u: np.ndarray) -> np.ndarray:
    """uint8 values 0..15 ``[rows, blocks, 32]`` -> ggml's nibble bytes ``[rows, blocks, 16]``."""
    return (u[..., :QK // 2] | (u[..., QK // 2:] << 4)).astype(np.uint8)


def _per_block(scale: torch.Tensor, blocks: int) -> torch.Tensor:
    """A row's (``[rows, 1]``) or a group's (``[rows, G]``) scale repeated for each of ``blocks`` blocks per row."""
    return scale.repeat_interleave(blocks // scale.shape[1], dim=1)


def encode_codes(qw: QuantizedWeight) -> tuple[GgmlType, np.ndarray]:
    """``qw`` as ggml blocks: ``(type, uint8 [rows, row_bytes])`` in the row layout llama.cpp reads."""
    kind = code_type(qw)
    rows, cols = qw.shape
    blocks = cols // QK
    codes = qw.codes.contiguous().view(torch.uint8).numpy().reshape(rows, blocks, QK)
    d = _half(_per_block(qw.scale, blocks))  # [rows, blocks, 2]
    if kind is GgmlType.Q8_0:
        payload = [d, codes]  # int8 codes, their bytes unchanged
    elif kind is GgmlType.Q4_0:
        payload = [d, _nibbles(((codes.view(np.int8).astype(np.int16) + INT4_OFFSET)).astype(np.uint8))]
    else:
        scale = _per_block(qw.scale, blocks).to(torch.float32)
        m = _half(-_per_block(qw.zero, blocks).to(torch.float32) * scale)
        payload = [d, m, _nibbles(codes)]
    out = np.concatenate(payload, axis=-1).reshape(rows, -1)
    assert out.shape[1] == blocks * BLOCKS[kind][1]
    return kind, out


def permute_rope_rows(t: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of a transformers llama q/k projection (``[heads * head_dim, ...]``; a weight, its scales or its codes)
    in llama.cpp's order: within each head, rows ``0, h/2, 1, h/2 + 1, ...`` (rotary pairs adjacent), the inverse of
    what transformers' GGUF loader undoes."""
    rows = t.shape[0]
    return t.reshape(heads, 2, rows // heads // 2, *t.shape[1:]).transpose(1, 2).reshape(t.shape)


def permute_rope(qw: QuantizedWeight, heads: int) -> QuantizedWeight:
    """``qw`` with its rows (codes, scales, zero points) in llama.cpp's q/k order (:func:`permute_rope_rows`)."""
    return QuantizedWeight(qw.precision, permute_rope_rows(qw.codes, heads), permute_rope_rows(qw.scale, heads),
                           None if qw.zero is None else permute_rope_rows(qw.zero, heads), qw.group_size)


__all__ = ["QK", "code_type", "encode_codes", "permute_rope", "permute_rope_rows"]
