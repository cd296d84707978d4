"""Quantization primitives: exact packing, compressed-tensors compatibility, round-to-nearest error bounds."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lsaq.precision import Precision
from lsaq.quantization.primitives import (
    QuantizedWeight,
    dequantize_int4,
    dequantize_int8,
    pack_int4_to_int32,
    pack_int4_to_uint8,
    pack_int8_to_int32,
    pack_zero_points,
    quantize_int4,
    quantize_int8,
    unpack_int32_to_int4,
    unpack_int32_to_int8,
    unpack_uint8_to_int4,
    unpack_zero_points,
)

HYP = settings(max_examples=40, deadline=None)


def _codes(seed: int, rows: int, cols: int, signed: bool) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if signed:
        return torch.randint(-8, 8, (rows, cols), generator=g, dtype=torch.int8)
    return torch.randint(0, 16, (rows, cols), generator=g, dtype=torch.uint8)


# ------------------------------------------------------------------------------------------------ packing


@HYP
@given(rows=st.integers(1, 9), cols=st.integers(1, 70), signed=st.booleans(), seed=st.integers(0, 2**31))
def test_int32_pack_roundtrip_exact(rows: int, cols: int, signed: bool, seed: int) -> None:
    codes = _codes(seed, rows, cols, signed)
    packed = pack_int4_to_int32(codes)
    assert packed.dtype == torch.int32 and packed.shape == (rows, math.ceil(cols / 8))
    back = unpack_int32_to_int4(packed, cols, signed=signed)
    assert back.dtype == codes.dtype and torch.equal(back, codes)


@HYP
@given(rows=st.integers(1, 9), cols=st.integers(1, 41), signed=st.booleans(), seed=st.integers(0, 2**31))
def test_uint8_pack_roundtrip_exact(rows: int, cols: int, signed: bool, seed: int) -> None:
    codes = _codes(seed, rows, cols, signed)
    packed = pack_int4_to_uint8(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (rows, math.ceil(cols / 2))
    assert torch.equal(unpack_uint8_to_int4(packed, cols, signed=signed), codes)


@HYP
@given(rows=st.integers(1, 20), cols=st.integers(1, 40), seed=st.integers(0, 2**31))
def test_pack_bytes_equal_compressed_tensors(rows: int, cols: int, seed: int) -> None:
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32

    signed = _codes(seed, rows, cols, signed=True)
    ours = pack_int4_to_int32(signed)
    assert torch.equal(ours, pack_to_int32(signed, 4))
    assert torch.equal(unpack_from_int32(ours, 4, torch.Size([rows, cols])), signed)
    # unsigned codes u = q + 8 pack to the same bytes as the signed q
    assert torch.equal(pack_int4_to_int32((signed.to(torch.int16) + 8).to(torch.uint8)), ours)
    # zero points: packed along dim 0, compressed-tensors stores them signed (zp - 8)
    zero = _codes(seed + 1, rows, cols, signed=False)
    zp = pack_zero_points(zero)
    assert zp.shape == (math.ceil(rows / 8), cols)
    assert torch.equal(zp, pack_to_int32((zero.to(torch.int16) - 8).to(torch.int8), 4, packed_dim=0))
    assert torch.equal(unpack_zero_points(zp, rows), zero)


@HYP
@given(rows=st.integers(1, 9), cols=st.integers(1, 41), seed=st.integers(0, 2**31))
def test_int8_pack_roundtrip_equals_compressed_tensors(rows: int, cols: int, seed: int) -> None:
    """8-bit words: exact round trip, the same bytes as compressed-tensors' packer, -128 and 127 included."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32

    codes = torch.randint(-128, 128, (rows, cols), generator=torch.Generator().manual_seed(seed), dtype=torch.int8)
    codes[0, 0], codes[-1, -1] = -128, 127
    packed = pack_int8_to_int32(codes)
    assert packed.dtype == torch.int32 and packed.shape == (rows, math.ceil(cols / 4))
    assert torch.equal(packed, pack_to_int32(codes, 8))
    assert torch.equal(unpack_int32_to_int8(packed, cols), codes)
    assert torch.equal(unpack_from_int32(packed, 8, torch.Size([rows, cols])), codes)


def test_int8_pack_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="expected int8 codes"):
        pack_int8_to_int32(torch.zeros(2, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"expected int32 \[rows, 2\]"):
        unpack_int32_to_int8(torch.zeros(2, 3, dtype=torch.int32), 8)


def test_pack_rejects_bad_codes() -> None:
    with pytest.raises(ValueError, match="int8 .* or uint8"):
        pack_int4_to_int32(torch.zeros(2, 8, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"\[-8, 7\]"):
        pack_int4_to_int32(torch.full((2, 8), 8, dtype=torch.int8))
    with pytest.raises(ValueError, match=r"\[0, 15\]"):
        pack_int4_to_uint8(torch.full((2, 8), 16, dtype=torch.uint8))


# ----------------------------------------------------------------------------------------- error bounds


def _expand(scale: torch.Tensor, cols: int, group_size: int | None) -> torch.Tensor:
    s = scale.to(torch.float64)
    return s.expand(-1, cols) if group_size is None else s.repeat_interleave(group_size, 1)[:, :cols]


def assert_rtn_bound(w: torch.Tensor, qw: QuantizedWeight) -> None:
    """|w - deq| <= scale/2 elementwise (clamping is covered by the scale convention), up to fp32
    rounding of the quotient w / scale."""
    cols = w.shape[1]
    s = _expand(qw.scale, cols, qw.group_size)
    err = (w.to(torch.float64) - qw.dequantize(torch.float32).to(torch.float64)).abs()
    bound = s / 2 * (1 + 1e-6) + w.to(torch.float64).abs() * 1e-7
    assert bool((err <= bound).all()), f"max err/scale {(err / s).max().item():.6f}"


def _weights() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    w = torch.randn(64, 300, generator=g) * 0.05
    w[3] = 0.0  # all-zero row
    w[5, 7] = 40.0  # outlier row
    w[6] = 1e-9 * torch.randn(300, generator=g)  # tiny row: scale floored at the smallest fp16
    w[7] = w[7].abs()  # all-positive row (asymmetric: zero point 0)
    w[8] = -w[8].abs()  # all-negative row (asymmetric: zero point 15)
    return {"fp32": w, "bf16": w.to(torch.bfloat16), "fp16": w.to(torch.float16)}


@pytest.mark.parametrize("scale_dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("kind", ["int8", "int4", "int4-g32", "int4-g128"])
def test_rtn_error_bound_random(kind: str, dtype: str, scale_dtype: torch.dtype) -> None:
    w = _weights()[dtype]
    group = {"int4-g32": 32, "int4-g128": 128}.get(kind)
    qw = QuantizedWeight.quantize(w, "int8" if kind == "int8" else "int4", group, scale_dtype)
    assert qw.scale.dtype == scale_dtype
    assert qw.scale.shape == (64, 1 if group is None else math.ceil(300 / group))
    assert_rtn_bound(w.float(), qw)
    lo, hi = {"int8": (-128, 127), "int4": (-8, 7)}.get(kind, (0, 15))
    assert int(qw.codes.min()) >= lo and int(qw.codes.max()) <= hi
    if group is not None:
        assert qw.codes.dtype == torch.uint8 and qw.zero.dtype == torch.uint8 and int(qw.zero.max()) <= 15
        assert int(qw.zero[7].max()) == 0 and int(qw.zero[8].min()) == 15
    assert torch.equal(qw.dequantize()[3], torch.zeros(300))


@HYP
@given(
    rows=st.integers(1, 12),
    cols=st.integers(1, 80),
    group=st.sampled_from([None, 8, 32]),
    seed=st.integers(0, 2**31),
    mag=st.floats(1e-3, 1e3),
    bf16=st.booleans(),
)
def test_rtn_error_bound_property(rows: int, cols: int, group: int | None, seed: int, mag: float, bf16: bool) -> None:
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * mag
    sd = torch.bfloat16 if bf16 else torch.float16
    assert_rtn_bound(w, QuantizedWeight.quantize(w, "int4", group, sd))
    if group is None:
        assert_rtn_bound(w, QuantizedWeight.quantize(w, "int8", None, sd))


@pytest.mark.parametrize("scale_dtype", [torch.float16, torch.bfloat16])
def test_scales_are_rounded_up_to_the_next_16_bit_value(scale_dtype: torch.dtype) -> None:
    """The stored scale is the smallest value of its dtype >= max|row| / 127.5 (so the bound holds with it)."""
    w = torch.randn(40, 96, generator=torch.Generator().manual_seed(5)) * 0.3
    _, scale = quantize_int8(w, scale_dtype)
    exact = w.abs().amax(1, keepdim=True) / 127.5
    below = torch.nextafter(scale, torch.zeros_like(scale)).to(torch.float32)
    assert bool((scale.to(torch.float32) >= exact).all()) and bool((below < exact).all())


def test_bf16_scales_hold_ranges_fp16_scales_cannot() -> None:
    """A row with max 1e7 needs an INT8 scale of ~78000: past fp16's 65504, fine in bf16; tiny rows get real
    bf16 scales instead of the fp16 floor."""
    w = torch.randn(4, 64, generator=torch.Generator().manual_seed(6))
    w[0, 0] = 1e7
    w[1] *= 1e-9
    with pytest.raises(ValueError, match="too large for torch.float16 scales"):
        quantize_int8(w)
    qw = QuantizedWeight.quantize(w, "int8", scale_dtype=torch.bfloat16)
    assert_rtn_bound(w, qw)
    assert float(qw.scale[1]) < 1e-10  # fp16 would floor it at 2^-24 ~ 6e-8 and zero the row's codes


def test_unknown_scale_dtype_lists_valid() -> None:
    with pytest.raises(ValueError, match="unknown scale dtype torch.float32; valid: torch.float16, torch.bfloat16"):
        quantize_int8(torch.randn(4, 8), torch.float32)
    with pytest.raises(ValueError, match="unknown scale dtype"):
        quantize_int4(torch.randn(4, 8), 4, torch.float32)


def test_quantization_is_deterministic_and_exact_int8_range() -> None:
    w = torch.randn(33, 257)
    a, b = quantize_int8(w), quantize_int8(w.clone())
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    # the row maximum sits on 127.5 * scale and rounds (half to even) up to 128 before the clamp to 127
    codes, scale = a
    assert int(codes.abs().amax(1).min()) >= 127
    c4, s4, z4 = quantize_int4(w, 64)
    c4b, s4b, z4b = quantize_int4(w, 64)
    assert torch.equal(c4, c4b) and torch.equal(s4, s4b) and torch.equal(z4, z4b)


def test_dequantize_functions_match_dataclass() -> None:
    w = torch.randn(16, 96)
    c, s = quantize_int8(w)
    assert torch.equal(dequantize_int8(c, s), QuantizedWeight(Precision.INT8, c, s).dequantize())
    c, s, z = quantize_int4(w, 32)
    assert torch.equal(dequantize_int4(c, s, z, 32), QuantizedWeight(Precision.INT4, c, s, z, 32).dequantize())


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError, match="group_size"):
        quantize_int4(torch.randn(4, 8), 0)
    with pytest.raises(ValueError, match="2-D"):
        quantize_int8(torch.randn(8))
    with pytest.raises(ValueError, match="valid precisions"):
        QuantizedWeight.quantize(torch.randn(4, 8), "fp16")
    with pytest.raises(ValueError, match="valid precisions"):
        QuantizedWeight.quantize(torch.randn(4, 8), "int3")
    with pytest.raises(ValueError, match="non-finite"):
        quantize_int8(torch.tensor([[1.0, float("nan")]]))


# ------------------------------------------------------------------------------- compressed-tensors decode


@pytest.mark.parametrize("scale_dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["int8", "int8-embedding", "int4", "int4-g64"])
def test_compressed_tensors_decodes_to_our_weights(kind: str, scale_dtype: torch.dtype) -> None:
    """Stock compressed-tensors decompression of our tensors gives bit-identical weights in the scales' dtype: INT8
    linears packed 8 bits per code ("pack-quantized"), an INT8 embedding as plain codes ("int-quantized")."""
    from compressed_tensors.compressors.naive_quantized.base import NaiveQuantizationCompressor
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    w = torch.randn(48, 256, generator=torch.Generator().manual_seed(3)) * 0.1
    group = 64 if kind == "int4-g64" else None
    int8 = kind.startswith("int8")
    qw = QuantizedWeight.quantize(w, "int8" if int8 else "int4", group, scale_dtype)
    args = QuantizationArgs(
        num_bits=8 if int8 else 4,
        type="int",
        symmetric=group is None,
        strategy="channel" if group is None else "group",
        group_size=group,
    )
    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    tensors = qw.compressed_tensors(pack_int8=kind != "int8-embedding")
    compressor = NaiveQuantizationCompressor if kind == "int8-embedding" else PackedQuantizationCompressor
    out = compressor.decompress(dict(tensors), scheme)
    assert out["weight"].dtype == scale_dtype
    assert torch.equal(out["weight"], qw.dequantize(scale_dtype))
    stored = sum(t.nbytes for name, t in tensors.items() if name != "weight_shape")
    assert qw.storage_nbytes() == stored
    back = QuantizedWeight.from_compressed_tensors(tensors, group)
    assert back.precision is qw.precision and back.group_size == group
    assert QuantizedWeight.from_compressed_tensors(tensors, group, qw.precision).precision is qw.precision
    assert torch.equal(back.codes, qw.codes) and torch.equal(back.scale, qw.scale)
    assert (back.zero is None and qw.zero is None) or torch.equal(back.zero, qw.zero)


# ------------------------------------------------------------------------------------------ a real weight


@pytest.fixture(scope="module")
def real_weight(shared_gguf: Path) -> torch.Tensor:
    """blk.0.ffn_down.weight of the shared SmolLM2 GGUF (skips with a reason when absent; conftest)."""
    gguf = pytest.importorskip("gguf")
    reader = gguf.GGUFReader(str(shared_gguf))
    t = next(t for t in reader.tensors if t.name == "blk.0.ffn_down.weight")
    w = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy())
    assert w.shape == (576, 1536)  # [out, in]: down_proj of layer 0
    return w


@pytest.mark.model
@pytest.mark.parametrize("kind", ["int8", "int4", "int4-g128"])
def test_rtn_error_bound_real_weight(real_weight: torch.Tensor, kind: str) -> None:
    group = 128 if kind == "int4-g128" else None
    qw = QuantizedWeight.quantize(real_weight, "int8" if kind == "int8" else "int4", group)
    assert_rtn_bound(real_weight, qw)
    rel = (real_weight - qw.dequantize()).norm() / real_weight.norm()
    assert rel < {"int8": 0.02, "int4": 0.25, "int4-g128": 0.15}[kind]
