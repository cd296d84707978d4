"""Weight quantization primitives: pure, deterministic tensor functions.

Conventions (shared with the artifact writer and the memory model; they follow compressed-tensors so
stock ``transformers`` decodes our artifacts to exactly the weights we computed):

Scales are 16-bit floats, float16 or bfloat16 (``scale_dtype``: the artifact stores them in the dtype of its
other 16-bit tensors, because stock loaders create scale parameters in the model's dtype and would round fp16
scales into bf16); "fp16" below stands for either. For a weight ``W [out, in]`` (``nn.Linear`` layout; an
embedding ``[vocab, hidden]`` is quantized the same way, one scale per token row):

* INT8, symmetric, per output channel: ``scale = max|W_row| / 127.5`` stored as fp16 ``[out, 1]``,
  ``codes = clamp(round(W / scale), -128, 127)`` as int8 ``[out, in]``; dequant ``codes * scale``.
  127.5 = (q_max - q_min) / 2 is compressed-tensors' symmetric convention; it uses all 256 levels and
  keeps ``|W - deq| <= scale / 2`` (the row maximum lands on 127.5 and clamps to 127 with error scale/2).
* INT4, symmetric, per output channel (the default): ``scale = max|W_row| / 7.5`` fp16 ``[out, 1]``,
  signed codes ``clamp(round(W / scale), -8, 7)`` as int8; dequant ``codes * scale``.
* INT4, asymmetric, group-wise with group size ``g`` (groups run along ``in``; the last group may be
  shorter): per group ``lo = min(min(W_grp), 0)``, ``hi = max(max(W_grp), 0)`` (0 stays exactly
  representable, as in compressed-tensors), ``scale = (hi - lo) / 15`` fp16 ``[out, G]``,
  ``zero = round(-lo / scale)`` in [0, 15] as uint8 ``[out, G]``, unsigned codes
  ``clamp(round(W / scale) + zero, 0, 15)`` as uint8; dequant ``(codes - zero) * scale``.
  compressed-tensors stores the same numbers in signed form (``q = code - 8``, ``zp = zero - 8``,
  ``deq = (q - zp) * scale``), so the packed nibbles are byte-identical.

Every scale is rounded *up* to the next value of its 16-bit dtype (and floored at :data:`SCALE_FLOOR`:
the smallest fp16 subnormal, the smallest bf16 normal, which also guards all-zero rows), so the analytic
round-to-nearest bound ``|W - deq| <= scale / 2`` holds with the stored scale, up to fp32 rounding of the
quotient ``W / scale``.

Packing (compressed-tensors "pack-quantized"): ``weight_packed`` int32 ``[out, ceil(in/8)]`` holds the
unsigned nibble (signed code + 8) of column ``j`` in bits ``4*(j%8)`` of word ``j//8``; padding nibbles
are 0. Asymmetric zero points are packed the same way along dim 0: int32 ``[ceil(out/8), G]``. INT8 codes of
a linear pack the same way at 8 bits (code + 128 in bits ``8*(j%4)`` of word ``j//4``, ``[out, ceil(in/4)]``),
the form vLLM's weight-only kernels serve; an INT8 embedding keeps plain int8 codes (``weight``), the form stock
transformers loads for an embedding.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import torch

from lsaq.precision import Precision

INT8_QMIN, INT8_QMAX = -128, 127
INT4_QMIN, INT4_QMAX = -8, 7
INT4_UMAX = 15
INT4_OFFSET = 8  # signed code + 8 = unsigned nibble
FP16_TINY = 2.0**-24  # smallest positive fp16 (subnormal): floor for fp16 scales
# Floor of the scales per dtype. bf16: its smallest normal (2^-126); its subnormals would make W / scale a
# subnormal fp32 division, slow on some CPUs and flushed to zero under DAZ.
SCALE_FLOOR = {torch.float16: FP16_TINY, torch.bfloat16: 2.0**-126}
SCALE_DTYPES = tuple(SCALE_FLOOR)
# Rows are quantized in chunks of about this many elements so the fp32 temporaries stay in cache: one
# chunk-sized temporary is alive at a time, never a full-size one. On the 2-core EPYC (4096x4096 fp32,
# memcpy 4.5 ms) chunks of 128K/256K/512K/1M/2M elements took 22/15/11/9.5/30 ms for INT8 and
# 31/21/15.5/15/26 ms for group-wise INT4: 512K is just below the cache cliff. See bench_kernels.py.
_CHUNK_ELEMS = 1 << 19


def _check_weight(w: torch.Tensor) -> None:
    if w.dim() != 2:
        raise ValueError(f"expected a 2-D weight [out, in], got shape {tuple(w.shape)}")
    if not w.is_floating_point():
        raise ValueError(f"expected a floating-point weight, got {w.dtype}")


def check_scale_dtype(dtype: torch.dtype) -> torch.dtype:
    """``dtype`` if scales can be stored in it (float16, bfloat16); ``ValueError`` naming the valid ones otherwise."""
    if dtype not in SCALE_FLOOR:
        raise ValueError(f"unknown scale dtype {dtype}; valid: {', '.join(str(d) for d in SCALE_DTYPES)}")
    return dtype


def _round_up(s: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """fp32 scales -> ``dtype`` scales >= s (next representable value up), floored at SCALE_FLOOR[dtype].

    No host synchronisation here (it runs once per chunk); callers check the result with _check_scales."""
    s16 = s.to(dtype)
    s16 = torch.where(s16.to(torch.float32) < s, torch.nextafter(s16, torch.full_like(s16, math.inf)), s16)
    return s16.clamp_min_(SCALE_FLOOR[dtype])


def _check_scales(scale16: torch.Tensor) -> None:
    # NaN/inf weights give NaN scales; a range above the scale dtype's (fp16: 65504) gives inf
    if not bool(torch.isfinite(scale16).all()):
        raise ValueError(f"weight has non-finite values or a range too large for {scale16.dtype} scales")


def _row_chunks(rows: int, cols: int) -> range:
    step = max(1, _CHUNK_ELEMS // max(cols, 1))
    return range(0, rows, step)


def _symmetric(
    w: torch.Tensor, half_levels: float, qmin: int, qmax: int, scale_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row symmetric quantization. Returns codes int8 [out, in], scale scale_dtype [out, 1]."""
    _check_weight(w)
    check_scale_dtype(scale_dtype)
    w = w.detach()
    rows, cols = w.shape
    codes = torch.empty((rows, cols), dtype=torch.int8, device=w.device)
    scale16 = torch.empty((rows, 1), dtype=scale_dtype, device=w.device)
    step = max(1, _CHUNK_ELEMS // max(cols, 1))
    for r0 in _row_chunks(rows, cols):
        chunk = w[r0 : r0 + step]
        # amax and amin separately: both are vectorized reductions, torch.aminmax is ~7x slower on CPU.
        amax = torch.maximum(chunk.amax(1), chunk.amin(1).neg()).to(torch.float32)
        s16 = _round_up(amax / half_levels, scale_dtype)
        scale16[r0 : r0 + step, 0] = s16
        t = torch.div(chunk, s16.to(torch.float32)[:, None])  # fp32 chunk-sized temporary
        t.round_().clamp_(qmin, qmax)
        codes[r0 : r0 + step].copy_(t)  # integral floats -> int8 is exact
    _check_scales(scale16)
    return codes, scale16


def quantize_int8(w: torch.Tensor, scale_dtype: torch.dtype = torch.float16) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel INT8 quantization.

    Args:
        w: float weight ``[out, in]`` (any float dtype).
        scale_dtype: torch.float16 or torch.bfloat16.
    Returns:
        ``(codes, scale)``: codes int8 ``[out, in]`` in [-128, 127]; scale ``scale_dtype`` ``[out, 1]``.
    """
    return _symmetric(w, 127.5, INT8_QMIN, INT8_QMAX, scale_dtype)


def _asymmetric_groups(
    w: torch.Tensor, group_size: int, scale_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Group-wise asymmetric INT4. Returns codes uint8 [out, in], scale [out, G], zero uint8 [out, G]."""
    rows, cols = w.shape
    n_groups = math.ceil(cols / group_size)
    full = cols // group_size  # groups of exactly group_size columns; a shorter tail group may follow
    codes = torch.empty((rows, cols), dtype=torch.uint8, device=w.device)
    scale16 = torch.empty((rows, n_groups), dtype=scale_dtype, device=w.device)
    zero = torch.empty((rows, n_groups), dtype=torch.uint8, device=w.device)
    codes_i8 = codes.view(torch.int8)
    step = max(1, _CHUNK_ELEMS // max(cols, 1))
    # (first column, number of groups, group width) of the two column spans
    spans = [(0, full, group_size)] if full else []
    if cols % group_size:
        spans.append((full * group_size, 1, cols % group_size))
    for r0 in _row_chunks(rows, cols):
        r1 = min(rows, r0 + step)
        for c0, ng, width in spans:
            g0 = c0 // group_size
            grp = w[r0:r1, c0 : c0 + ng * width].view(r1 - r0, ng, width)
            lo = grp.amin(-1).to(torch.float32).clamp_max_(0.0)  # [r, ng]
            hi = grp.amax(-1).to(torch.float32).clamp_min_(0.0)
            s16 = _round_up((hi - lo) / INT4_UMAX, scale_dtype)
            s = s16.to(torch.float32)
            z = torch.round(lo.neg_() / s).clamp_(0, INT4_UMAX)  # [r, ng], integral floats
            scale16[r0:r1, g0 : g0 + ng] = s16
            zero[r0:r1, g0 : g0 + ng] = z.to(torch.uint8)
            t = torch.div(grp, s[..., None])  # fp32 chunk-sized temporary [r, ng, width]
            t.round_().add_(z[..., None]).clamp_(0, INT4_UMAX)
            # write through an int8 view: fp32 -> int8 is vectorized, fp32 -> uint8 is ~6x slower on
            # CPU; values 0..15 have the same bits in both.
            codes_i8[r0:r1, c0 : c0 + ng * width].view(r1 - r0, ng, width).copy_(t)
    _check_scales(scale16)
    return codes, scale16, zero


def quantize_int4(
    w: torch.Tensor, group_size: int | None = None, scale_dtype: torch.dtype = torch.float16
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """INT4 quantization: symmetric per-channel (``group_size=None``) or asymmetric group-wise.

    Args:
        w: float weight ``[out, in]``.
        group_size: None for per-output-channel symmetric (the paper's setting); a positive int for
            asymmetric groups of that many input columns (the last group may be shorter).
        scale_dtype: torch.float16 or torch.bfloat16.
    Returns:
        per-channel: ``(codes int8 [out, in] in [-8, 7], scale [out, 1], None)``;
        group-wise: ``(codes uint8 [out, in] in [0, 15], scale [out, G], zero uint8 [out, G])``
        with ``G = ceil(in / group_size)``; scales in ``scale_dtype``.
    """
    _check_weight(w)
    if group_size is None:
        codes, scale = _symmetric(w, 7.5, INT4_QMIN, INT4_QMAX, scale_dtype)
        return codes, scale, None
    if not isinstance(group_size, int) or group_size <= 0:
        raise ValueError(f"group_size must be None (per-channel) or a positive int, got {group_size!r}")
    check_scale_dtype(scale_dtype)
    return _asymmetric_groups(w.detach().contiguous(), group_size, scale_dtype)  # contiguous: groups are views


def dequantize_int8(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``codes int8 [out, in] * scale [out, 1]`` -> ``dtype [out, in]``.

    Computed in fp32 (code * 16-bit scale is exact there), so casting to the scale's dtype gives the same
    bits as compressed-tensors' dequantization, which multiplies in that dtype."""
    return (codes.to(torch.float32) * scale.to(torch.float32).reshape(-1, 1)).to(dtype)


def dequantize_int4(
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | None = None,
    group_size: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Inverse of :func:`quantize_int4` -> ``dtype [out, in]``.

    Args:
        codes: per-channel: int8 ``[out, in]`` signed; group-wise: uint8 ``[out, in]`` unsigned.
        scale: 16-bit float ``[out, 1]`` or ``[out, G]``.
        zero: None (symmetric) or uint8 ``[out, G]``.
        group_size: None (per-channel) or the group size used when quantizing.
    """
    s = scale.to(torch.float32)
    if zero is None and group_size is None:
        return (codes.to(torch.float32) * s.reshape(-1, 1)).to(dtype)
    if group_size is None:
        raise ValueError("group-wise dequantization needs group_size")
    rows, cols = codes.shape
    full = cols // group_size
    out = torch.empty((rows, cols), dtype=dtype, device=codes.device)
    z = zero.to(torch.float32) if zero is not None else torch.zeros_like(s)
    spans = [(0, full, group_size)] if full else []
    if cols % group_size:
        spans.append((full * group_size, 1, cols % group_size))
    for c0, ng, width in spans:
        g0 = c0 // group_size
        c = codes[:, c0 : c0 + ng * width].reshape(rows, ng, width).to(torch.float32)
        c.sub_(z[:, g0 : g0 + ng, None]).mul_(s[:, g0 : g0 + ng, None])
        out[:, c0 : c0 + ng * width] = c.view(rows, ng * width)
    return out


# ----------------------------------------------------------------------------------------------- packing


def _as_unsigned_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """int8 signed [-8, 7] -> +8; uint8 [0, 15] as is. Returns uint8 of the same shape."""
    if codes.dtype == torch.int8:
        lo, hi = INT4_QMIN, INT4_QMAX
        u = (codes.to(torch.int16) + INT4_OFFSET).to(torch.uint8)
    elif codes.dtype == torch.uint8:
        lo, hi = 0, INT4_UMAX
        u = codes
    else:
        raise ValueError(f"int4 codes must be int8 (signed, [-8, 7]) or uint8 (unsigned, [0, 15]); got {codes.dtype}")
    if codes.numel() and (int(codes.min()) < lo or int(codes.max()) > hi):
        raise ValueError(f"int4 codes of dtype {codes.dtype} must lie in [{lo}, {hi}]")
    return u


def pack_int4_to_uint8(codes: torch.Tensor) -> torch.Tensor:
    """Two codes per byte along the last dim: ``[rows, cols] -> uint8 [rows, ceil(cols/2)]``.

    Column ``2i`` goes to the low nibble of byte ``i``, column ``2i+1`` to the high nibble; signed int8
    codes are stored with the +8 offset; an odd last column is padded with nibble 0."""
    if codes.dim() != 2:
        raise ValueError(f"expected 2-D codes, got shape {tuple(codes.shape)}")
    u = _as_unsigned_nibbles(codes)
    if u.shape[1] % 2:
        u = torch.nn.functional.pad(u, (0, 1))
    return u[:, 0::2] | (u[:, 1::2] << 4)


def unpack_uint8_to_int4(packed: torch.Tensor, cols: int, signed: bool = True) -> torch.Tensor:
    """Inverse of :func:`pack_int4_to_uint8`: uint8 ``[rows, ceil(cols/2)]`` -> ``[rows, cols]``
    (int8 in [-8, 7] when ``signed`` else uint8 in [0, 15])."""
    if packed.dtype != torch.uint8 or packed.dim() != 2 or packed.shape[1] != math.ceil(cols / 2):
        raise ValueError(f"expected uint8 [rows, {math.ceil(cols / 2)}], got {packed.dtype} {tuple(packed.shape)}")
    u = torch.stack((packed & 0xF, packed >> 4), dim=-1).view(packed.shape[0], -1)[:, :cols]
    if signed:
        return u.view(torch.int8) - INT4_OFFSET
    return u.contiguous()


def _bytes_to_words(b: torch.Tensor) -> torch.Tensor:
    """uint8 [rows, 4n] -> int32 [rows, n], byte k of a word = bits 8k..8k+7 on any host."""
    if sys.byteorder == "big":
        b = b.view(b.shape[0], -1, 4).flip(-1).reshape(b.shape[0], -1)
    if b.numel() == 0:
        return torch.empty((b.shape[0], b.shape[1] // 4), dtype=torch.int32, device=b.device)
    # flatten first: contiguous() keeps odd strides on size-1 dims, which view(dtype) rejects
    return b.contiguous().reshape(-1).view(torch.int32).view(b.shape[0], -1)


def _words_to_bytes(w: torch.Tensor) -> torch.Tensor:
    if w.numel() == 0:
        return torch.empty((w.shape[0], w.shape[1] * 4), dtype=torch.uint8, device=w.device)
    b = w.contiguous().reshape(-1).view(torch.uint8).view(w.shape[0], -1)
    if sys.byteorder == "big":
        b = b.view(w.shape[0], -1, 4).flip(-1).reshape(w.shape[0], -1)
    return b


def pack_int4_to_int32(codes: torch.Tensor) -> torch.Tensor:
    """compressed-tensors ``weight_packed``: ``[rows, cols] -> int32 [rows, ceil(cols/8)]``.

    Byte-identical to ``compressed_tensors...pack_to_int32(signed_codes, 4)``."""
    if codes.dim() != 2:
        raise ValueError(f"expected 2-D codes, got shape {tuple(codes.shape)}")
    pad = (-codes.shape[1]) % 8
    u = _as_unsigned_nibbles(codes)
    if pad:
        u = torch.nn.functional.pad(u, (0, pad))  # nibble 0, as compressed-tensors pads
    return _bytes_to_words(u[:, 0::2] | (u[:, 1::2] << 4))


def unpack_int32_to_int4(packed: torch.Tensor, cols: int, signed: bool = True) -> torch.Tensor:
    """Inverse of :func:`pack_int4_to_int32`: int32 ``[rows, ceil(cols/8)]`` -> ``[rows, cols]``."""
    if packed.dtype != torch.int32 or packed.dim() != 2 or packed.shape[1] != math.ceil(cols / 8):
        raise ValueError(f"expected int32 [rows, {math.ceil(cols / 8)}], got {packed.dtype} {tuple(packed.shape)}")
    b = _words_to_bytes(packed)
    u = torch.stack((b & 0xF, b >> 4), dim=-1).view(packed.shape[0], -1)[:, :cols]
    if signed:
        return u.view(torch.int8) - INT4_OFFSET
    return u.contiguous()


def pack_zero_points(zero: torch.Tensor) -> torch.Tensor:
    """uint8 zero points ``[out, G]`` -> int32 ``[ceil(out/8), G]`` packed along dim 0, byte-identical to
    ``pack_to_int32(zero - 8, 4, packed_dim=0)`` (compressed-tensors ``weight_zero_point``)."""
    if zero.dtype != torch.uint8:
        raise ValueError(f"zero points must be uint8 in [0, 15], got {zero.dtype}")
    return pack_int4_to_int32(zero.t()).t().contiguous()


def pack_int8_to_int32(codes: torch.Tensor) -> torch.Tensor:
    """compressed-tensors ``weight_packed`` at 8 bits: int8 codes ``[rows, cols]`` in [-128, 127] -> int32
    ``[rows, ceil(cols/4)]``, byte ``k`` of word ``w`` = code ``4w + k`` + 128 (padding bytes 0).

    Byte-identical to ``compressed_tensors...pack_to_int32(codes, 8)``; vLLM reads it as ``uint8b128``."""
    if codes.dim() != 2 or codes.dtype != torch.int8:
        raise ValueError(f"expected int8 codes [rows, cols], got {codes.dtype} {tuple(codes.shape)}")
    u = (codes.view(torch.uint8) ^ 0x80)  # two's complement + 128 (mod 256) = flip the sign bit
    pad = (-codes.shape[1]) % 4
    if pad:
        u = torch.nn.functional.pad(u, (0, pad))  # byte 0, as compressed-tensors pads
    return _bytes_to_words(u)


def unpack_int32_to_int8(packed: torch.Tensor, cols: int) -> torch.Tensor:
    """Inverse of :func:`pack_int8_to_int32`: int32 ``[rows, ceil(cols/4)]`` -> int8 ``[rows, cols]``."""
    if packed.dtype != torch.int32 or packed.dim() != 2 or packed.shape[1] != math.ceil(cols / 4):
        raise ValueError(f"expected int32 [rows, {math.ceil(cols / 4)}], got {packed.dtype} {tuple(packed.shape)}")
    return (_words_to_bytes(packed)[:, :cols] ^ 0x80).view(torch.int8).contiguous()


def unpack_zero_points(packed: torch.Tensor, rows: int) -> torch.Tensor:
    """Inverse of :func:`pack_zero_points`: int32 ``[ceil(rows/8), G]`` -> uint8 ``[rows, G]``."""
    return unpack_int32_to_int4(packed.t().contiguous(), rows, signed=False).t().contiguous()


# ---------------------------------------------------------------------------------------- QuantizedWeight


@dataclass
class QuantizedWeight:
    """One quantized linear weight in the storage convention above (plain codes, not packed).

    ``codes``: int8 ``[out, in]`` (INT8, or INT4 per-channel, signed) or uint8 ``[out, in]`` (INT4
    group-wise, unsigned); ``scale`` fp16 or bf16 ``[out, 1]`` or ``[out, G]``; ``zero`` uint8 ``[out, G]`` or None.
    The same form holds a quantized embedding ``[vocab, hidden]``: one scale per token row (per channel).
    """

    precision: Precision
    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None = None
    group_size: int | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.codes.shape[0]), int(self.codes.shape[1]))

    @classmethod
    def quantize(
        cls,
        w: torch.Tensor,
        precision: Precision | str,
        group_size: int | None = None,
        scale_dtype: torch.dtype = torch.float16,
    ) -> "QuantizedWeight":
        """Quantize ``w [out, in]`` to INT8 or INT4 (``group_size`` applies to INT4 only), scales in ``scale_dtype``."""
        p = Precision.parse(precision)
        if p is Precision.INT8:
            if group_size is not None:
                raise ValueError("INT8 is per-channel only; group_size must be None")
            codes, scale = quantize_int8(w, scale_dtype)
            return cls(p, codes, scale)
        if p is Precision.INT4:
            codes, scale, zero = quantize_int4(w, group_size, scale_dtype)
            return cls(p, codes, scale, zero, group_size)
        raise ValueError(f"cannot quantize to {p.value}; valid precisions: int8, int4")

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if self.precision is Precision.INT8:
            return dequantize_int8(self.codes, self.scale, dtype)
        return dequantize_int4(self.codes, self.scale, self.zero, self.group_size, dtype)

    def compressed_tensors(self, pack_int8: bool = True) -> dict[str, torch.Tensor]:
        """The tensors compressed-tensors stores for this weight (names relative to the module), all
        "pack-quantized": weight_packed, weight_scale, weight_shape and, group-wise INT4, weight_zero_point.
        ``pack_int8=False``: INT8 as "int-quantized" (weight int8, weight_scale), the form of an INT8 embedding."""
        if self.precision is Precision.INT8 and not pack_int8:
            return {"weight": self.codes, "weight_scale": self.scale}
        pack = pack_int8_to_int32 if self.precision is Precision.INT8 else pack_int4_to_int32
        out = {
            "weight_packed": pack(self.codes),
            "weight_scale": self.scale,
            "weight_shape": torch.tensor(self.shape, dtype=torch.int64),
        }
        if self.zero is not None:
            out["weight_zero_point"] = pack_zero_points(self.zero)
        return out

    @classmethod
    def from_compressed_tensors(
        cls, tensors: dict[str, torch.Tensor], group_size: int | None = None, precision: Precision | None = None,
    ) -> "QuantizedWeight":
        """Inverse of :meth:`compressed_tensors` (``group_size`` is required for group-wise INT4). ``precision`` of
        packed words: INT8 or INT4; None: read from the words per row (ambiguous only for rows of 4 or fewer)."""
        if "weight_packed" not in tensors:
            if tensors.get("weight") is not None and tensors["weight"].dtype == torch.int8:
                return cls(Precision.INT8, tensors["weight"], tensors["weight_scale"])
            raise ValueError(f"not an int8 'weight' or packed 'weight_packed' tensor set: {sorted(tensors)}")
        rows, cols = (int(v) for v in tensors["weight_shape"].tolist())
        packed, scale = tensors["weight_packed"], tensors["weight_scale"]
        if precision is None:
            if cols <= 4:
                raise ValueError(f"{cols} columns of packed words could be INT8 or INT4: give the precision")
            precision = Precision.INT8 if packed.shape[1] == math.ceil(cols / 4) else Precision.INT4
        if Precision.parse(precision) is Precision.INT8:
            if group_size is not None or "weight_zero_point" in tensors:
                raise ValueError("INT8 is per-channel and symmetric: no group_size, no weight_zero_point")
            return cls(Precision.INT8, unpack_int32_to_int8(packed, cols), scale)
        zp = tensors.get("weight_zero_point")
        if (zp is None) != (group_size is None):
            raise ValueError("group-wise INT4 tensors need weight_zero_point and group_size; per-channel neither")
        if group_size is not None and scale.shape[1] != math.ceil(cols / group_size):
            raise ValueError(
                f"group_size {group_size} does not match weight_scale {tuple(scale.shape)} for {cols} columns"
            )
        codes = unpack_int32_to_int4(packed, cols, signed=zp is None)
        zero = None if zp is None else unpack_zero_points(zp, rows)
        return cls(Precision.INT4, codes, scale, zero, group_size)

    def storage_nbytes(self) -> int:
        """Bytes of the codes (one byte per INT8 code, packed words for INT4), scales and zero points: what
        :meth:`compressed_tensors` returns without weight_shape when INT8 rows are a multiple of 4 wide."""
        out, cols = self.shape
        n_groups = int(self.scale.shape[1])
        scale = out * n_groups * 2
        if self.precision is Precision.INT8:
            return out * cols + scale
        zero = math.ceil(out / 8) * n_groups * 4 if self.zero is not None else 0
        return out * math.ceil(cols / 8) * 4 + scale + zero
