"""A token embedding that keeps only INT8/INT4 rows resident: gather the rows of the ids, then dequantize them.

The embedding ``[vocab, hidden]`` is quantized like a linear weight ``[out, in]``
(:class:`~lsaq.quantization.primitives.QuantizedWeight`): one scale per token row for per-channel INT8/INT4
(compressed-tensors' "channel" strategy on an ``nn.Embedding``), or asymmetric groups along ``hidden`` for
group-wise INT4. The module holds the tensors the artifact stores, in the same layouts, so resident bytes equal
stored bytes:

* INT8: ``codes`` int8 ``[V, H]``, ``scale`` ``[V, 1]``.
* INT4: ``packed`` int32 ``[V, ceil(H/8)]`` (compressed-tensors' pack-quantized words: a row's codes are one
  contiguous row of words, so a lookup reads only the rows it needs), ``scale`` ``[V, G]`` and, group-wise,
  ``zero`` int32 ``[ceil(V/8), G]`` (zero points packed eight rows per word along dim 0).

A lookup of ``n`` ids dequantizes ``n`` rows in fp32 (code x 16-bit scale is exact there) and rounds once to the
output dtype: the same values compressed-tensors' dequantization gives in that dtype.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lsaq.precision import Precision
from lsaq.quantization.primitives import (
    SCALE_DTYPES,
    QuantizedWeight,
    dequantize_int4,
    pack_int4_to_int32,
    pack_zero_points,
    unpack_int32_to_int4,
    unpack_zero_points,
)


class QuantizedEmbedding(nn.Module):
    """``nn.Embedding`` replacement with INT8 or INT4 rows (see the module docstring for the layouts).

    The output dtype is the dtype of the zero-element buffer ``dtype_ref``: it follows ``module.to(dtype)`` and
    ``model.float()`` like any float buffer, as an ``nn.Embedding``'s output follows its weight. The scales are
    kept as their 16-bit patterns (an int16 buffer), so such casts never round them (fp16 -> bf16) nor widen them;
    :attr:`scale` views them in their dtype. ``embed_scale``
    (a 0-d buffer or None) is the multiplier some families apply inside their embedding module (Gemma3's
    ``Gemma3TextScaledWordEmbedding``), applied in the output dtype as they do.
    """

    def __init__(
        self,
        qw: QuantizedWeight,
        *,
        dtype: torch.dtype = torch.float32,
        padding_idx: int | None = None,
        embed_scale: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        if qw.precision not in (Precision.INT8, Precision.INT4):
            raise ValueError(f"cannot build a quantized embedding at {qw.precision.value}; valid: int8, int4")
        if qw.scale.dtype not in SCALE_DTYPES:
            raise ValueError(f"scale must be fp16 or bf16, got {qw.scale.dtype}")
        if not dtype.is_floating_point:
            raise ValueError(f"output dtype must be a float dtype, got {dtype}")
        self.precision = qw.precision
        self.num_embeddings, self.embedding_dim = qw.shape
        self.padding_idx = padding_idx
        self.group_size = qw.group_size
        self.scale_dtype = qw.scale.dtype
        self.register_buffer("scale_bits", qw.scale.detach().contiguous().view(torch.int16), persistent=False)
        if qw.precision is Precision.INT8:
            self.register_buffer("codes", qw.codes.detach().contiguous(), persistent=False)
        else:
            self.register_buffer("packed", pack_int4_to_int32(qw.codes), persistent=False)
        zero = None if qw.zero is None else pack_zero_points(qw.zero)
        self.register_buffer("zero", zero, persistent=False)
        self.register_buffer("dtype_ref", torch.empty(0, dtype=dtype), persistent=False)
        scale = None if embed_scale is None else embed_scale.detach().clone()
        self.register_buffer("embed_scale", scale, persistent=False)

    @classmethod
    def from_quantized(
        cls, qw: QuantizedWeight, dtype: torch.dtype = torch.float32, like: nn.Module | None = None
    ) -> "QuantizedEmbedding":
        """The module for ``qw``; ``like`` (the float embedding it replaces) lends padding_idx and embed_scale."""
        embed_scale = getattr(like, "embed_scale", None)
        if embed_scale is not None and (not torch.is_tensor(embed_scale) or embed_scale.device.type == "meta"):
            scalar = getattr(like, "scalar_embed_scale", None)  # Gemma3 keeps the Python float beside the buffer
            embed_scale = None if scalar is None else torch.tensor(float(scalar))
        return cls(qw, dtype=dtype, padding_idx=getattr(like, "padding_idx", None), embed_scale=embed_scale)

    @property
    def scale(self) -> torch.Tensor:
        """The stored scales ``[V, G]`` in their 16-bit dtype (a view, no copy)."""
        return self.scale_bits.view(self.scale_dtype)

    @property
    def resident_bytes(self) -> int:
        """Bytes of the stored tensors held (codes or packed words, scales, zero points)."""
        return sum(b.nbytes for name, b in self.named_buffers(recurse=False) if name != "embed_scale")

    def _rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Dequantized rows ``ids [n]`` -> fp32 ``[n, H]``."""
        scale = self.scale[ids].to(torch.float32)  # [n, G]
        if self.precision is Precision.INT8:
            return self.codes[ids].to(torch.float32).mul_(scale)
        if self.zero is None:
            codes = unpack_int32_to_int4(self.packed[ids], self.embedding_dim, signed=True)
            return codes.to(torch.float32).mul_(scale)
        codes = unpack_int32_to_int4(self.packed[ids], self.embedding_dim, signed=False)  # uint8 [n, H]
        # row r's zero points are nibble r % 8 of word row r // 8
        shift = (4 * (ids % 8)).to(torch.int32)[:, None]
        zero = ((self.zero[ids // 8] >> shift) & 0xF).to(torch.uint8)  # [n, G]
        return dequantize_int4(codes, scale, zero, self.group_size, torch.float32)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        dtype = self.dtype_ref.dtype
        flat = input_ids.reshape(-1)
        out = self._rows(flat).to(dtype).reshape(*input_ids.shape, self.embedding_dim)
        if self.embed_scale is not None:
            out = out * self.embed_scale.to(dtype)
        return out

    def to_quantized_weight(self) -> QuantizedWeight:
        """The stored form (plain codes), for writing and tests."""
        if self.precision is Precision.INT8:
            return QuantizedWeight(Precision.INT8, self.codes, self.scale)
        signed = self.zero is None
        codes = unpack_int32_to_int4(self.packed, self.embedding_dim, signed=signed)
        zero = None if signed else unpack_zero_points(self.zero, self.num_embeddings)
        return QuantizedWeight(Precision.INT4, codes, self.scale, zero, self.group_size)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The full dequantized matrix ``[V, H]`` (a new tensor; for tests and debugging)."""
        return self._rows(torch.arange(self.num_embeddings, device=self.scale.device)).to(dtype)

    def extra_repr(self) -> str:
        kind = self.precision.value + ("" if self.group_size is None else f", group_size={self.group_size}")
        groups = math.ceil(self.embedding_dim / self.group_size) if self.group_size else 1
        return f"{self.num_embeddings}, {self.embedding_dim}, {kind}, {groups} scale(s) per row"
