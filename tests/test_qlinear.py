"""Int8Linear / Int4Linear: kernel path == dequantize path, closeness to float, resident bytes, fallbacks."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import dot_noise
from torch import nn

from lsaq.precision import Precision
from lsaq.quantization.primitives import QuantizedWeight
from lsaq.quantization.qlinear import (
    DEQUANT_MIN_TOKENS,
    Int4Linear,
    Int8Linear,
    _cpu_int4pack_layout,
)

BF16_EPS = 2.0**-8  # bf16 unit roundoff is 2^-9; the kernels round x, the sum and (group-wise) s and z


def _linear(n_out: int, n_in: int, bias: bool = True, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    lin = nn.Linear(n_in, n_out, bias=bias)
    with torch.no_grad():
        lin.weight.mul_(4.0)
    return lin


def _module(kind: str, lin: nn.Linear) -> Int8Linear | Int4Linear:
    if kind == "int8":
        return Int8Linear.from_linear(lin)
    return Int4Linear.from_linear(lin, None if kind == "int4" else int(kind.split("g")[1]))


def _run(
    mod: Int8Linear | Int4Linear, x: torch.Tensor, path: str, kernel_dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    mod.path, mod.kernel_dtype = path, kernel_dtype
    try:
        with torch.no_grad():
            return mod(x)
    finally:
        mod.path, mod.kernel_dtype = "auto", torch.bfloat16


def _reference(mod: Int8Linear | Int4Linear, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x @ deq(W).T + b in float64, and the scale |x| @ |deq(W)|.T + |b| for error bounds."""
    w = mod.dequantized_weight().double()
    x64 = x.double().reshape(-1, x.shape[-1])
    b = mod.bias.double() if mod.bias is not None else torch.zeros(w.shape[0], dtype=torch.float64)
    ref = x64 @ w.T + b
    mag = x64.abs() @ w.abs().T + b.abs()
    return ref.reshape(*x.shape[:-1], -1), mag.reshape(*x.shape[:-1], -1)


# (out, in): kernel-friendly; SmolLM2 shapes; shapes each kernel rejects
KERNEL_SHAPES = [(64, 256), (192, 576), (576, 1536)]
KINDS = ["int8", "int4", "int4-g64", "int4-g128"]


@pytest.mark.parametrize("shape", KERNEL_SHAPES)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("tokens", [1, 37])
def test_kernel_path_equals_dequantize_path(shape: tuple[int, int], kind: str, tokens: int) -> None:
    n_out, n_in = shape
    mod = _module(kind, _linear(n_out, n_in))
    if not mod._kernel_ok():
        assert kind == "int4-g128" and n_in % 128, "only the ragged g=128 case may lack the kernel here"
        pytest.skip(f"{n_in} is not a multiple of 128: the kernel rejects it (covered by the fallback tests)")
    x = torch.randn(tokens, n_in)
    ref, mag = _reference(mod, x)
    # exact kernels (fp32, scalar): equal to the dequantize path up to fp32 summation order, each within
    # n_in-term fp32 rounding of the float64 result (x and the dequantized weights are exact fp32 values)
    y32 = _run(mod, x, "kernel", torch.float32)
    deq = _run(mod, x, "dequant")
    tol = dot_noise(torch.float32, n_in + 1, mag)  # [tokens, out]; + 1: the bias
    assert bool(((deq.double() - ref).abs() <= tol).all())
    assert bool(((y32.double() - deq.double()).abs() <= 2 * tol).all())
    # fast bf16 kernels, fp32 and bf16 activations: within bf16 rounding of the exact result
    for dtype in (torch.float32, torch.bfloat16):
        xd = x.to(dtype)
        ref_d, mag_d = _reference(mod, xd)
        y = _run(mod, xd, "kernel")
        assert y.dtype == dtype and y.shape == (tokens, n_out)
        assert bool(((y.double() - ref_d).abs() <= 3 * BF16_EPS * mag_d + 1e-6).all())


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", [(64, 256), (48, 200)])
def test_bf16_scales(kind: str, shape: tuple[int, int]) -> None:
    """Modules built from bf16 scales (artifacts of bf16 sources) keep them exactly and run both paths on them."""
    lin = _linear(*shape)
    group = None if kind in ("int8", "int4") else int(kind.split("g")[1])
    qw = QuantizedWeight.quantize(lin.weight.detach(), "int8" if kind == "int8" else "int4", group, torch.bfloat16)
    mod = (Int8Linear if kind == "int8" else Int4Linear).from_quantized(qw, lin.bias.detach().to(torch.bfloat16))
    back = mod.to_quantized_weight()
    assert back.scale.dtype == torch.bfloat16 and torch.equal(back.scale, qw.scale)
    assert torch.equal(back.codes, qw.codes)
    assert torch.equal(mod.dequantized_weight(), qw.dequantize())
    assert mod.resident_bytes == qw.storage_nbytes() + shape[0] * 2
    x = torch.randn(5, shape[1])
    ref, mag = _reference(mod, x)
    deq = _run(mod, x, "dequant")
    tol = dot_noise(torch.float32, shape[1] + 1, mag)  # + 1: the bias
    assert bool(((deq.double() - ref).abs() <= tol).all())
    if mod._kernel_ok():
        y32 = _run(mod, x, "kernel", torch.float32)  # exact scalar kernels: fp32 summation order only
        assert bool(((y32.double() - deq.double()).abs() <= 2 * tol).all())
        for dtype in (torch.float32, torch.bfloat16):
            xd = x.to(dtype)
            ref_d, mag_d = _reference(mod, xd)
            y = _run(mod, xd, "kernel")
            assert y.dtype == dtype and bool(((y.double() - ref_d).abs() <= 3 * BF16_EPS * mag_d + 1e-6).all())


def test_scale_dtype_is_checked() -> None:
    codes = torch.zeros(16, 32, dtype=torch.int8)
    with pytest.raises(ValueError, match="fp16 or bf16"):
        Int8Linear(codes, torch.ones(16, 1))
    with pytest.raises(ValueError, match="fp16 or bf16"):
        Int4Linear(codes, torch.ones(16, 1))


@pytest.mark.parametrize("kind", KINDS)
def test_fallback_for_rejected_shapes(kind: str) -> None:
    # 40 rows: not a multiple of 16 (int4 kernel); 100 columns: not a multiple of 16 (int8 bf16 kernel)
    # nor of any int4 group size accepted by the kernel
    for n_out, n_in in [(40, 128), (64, 100), (48, 200)]:
        mod = _module(kind, _linear(n_out, n_in))
        if kind == "int8":
            assert mod._kernel_ok() == (n_in % 16 == 0)
        else:
            assert not mod._kernel_ok() and mod.layout is None
            assert mod.packed.dtype == torch.int32  # compressed-tensors layout, same bytes
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(3, 5, n_in).to(dtype)
            ref, mag = _reference(mod, x)
            y = mod(x)  # auto: must not try the kernel on rejected shapes
            assert y.dtype == dtype and y.shape == (3, 5, n_out)
            exact = dtype == torch.float32 and not mod._kernel_ok()  # fp32 dequantize path
            tol = 1e-5 if exact else 3 * BF16_EPS
            assert bool(((y.double() - ref).abs() <= tol * mag + 1e-6).all())
        if not mod._kernel_ok():
            mod.path = "kernel"
            with pytest.raises(ValueError, match="not available"):
                mod(torch.randn(1, n_in))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 64])
def test_int8_close_to_float_linear(dtype: torch.dtype, tokens: int) -> None:
    lin = _linear(576, 576)
    mod = Int8Linear.from_linear(lin)
    x = torch.randn(tokens, 576)
    with torch.no_grad():
        y_float = lin(x).double()
        y = mod(x.to(dtype)).double()
    rel = (y - y_float).norm() / y_float.norm()
    assert rel < 0.01, rel


@pytest.mark.parametrize("kind,limit", [("int4", 0.15), ("int4-g64", 0.10)])
def test_int4_close_to_float_linear(kind: str, limit: float) -> None:
    lin = _linear(192, 576)
    mod = _module(kind, lin)
    x = torch.randn(8, 576)
    with torch.no_grad():
        y_float = lin(x).double()
        y = mod(x).double()
    assert (y - y_float).norm() / y_float.norm() < limit


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", [(576, 1536), (40, 200)])
@pytest.mark.parametrize("bias", [True, False])
def test_resident_bytes_equal_storage_bytes(kind: str, shape: tuple[int, int], bias: bool) -> None:
    n_out, n_in = shape
    lin = _linear(n_out, n_in, bias=bias)
    mod = _module(kind, lin)
    qw = mod.to_quantized_weight()
    bias_bytes = n_out * 4 if bias else 0
    assert mod.resident_bytes == qw.storage_nbytes() + bias_bytes
    n_groups = 1 if kind in ("int8", "int4") else math.ceil(n_in / int(kind.split("g")[1]))
    if kind == "int8":
        expected = n_out * n_in + n_out * 2
    else:
        expected = n_out * math.ceil(n_in / 8) * 4 + n_out * n_groups * 2
        if n_groups > 1 or kind != "int4":
            expected += math.ceil(n_out / 8) * n_groups * 4
    assert mod.resident_bytes == expected + bias_bytes
    # no float copy of the weight stays in the module
    assert not any(b.is_floating_point() and b.numel() >= n_out * n_in // 8 for b in mod.buffers())
    assert not list(mod.parameters())


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", [(64, 256), (48, 256), (40, 200)])
def test_storage_form_round_trip(kind: str, shape: tuple[int, int]) -> None:
    """to_quantized_weight() returns exactly what was quantized, from either internal layout."""
    lin = _linear(*shape)
    group = None if kind in ("int8", "int4") else int(kind.split("g")[1])
    qw = QuantizedWeight.quantize(lin.weight.detach(), "int8" if kind == "int8" else "int4", group)
    mod = (Int8Linear if kind == "int8" else Int4Linear).from_quantized(qw, lin.bias)
    back = mod.to_quantized_weight()
    assert back.precision is qw.precision and back.group_size == qw.group_size
    assert back.codes.dtype == qw.codes.dtype and torch.equal(back.codes, qw.codes)
    assert torch.equal(back.scale, qw.scale)
    assert (back.zero is None) == (qw.zero is None)
    if qw.zero is not None:
        assert torch.equal(back.zero, qw.zero)
    assert torch.equal(mod.dequantized_weight(), qw.dequantize())


@pytest.mark.parametrize("kind", KINDS)
def test_dequantize_path_in_row_blocks(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Row-blocked dequantization (64 rows at a time here) over full and short layout blocks."""
    import lsaq.quantization.qlinear as qlinear

    monkeypatch.setattr(qlinear, "_DEQUANT_BLOCK_ELEMS", 64 * 256)
    mod = _module(kind, _linear(176, 256))  # 176 = 5 * 32 + 16 = 2 * 64 + 48
    x = torch.randn(3, 256)
    ref, mag = _reference(mod, x)
    y = _run(mod, x, "dequant")
    assert bool(((y.double() - ref).abs() <= 1e-5 * mag + 1e-6).all())


def test_cpu_int4_layout_is_recognised() -> None:
    if not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
        pytest.skip("this torch build has no CPU int4 kernel")
    assert _cpu_int4pack_layout() is not None
    assert Int4Linear.from_linear(_linear(64, 256)).layout is not None


def test_auto_path_choice_and_options() -> None:
    mod = Int8Linear.from_linear(_linear(64, 256))
    n = DEQUANT_MIN_TOKENS[Precision.INT8]
    assert mod._choose_kernel(torch.randn(1, 256))
    assert not mod._choose_kernel(torch.randn(n, 256))
    assert mod._choose_kernel(torch.randn(n - 1, 256))
    mod.path = "dequant"
    assert not mod._choose_kernel(torch.randn(1, 256))
    with pytest.raises(ValueError, match="auto, kernel, dequant"):
        mod.path = "fast"
    with pytest.raises(ValueError, match="kernel_dtype"):
        mod.kernel_dtype = torch.int8
    mod.path = "auto"
    mod.kernel_dtype = torch.float32  # scalar kernels: auto always dequantizes (they lose even at 1 token)
    assert not mod._choose_kernel(torch.randn(1, 256))
    mod.kernel_dtype = torch.bfloat16
    with pytest.raises(ValueError, match=r"\[\.\.\., 256\]"):
        mod(torch.randn(1, 255))
    assert mod(torch.randn(0, 256)).shape == (0, 64)


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_gradient_flows_to_input(kind: str) -> None:
    """Kernels have no backward: inputs that require grad take the (differentiable) dequantize path."""
    mod = _module(kind, _linear(64, 256))
    x = torch.randn(2, 256, requires_grad=True)
    mod(x).sum().backward()
    w = mod.dequantized_weight().double()  # [64, 256]: d(sum y)/dx = sum of W's rows, 64 fp32 terms per input
    tol = dot_noise(torch.float32, 64, w.abs().sum(0))
    assert bool(((x.grad.double() - w.sum(0)).abs() <= tol).all())


def test_fp16_input_and_fp16_bias() -> None:
    lin = _linear(64, 256)
    mod = Int4Linear.from_quantized(QuantizedWeight.quantize(lin.weight.detach(), "int4"), lin.bias.half())
    x = torch.randn(4, 256, dtype=torch.float16)
    y = mod(x)
    ref, mag = _reference(mod, x)
    assert y.dtype == torch.float16
    assert bool(((y.double() - ref).abs() <= 3 * BF16_EPS * mag + 1e-3).all())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: the CUDA path is checked only on a GPU")
@pytest.mark.parametrize("kind", KINDS)
def test_cuda_path(kind: str) -> None:
    lin = _linear(192, 576)
    group = None if kind in ("int8", "int4") else int(kind.split("g")[1])
    qw = QuantizedWeight.quantize(lin.weight.detach(), "int8" if kind == "int8" else "int4", group)
    cls = Int8Linear if kind == "int8" else Int4Linear
    mod = cls.from_quantized(qw, lin.bias, device="cuda")
    cpu = cls.from_quantized(qw, lin.bias)
    assert mod.resident_bytes == cpu.resident_bytes
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        x = torch.randn(5, 576, dtype=dtype)
        ref, mag = _reference(cpu, x)
        y = mod(x.cuda())
        assert y.device.type == "cuda" and y.dtype == dtype
        tol = 1e-4 if dtype == torch.float32 else 4 * BF16_EPS
        assert bool(((y.cpu().double() - ref).abs() <= tol * mag + 1e-3).all())
    back = mod.to_quantized_weight()
    assert torch.equal(back.codes.cpu(), qw.codes)
