"""Linear layers that keep only packed integer weights resident and run on them.

CPU paths (torch 2.13, checked by reading its kernels and by measurement on a 2-core AVX2 EPYC):

* INT8: ``aten._weight_int8pack_mm(x [M, K], codes int8 [N, K], scales [N]) -> [M, N]``; x, scales and
  output share one dtype (fp32, bf16 or fp16; we cast the 16-bit scales per call). Only the bf16 kernel is
  vectorized: fp32/fp16 are scalar loops 10-20x slower (4096x4096, 1 token: bf16 0.7 ms, fp32 9-13 ms,
  against 2.7 ms for fp32 F.linear).
  The bf16 kernel reads x with aligned 16-/32-byte loads in steps of 8 (AVX2) or 16 (AVX512) columns and
  has no tail loop: K % 8 != 0 returns garbage or segfaults here, so we require K % 16 == 0 and a
  64-byte-aligned x (copied when not).
* INT4: ``aten._convert_weight_to_int4pack_for_cpu(codes int32 [N, K] in [0, 15], inner_k_tiles)`` ->
  uint8 ``[N, K/2]`` in a machine-specific blocked layout (inner_k_tiles is ignored on CPU), and
  ``aten._weight_int4pack_mm_for_cpu(x [M, K], packed, group_size, scales_and_zeros [K/g, N, 2])``
  with ``w[n, k] = (code - 8) * sz[k // g, n, 0] + sz[k // g, n, 1]`` (x, sz, output share one dtype;
  sz must be contiguous: an expanded tensor gives wrong results). Rules: N % 16 == 0, g in
  {32, 64, 128, 256}, K % g == 0. Again only bf16 is vectorized.
  - per-channel symmetric: code - 8 is our signed code, so the kernel runs with sz = (1, 0) (one shared
    constant per shape, g = the largest accepted size dividing K) and the output is multiplied by the
    row's stored 16-bit scale (fp16 or bf16). This keeps the scale exact and adds no per-layer memory.
  - group-wise asymmetric: ``(u - z) * s = (u - 8) * s + (8 - z) * s``, so sz = (s, (8 - z) * s), built per
    call from the resident 16-bit scale and packed zero points (keeping sz resident costs 6% more memory
    than the stored layer at g = 128; opt in with Int4Linear.cache_kernel_scales()).

Every float input (fp32, fp16, bf16) is therefore cast to bf16 for the kernels (``kernel_dtype``; set it
to torch.float32 for exact-but-slow scalar kernels), and the output is returned in the input dtype. With
bf16 the kernel result carries bf16 rounding of x and of the accumulated sum (~2^-9 relative), plus, for
group-wise INT4, bf16 rounding of s and (8 - z) * s; the dequantize path below has none of these.

Dequantize-then-matmul path: dequantizes blocks of rows to fp32 and calls F.linear in fp32 (fp32 GEMM is
far faster than bf16 GEMM on CPUs without AVX512-BF16/AMX: 4096x4096, 64 tokens: fp32 22 ms, bf16 100 ms).
Used for shapes the kernels reject, for inputs that require grad, on non-CPU devices (CUDA: dequantize
to the activation dtype and F.linear; checked only where a GPU exists), and for prefills of at least
``dequant_min_tokens`` tokens, where it is faster: see DEQUANT_MIN_TOKENS for the measurements.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lsaq.precision import Precision
from lsaq.quantization.primitives import (
    SCALE_DTYPES,
    QuantizedWeight,
    pack_int4_to_int32,
    pack_zero_points,
    unpack_int32_to_int4,
    unpack_zero_points,
)

PATHS = ("auto", "kernel", "dequant")
KERNEL_GROUP_SIZES = (256, 128, 64, 32)  # accepted by _weight_int4pack_mm_for_cpu, largest first
# Token counts from which the fp32 dequantize path replaces the bf16 kernel. Measured on the 2-core AVX2
# EPYC, torch 2.13, bf16 input, ms per call, kernel / dequantize path (benchmarks/bench_kernels.py --sweep
# and the same sweep at the SmolLM2 shapes):
#   shape (out x in)   INT8 @64     INT8 @96     INT4 @96     INT4 @128    INT4 g=128/64 @128
#   4096 x 4096        28.2 / 29.7  39.9 / 35.0  37.4 / 43.5  56.2 / 47.6  57.0 / 50.7
#   576 x 576          0.56 / 0.68  1.05 / 0.78  0.85 / 1.00  1.09 / 1.17  1.20 / 1.27
#   1536 x 576         1.41 / 1.57  2.10 / 2.09  2.10 / 2.47  2.86 / 2.72  3.09 / 3.10
#   576 x 1536         1.47 / 1.02  1.98 / 1.34  2.06 / 1.68  2.69 / 2.00  2.84 / 2.09
# The INT4 dequantize path costs more (unpacking torch's blocked layout: ~13 ms for 4096x4096 against
# ~3 ms for INT8), so its crossover is later. Single thresholds, chosen near the middle of the crossovers:
DEQUANT_MIN_TOKENS = {Precision.INT8: 64, Precision.INT4: 128}
# With kernel_dtype fp32 or fp16 the kernels are scalar loops that lose to the dequantize path even for one
# token (4096x4096 INT8: 9.1 ms fp32 kernel vs 5.1 ms; INT4 17.2 vs 16.4; 576x1536 INT8 0.45 vs 0.20), so
# "auto" never picks them; path="kernel" still runs them (exact results, used by the tests).
FP32_KERNEL_DEQUANT_MIN_TOKENS = 1
_DEQUANT_BLOCK_ELEMS = 1 << 21  # rows dequantized per F.linear call: ~8 MB of fp32 weight at a time

_shared_consts: dict[tuple, torch.Tensor] = {}


def _unit_scales_and_zeros(n_groups: int, n: int, dtype: torch.dtype) -> torch.Tensor:
    """Shared read-only (1, 0) scales_and_zeros [G, N, 2] for per-channel INT4 (one per shape and dtype:
    a few hundred KB per model, not counted in any module's resident_bytes)."""
    key = (n_groups, n, dtype)
    t = _shared_consts.get(key)
    if t is None:
        t = torch.zeros((n_groups, n, 2), dtype=dtype)
        t[..., 0] = 1
        _shared_consts[key] = t
    return t


def _aligned(t: torch.Tensor, alignment: int = 64) -> torch.Tensor:
    t = t.contiguous()
    return t if t.data_ptr() % alignment == 0 else t.clone()


# ------------------------------------------------------------------------- CPU int4pack layout (inverse)
# torch's CPU packing (aten/src/ATen/native/cpu/int4mm_kernel.cpp) splits N into blocks of BN rows
# (BN = 4 * floats per vector: 32 on AVX2, 64 on AVX512) stored one after another; inside a block, for each
# k, BN/2 bytes. Full AVX2/AVX512 blocks put row j in the low and row j + BN/2 in the high nibble of byte j
# ("halves"); a shorter last block and non-x86 builds pair rows 2j and 2j + 1 ("pairs"). We detect which
# candidate this build uses on a probe, and verify the inverse exactly on every layer we pack.
_LAYOUT_CANDIDATES = (("halves", 32), ("halves", 64), ("pairs", 32), ("pairs", 64), ("pairs", 16))
_detected_layout: tuple[str, int] | None | bool = False  # False = not probed yet, None = unknown


def _unpack_cpu_int4pack(
    packed: torch.Tensor, n: int, k: int, layout: tuple[str, int], r0: int = 0, r1: int | None = None
) -> torch.Tensor:
    """Rows [r0, r1) of a CPU-int4pack tensor -> uint8 codes [r1 - r0, k] in [0, 15]. r0 must be a
    multiple of the block size BN; r1 a multiple of BN or n."""
    kind, bn = layout
    r1 = n if r1 is None else r1
    flat = packed.view(-1)
    out = torch.empty((r1 - r0, k), dtype=torch.uint8, device=packed.device)
    full_end = min(r1, (n // bn) * bn)
    if full_end > r0:
        nb = (full_end - r0) // bn
        blk = flat[r0 * k // 2 : full_end * k // 2].view(nb, k, bn // 2)
        dst = out[: full_end - r0].view(nb, bn, k)
        if kind == "halves":
            dst[:, : bn // 2].copy_((blk & 0xF).transpose(1, 2))
            dst[:, bn // 2 :].copy_((blk >> 4).transpose(1, 2))
        else:
            dst.copy_(torch.stack((blk & 0xF, blk >> 4), -1).view(nb, k, bn).transpose(1, 2))
    if r1 > full_end:  # the shorter last block is always paired rows
        rows = r1 - max(full_end, r0)
        blk = flat[max(full_end, r0) * k // 2 : r1 * k // 2].view(k, rows // 2)
        out[r1 - r0 - rows :].copy_(torch.stack((blk & 0xF, blk >> 4), -1).view(k, rows).t())
    return out


def _cpu_int4pack_layout() -> tuple[str, int] | None:
    """The packing layout of this torch build and CPU, found once on a probe (None if unrecognised)."""
    global _detected_layout
    if _detected_layout is False:
        _detected_layout = None
        n, k = 176, 64  # 176 = 2*64 + 48 = 5*32 + 16: full and short blocks for every candidate
        u = torch.randint(0, 16, (n, k), dtype=torch.int32, generator=torch.Generator().manual_seed(0))
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(u, 2)
        for cand in _LAYOUT_CANDIDATES:
            if torch.equal(_unpack_cpu_int4pack(packed, n, k, cand), u.to(torch.uint8)):
                _detected_layout = cand
                break
    return _detected_layout


# ------------------------------------------------------------------------------------------------ modules


class _QuantLinear(nn.Module):
    """Shared forward logic. Subclasses provide _kernel_ok, _kernel_mm and _dequant_rows."""

    precision: Precision

    def __init__(self, in_features: int, out_features: int, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        # Buffers are non-persistent: the CPU int4 layout is machine-specific, so serialize through
        # to_quantized_weight() / QuantizedWeight.compressed_tensors(), never through state_dict().
        self.register_buffer("bias", None if bias is None else bias.detach().clone(), persistent=False)
        self.path = "auto"
        self.kernel_dtype = torch.bfloat16
        self.dequant_min_tokens = DEQUANT_MIN_TOKENS[self.precision]
        self._row_block = 64  # dequantize blocks of rows aligned to this (multiple of every layout block)

    @property
    def path(self) -> str:
        """'auto' (kernel below dequant_min_tokens tokens, else dequantize), 'kernel' or 'dequant'."""
        return self._path

    @path.setter
    def path(self, value: str) -> None:
        if value not in PATHS:
            raise ValueError(f"unknown path {value!r}; valid paths: {', '.join(PATHS)}")
        self._path = value

    @property
    def kernel_dtype(self) -> torch.dtype:
        """Activation dtype the CPU kernels run in: bf16 (vectorized, default) or fp32/fp16 (scalar, exact)."""
        return self._kernel_dtype

    @kernel_dtype.setter
    def kernel_dtype(self, value: torch.dtype) -> None:
        if value not in (torch.bfloat16, torch.float32, torch.float16):
            raise ValueError(f"unknown kernel_dtype {value}; valid: torch.bfloat16, torch.float32, torch.float16")
        self._kernel_dtype = value

    @property
    def resident_bytes(self) -> int:
        """Bytes held by this module: the sum of its buffers' nbytes (no float weight is kept)."""
        return sum(b.nbytes for b in self.buffers(recurse=False))

    def _choose_kernel(self, x2: torch.Tensor) -> bool:
        path = self._path
        if path == "dequant" or x2.shape[0] == 0:
            return False
        ok = (
            x2.device.type == "cpu"
            and self._kernel_ok()
            and not (x2.requires_grad and torch.is_grad_enabled())  # the kernels have no backward
        )
        if path == "kernel":
            if not ok:
                name = f"{type(self).__name__} {self.out_features}x{self.in_features}"
                raise ValueError(f"{name}: the kernel path is not available here (shape, device or grad)")
            return True
        limit = self.dequant_min_tokens if self._kernel_dtype == torch.bfloat16 else FP32_KERNEL_DEQUANT_MIN_TOKENS
        return ok and x2.shape[0] < limit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"expected input [..., {self.in_features}], got {tuple(x.shape)}")
        x2 = x if x.dim() == 2 else x.reshape(-1, self.in_features)
        if self._choose_kernel(x2):
            y = self._kernel_mm(x2, x.dtype)  # kernel dtype, or fp32 where a scale was applied in fp32
        elif x2.device.type == "cpu":
            y = self._dequant_mm_fp32(x2)
        else:  # CUDA and other devices: dequantize to the activation dtype, one GEMM
            y = F.linear(x2, self._dequant_rows(0, self.out_features, x2.dtype))
        if self.bias is not None:
            y = y + self.bias
        if y.dtype != x.dtype:
            y = y.to(x.dtype)
        return y if x.dim() == 2 else y.reshape(*x.shape[:-1], self.out_features)

    def _dequant_mm_fp32(self, x2: torch.Tensor) -> torch.Tensor:
        """fp32 F.linear over blocks of dequantized rows (bounds the fp32 weight temporary)."""
        xf = x2.to(torch.float32)
        n = self.out_features
        rb = self._row_block
        step = max(rb, _DEQUANT_BLOCK_ELEMS // max(self.in_features, 1) // rb * rb)
        if step >= n:
            return F.linear(xf, self._dequant_rows(0, n, torch.float32))
        blocks = [F.linear(xf, self._dequant_rows(r, min(n, r + step), torch.float32)) for r in range(0, n, step)]
        return torch.cat(blocks, dim=1)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The full dequantized weight [out, in] (a new tensor; for tests and debugging)."""
        return self._dequant_rows(0, self.out_features, dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Int8Linear(_QuantLinear):
    """Linear layer with INT8 symmetric per-channel weights: codes int8 [out, in], scale fp16/bf16 [out, 1]."""

    precision = Precision.INT8

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        if codes.dtype != torch.int8 or codes.dim() != 2:
            raise ValueError(f"codes must be int8 [out, in], got {codes.dtype} {tuple(codes.shape)}")
        out_f, in_f = codes.shape
        if scale.dtype not in SCALE_DTYPES or tuple(scale.shape) not in ((out_f, 1), (out_f,)):
            raise ValueError(f"scale must be fp16 or bf16 [{out_f}, 1], got {scale.dtype} {tuple(scale.shape)}")
        super().__init__(in_f, out_f, bias)
        self.register_buffer("codes", _aligned(codes), persistent=False)
        self.register_buffer("scale", scale.detach().reshape(out_f, 1).contiguous(), persistent=False)

    @classmethod
    def from_quantized(
        cls, qw: QuantizedWeight, bias: torch.Tensor | None = None, device: torch.device | str | None = None
    ) -> "Int8Linear":
        if qw.precision is not Precision.INT8:
            raise ValueError(f"expected an int8 QuantizedWeight, got {qw.precision.value}")
        dev = torch.device(device) if device is not None else qw.codes.device
        return cls(qw.codes.to(dev), qw.scale.to(dev), None if bias is None else bias.to(dev))

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Int8Linear":
        """Quantize a float nn.Linear (its weight is not kept)."""
        return cls.from_quantized(QuantizedWeight.quantize(linear.weight.detach(), Precision.INT8), linear.bias)

    def to_quantized_weight(self) -> QuantizedWeight:
        return QuantizedWeight(Precision.INT8, self.codes, self.scale)

    def _kernel_ok(self) -> bool:
        return self.in_features % 16 == 0 and self.codes.device.type == "cpu"

    def _kernel_mm(self, x2: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        kdt = self._kernel_dtype
        # scales in the kernel dtype: one cast of [N] per call (bf16 rounds an fp16 scale by <= 2^-9,
        # as much as the bf16 rounding of the output itself; a bf16 scale is exact)
        return torch.ops.aten._weight_int8pack_mm(_aligned(x2.to(kdt)), self.codes, self.scale.view(-1).to(kdt))

    def _dequant_rows(self, r0: int, r1: int, dtype: torch.dtype) -> torch.Tensor:
        w = self.codes[r0:r1].to(torch.float32).mul_(self.scale[r0:r1].to(torch.float32))
        return w if dtype == torch.float32 else w.to(dtype)


class Int4Linear(_QuantLinear):
    """Linear layer with INT4 weights, per-channel symmetric (``group_size=None``) or group-wise asymmetric.

    Buffers: ``packed`` (uint8 [out, in/2] in torch's CPU kernel layout when the kernel accepts the shape,
    else compressed-tensors' int32 [out, ceil(in/8)]; same bytes either way), ``scale`` fp16/bf16 [out, G] and,
    group-wise, ``zero`` int32 [ceil(out/8), G] (compressed-tensors' packed zero points).
    """

    precision = Precision.INT4

    def __init__(
        self,
        codes: torch.Tensor,
        scale: torch.Tensor,
        zero: torch.Tensor | None = None,
        group_size: int | None = None,
        bias: torch.Tensor | None = None,
    ) -> None:
        """codes: int8 [out, in] in [-8, 7] (per-channel) or uint8 [out, in] in [0, 15] (group-wise);
        scale fp16 or bf16 [out, 1] / [out, G]; zero uint8 [out, G] or None. Packs once; codes are not kept."""
        if codes.dim() != 2:
            raise ValueError(f"codes must be 2-D [out, in], got {tuple(codes.shape)}")
        out_f, in_f = codes.shape
        if (zero is None) != (group_size is None):
            raise ValueError("group-wise INT4 needs both zero and group_size; per-channel needs neither")
        want = torch.int8 if group_size is None else torch.uint8
        if codes.dtype != want:
            kind = "per-channel" if group_size is None else "group-wise"
            raise ValueError(f"{kind} INT4 codes must be {want}, got {codes.dtype}")
        n_groups = 1 if group_size is None else math.ceil(in_f / group_size)
        if scale.dtype not in SCALE_DTYPES or tuple(scale.shape) != (out_f, n_groups):
            raise ValueError(f"scale must be fp16 or bf16 [{out_f}, {n_groups}], "
                             f"got {scale.dtype} {tuple(scale.shape)}")
        super().__init__(in_f, out_f, bias)
        self.group_size = group_size
        self.register_buffer("scale", scale.detach().contiguous(), persistent=False)
        self.register_buffer("zero", None if zero is None else pack_zero_points(zero), persistent=False)
        self.register_buffer("kernel_sz", None, persistent=False)  # see cache_kernel_scales()
        self.kernel_group_size = self._pick_kernel_group(codes.device)
        self.layout: tuple[str, int] | None = None  # CPU kernel layout, or None for the plain int32 layout
        if self.kernel_group_size is not None:
            u = (codes.to(torch.int32) + 8) if codes.dtype == torch.int8 else codes.to(torch.int32)
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(u.contiguous(), 2)
            layout = _cpu_int4pack_layout()
            # Exact check that we can read the codes back (dequantize path, to_quantized_weight()).
            if layout is not None and torch.equal(_unpack_cpu_int4pack(packed, out_f, in_f, layout), u.to(torch.uint8)):
                self.layout = layout
                self._row_block = 64
                self.register_buffer("packed", packed, persistent=False)
            else:
                self.kernel_group_size = None
        if self.layout is None:
            self.register_buffer("packed", pack_int4_to_int32(codes), persistent=False)
            self._row_block = 8

    def _pick_kernel_group(self, device: torch.device) -> int | None:
        if device.type != "cpu" or self.out_features % 16 != 0:
            return None
        if not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
            return None
        if self.group_size is None:  # every group of a row shares the row scale: any accepted size works
            return next((g for g in KERNEL_GROUP_SIZES if self.in_features % g == 0), None)
        g = self.group_size
        return g if g in KERNEL_GROUP_SIZES and self.in_features % g == 0 else None

    @classmethod
    def from_quantized(
        cls, qw: QuantizedWeight, bias: torch.Tensor | None = None, device: torch.device | str | None = None
    ) -> "Int4Linear":
        if qw.precision is not Precision.INT4:
            raise ValueError(f"expected an int4 QuantizedWeight, got {qw.precision.value}")
        dev = torch.device(device) if device is not None else qw.codes.device
        zero = None if qw.zero is None else qw.zero.to(dev)
        return cls(qw.codes.to(dev), qw.scale.to(dev), zero, qw.group_size, None if bias is None else bias.to(dev))

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int | None = None) -> "Int4Linear":
        """Quantize a float nn.Linear (its weight is not kept)."""
        qw = QuantizedWeight.quantize(linear.weight.detach(), Precision.INT4, group_size)
        return cls.from_quantized(qw, linear.bias)

    def _codes_unsigned(self, r0: int, r1: int) -> torch.Tensor:
        """uint8 codes [r1 - r0, in] in [0, 15] (signed code + 8 for per-channel)."""
        if self.layout is not None:
            return _unpack_cpu_int4pack(self.packed, self.out_features, self.in_features, self.layout, r0, r1)
        return unpack_int32_to_int4(self.packed[r0:r1], self.in_features, signed=False)

    def to_quantized_weight(self) -> QuantizedWeight:
        u = self._codes_unsigned(0, self.out_features)
        if self.zero is None:
            return QuantizedWeight(Precision.INT4, (u.view(torch.int8) - 8), self.scale)
        zero = unpack_zero_points(self.zero, self.out_features)
        return QuantizedWeight(Precision.INT4, u, self.scale, zero, self.group_size)

    def _kernel_ok(self) -> bool:
        return self.layout is not None and self.packed.device.type == "cpu"

    def _kernel_mm(self, x2: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        kdt = self._kernel_dtype
        g = self.kernel_group_size
        xk = x2.to(kdt).contiguous()
        if self.zero is None:
            sz = _unit_scales_and_zeros(self.in_features // g, self.out_features, kdt)
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(xk, self.packed, g, sz)
            # times the exact 16-bit row scale, rounded once: into kdt, or into fp32 for other output dtypes
            if out_dtype == kdt:
                return y.mul_(self.scale.view(-1).to(kdt))
            return y.to(torch.float32).mul_(self.scale.view(-1))
        sz = self.kernel_sz
        if sz is None or sz.dtype != kdt:
            sz = self._build_kernel_sz(kdt)
        return torch.ops.aten._weight_int4pack_mm_for_cpu(xk, self.packed, g, sz)

    def _build_kernel_sz(self, kdt: torch.dtype) -> torch.Tensor:
        """Group-wise scales_and_zeros [G, N, 2] = (s, (8 - z) * s) in the kernel dtype."""
        s = self.scale.t().to(torch.float32)  # [G, N]
        z = unpack_zero_points(self.zero, self.out_features).t().to(torch.float32)
        return torch.stack((s, z.neg_().add_(8.0).mul_(s)), dim=-1).to(kdt)

    def cache_kernel_scales(self, enabled: bool = True) -> None:
        """Group-wise only: keep the kernel's scales_and_zeros resident instead of rebuilding them per call.

        Trades memory for speed: +4 bytes per group and row in bf16 (+6% over the stored layer at
        g=128, +12% at g=64; counted in resident_bytes), and saves ~13 small tensor ops per call, which
        is ~2x the kernel time on SmolLM2-sized layers (1 token) and a few % at 4096x4096."""
        if self.zero is None or self.layout is None:
            return  # per-channel already uses a shared constant; the fallback layout has no kernel
        self.kernel_sz = self._build_kernel_sz(self._kernel_dtype) if enabled else None

    def _dequant_rows(self, r0: int, r1: int, dtype: torch.dtype) -> torch.Tensor:
        w = self._codes_unsigned(r0, r1).to(torch.float32)  # [r, in]
        s = self.scale[r0:r1].to(torch.float32)
        if self.zero is None:
            w.sub_(8.0).mul_(s)
        else:
            # zero points are packed 8 rows per int32 along dim 0; row blocks start at multiples of 8
            z = unpack_zero_points(self.zero[r0 // 8 : math.ceil(r1 / 8)], r1 - r0).to(torch.float32)
            g, k = self.group_size, self.in_features
            full = k // g * g
            if full:
                wg = w[:, :full].view(r1 - r0, k // g, g)
                wg.sub_(z[:, : k // g, None]).mul_(s[:, : k // g, None])
            if full < k:
                w[:, full:].sub_(z[:, -1:]).mul_(s[:, -1:])
        return w if dtype == torch.float32 else w.to(dtype)

    def extra_repr(self) -> str:
        kind = "per-channel" if self.group_size is None else f"group_size={self.group_size}"
        where = f"cpu kernel g={self.kernel_group_size}" if self.layout is not None else "dequantize"
        return f"{super().extra_repr()}, {kind}, {where}"
