"""GPTQ (lsaq.quantization.gptq): agreement with RTN where GPTQ has nothing to exploit, with an unblocked reference
and an exhaustive search on tiny layers, never worse than RTN, RTN's storage format, and a clear gain on a
realistic correlated layer."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from conftest import dot_noise
from hypothesis import given, settings
from hypothesis import strategies as st

from lsaq.precision import Precision
from lsaq.quantization.gptq import HessianAccumulator, _gptq, gptq_quantize, proxy_loss
from lsaq.quantization.primitives import QuantizedWeight, quantize_int4

HYP = settings(max_examples=25, deadline=None)

# (precision, group_size) of every format GPTQ can produce
FORMATS = [("int8", None), ("int4", None), ("int4", 4), ("int4", 5), ("int4", 8), ("int4", 64)]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _hessian(x: torch.Tensor) -> torch.Tensor:
    acc = HessianAccumulator(x.shape[-1])
    acc.add(x)
    return acc.hessian()


def _output_error(x: torch.Tensor, w: torch.Tensor, q: QuantizedWeight) -> float:
    """||X W^T - X Q^T||_F^2 in fp64."""
    d = w.to(torch.float64) - q.dequantize(torch.float64)
    return float((x.to(torch.float64) @ d.T).square().sum())


def _assert_same(a: QuantizedWeight, b: QuantizedWeight) -> None:
    assert a.precision is b.precision and a.group_size == b.group_size
    assert a.codes.dtype == b.codes.dtype and torch.equal(a.codes, b.codes)
    assert a.scale.dtype == b.scale.dtype and torch.equal(a.scale, b.scale)
    assert (a.zero is None) == (b.zero is None)
    if a.zero is not None:
        assert a.zero.dtype == b.zero.dtype and torch.equal(a.zero, b.zero)


# ------------------------------------------------------------------------------ reference GPTQ (unblocked, OBS)


def _reference_gptq(
    w: torch.Tensor,
    h: torch.Tensor,
    precision: str,
    group_size: int | None,
    damp: float = 0.01,
    act_order: bool = False,
    scale_dtype: torch.dtype = torch.float16,
) -> QuantizedWeight:
    """Textbook GPTQ in fp64: one column at a time, the full inverse Hessian of the not-yet-quantized columns
    recomputed after each column by the Optimal Brain Surgeon downdate; no Cholesky, no blocks.

    Codes and group parameters use the same fp32 arithmetic as RTN."""
    rtn = QuantizedWeight.quantize(w, precision, group_size, scale_dtype)
    rows, cols = w.shape
    wk = w.to(torch.float64).clone()
    hk = h.to(torch.float64).clone()
    dead = [j for j in range(cols) if hk[j, j] == 0]
    for j in dead:
        hk[j, :] = 0
        hk[:, j] = 0
        hk[j, j] = 1
    hk += damp * hk.diagonal().mean() * torch.eye(cols, dtype=torch.float64)
    order = torch.argsort(hk.diagonal(), descending=True, stable=True).tolist() if act_order else list(range(cols))
    hinv = torch.linalg.inv(hk)
    scale, zero = rtn.scale.clone(), None if rtn.zero is None else rtn.zero.clone()
    codes = torch.zeros((rows, cols), dtype=torch.float32)
    remaining = list(order)
    for j in order:
        remaining.remove(j)
        col = wk[:, j].to(torch.float32)
        if zero is None:
            lo, hi = (-128, 127) if precision == "int8" else (-8, 7)
            s = scale[:, 0].to(torch.float32)
            c = torch.round(col / s).clamp(lo, hi)
            deq = c * s
        else:
            g = j // group_size
            if not act_order and j % group_size == 0:  # group parameters from the current weights
                _, s16, z8 = quantize_int4(wk[:, j : j + group_size].to(torch.float32), group_size, scale_dtype)
                scale[:, g], zero[:, g] = s16[:, 0], z8[:, 0]
            s, z = scale[:, g].to(torch.float32), zero[:, g].to(torch.float32)
            c = (torch.round(col / s) + z).clamp(0, 15)
            deq = (c - z) * s
        codes[:, j] = c
        d = hinv[j, j]
        err = (wk[:, j] - deq.to(torch.float64)) / d
        wk[:, remaining] -= torch.outer(err, hinv[j, remaining])
        hinv = hinv - torch.outer(hinv[:, j], hinv[j, :]) / d  # OBS: inverse Hessian without column j
    codes_t = codes.to(torch.int8)
    if zero is not None:
        codes_t = codes_t.view(torch.uint8)
    return QuantizedWeight(Precision.parse(precision), codes_t, scale, zero, group_size)


def _with_fallback(w: torch.Tensor, h: torch.Tensor, q: QuantizedWeight) -> QuantizedWeight:
    rtn = QuantizedWeight.quantize(w, q.precision, q.group_size, q.scale.dtype)
    return rtn if proxy_loss(w, rtn.dequantize(), h) < proxy_loss(w, q.dequantize(), h) else q


def _same_or_equal_loss(a: QuantizedWeight, b: QuantizedWeight, w: torch.Tensor, h: torch.Tensor) -> None:
    if torch.equal(a.codes, b.codes) and torch.equal(a.scale, b.scale):
        return
    la, lb = proxy_loss(w, a.dequantize(), h), proxy_loss(w, b.dequantize(), h)
    assert la == pytest.approx(lb, rel=1e-6, abs=1e-12)


def _random_case(seed: int) -> tuple[torch.Tensor, torch.Tensor, str, int | None, bool]:
    """W [3..8, 4..16], H = 2/m X^T X from X [m, in] (m may be below in: singular before dampening; sometimes a
    dead input), a format and act_order, all from ``seed``."""
    g = _gen(seed)
    rows, cols = int(torch.randint(3, 9, (), generator=g)), int(torch.randint(4, 17, (), generator=g))
    m = int(torch.randint(2, 2 * cols, (), generator=g))
    w = torch.randn(rows, cols, generator=g)
    x = torch.randn(m, cols, generator=g) @ torch.randn(cols, cols, generator=g)
    if seed % 3 == 0:
        x[:, int(torch.randint(0, cols, (), generator=g))] = 0.0
    precision, group_size = [("int8", None), ("int4", None), ("int4", 2), ("int4", 3), ("int4", 4)][seed % 5]
    return w, _hessian(x), precision, group_size, bool(seed // 5 % 2)


@pytest.mark.parametrize("seed", range(40))
def test_matches_unblocked_reference(seed: int) -> None:
    w, h, precision, group_size, act_order = _random_case(seed)
    ref = _reference_gptq(w, h, precision, group_size, act_order=act_order)
    ref_final = _with_fallback(w, h, ref)
    rtn = QuantizedWeight.quantize(w, precision, group_size)
    for block_size in (1, 2, 3, 128):
        raw = _gptq(w, h.to(torch.float64), rtn, block_size, 0.01, act_order)
        _same_or_equal_loss(raw, ref, w, h)
        out = gptq_quantize(w, h, precision, group_size, block_size=block_size, act_order=act_order)
        _same_or_equal_loss(out, ref_final, w, h)


@pytest.mark.parametrize("seed", range(6))
def test_exhaustive_search_bounds_gptq(seed: int) -> None:
    """1 row, 4 columns, INT4 per-channel with RTN's scale: optimum <= GPTQ <= RTN on the proxy loss."""
    g = _gen(100 + seed)
    w = torch.randn(1, 4, generator=g)
    h = _hessian(torch.randn(16, 4, generator=g) @ torch.randn(4, 4, generator=g))
    rtn = QuantizedWeight.quantize(w, "int4")
    s = rtn.scale.to(torch.float64)[0, 0]
    every = torch.tensor(list(itertools.product(range(-8, 8), repeat=4)), dtype=torch.float64)  # [65536, 4]
    d = w.to(torch.float64) - every * s
    optimum = float(((d @ h.to(torch.float64)) * d).sum(1).min())
    q = gptq_quantize(w, h, "int4")
    assert torch.equal(q.scale, rtn.scale)
    loss_gptq, loss_rtn = proxy_loss(w, q.dequantize(), h), proxy_loss(w, rtn.dequantize(), h)
    assert optimum <= loss_gptq * (1 + 1e-9) and loss_gptq <= loss_rtn


# ------------------------------------------------------------------------------------------ equal to RTN


@pytest.mark.parametrize("precision,group_size", FORMATS + [("int4", 24), ("int4", 1)])
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("scale_dtype", [torch.float16, torch.bfloat16])
def test_identity_hessian_equals_rtn(precision: str, group_size: int | None, act_order: bool, scale_dtype) -> None:
    w = torch.randn(7, 24, generator=_gen(1)) * 0.05
    w[2, 5] = 0.9  # an outlier
    rtn = QuantizedWeight.quantize(w, precision, group_size, scale_dtype)
    raw = _gptq(w, torch.eye(24, dtype=torch.float64), rtn, 5, 0.01, act_order)  # no fallback
    _assert_same(raw, rtn)
    _assert_same(gptq_quantize(w, torch.eye(24), precision, group_size, scale_dtype, act_order=act_order), rtn)


@pytest.mark.parametrize("precision,group_size", FORMATS)
def test_diagonal_hessian_equals_rtn_with_act_order(precision: str, group_size: int | None) -> None:
    """A diagonal H couples no columns, so GPTQ is RTN; with act_order the sweep is a real permutation."""
    g = _gen(2)
    w = torch.randn(5, 20, generator=g).to(torch.bfloat16)
    h = torch.diag(torch.rand(20, generator=g) + 0.1)
    rtn = QuantizedWeight.quantize(w, precision, group_size)
    for act_order in (False, True):
        _assert_same(_gptq(w, h.to(torch.float64), rtn, 3, 0.01, act_order), rtn)


def test_dead_inputs_are_quantized_as_rtn() -> None:
    g = _gen(3)
    w = torch.randn(6, 10, generator=g)
    x = torch.randn(40, 10, generator=g) @ torch.randn(10, 10, generator=g)
    x[:, [2, 7]] = 0.0
    h = _hessian(x)
    rtn = QuantizedWeight.quantize(w, "int4")
    for act_order in (False, True):
        q = _gptq(w, h.to(torch.float64), rtn, 4, 0.01, act_order)
        assert torch.equal(q.codes[:, [2, 7]], rtn.codes[:, [2, 7]])
        assert not torch.equal(q.codes, rtn.codes)  # the live columns do use the Hessian


# ------------------------------------------------------------------------------------------ properties


@HYP
@given(
    seed=st.integers(0, 2**31),
    rows=st.integers(1, 8),
    cols=st.integers(1, 24),
    samples=st.integers(1, 40),
    fmt=st.sampled_from(FORMATS + [("int4", 3)]),
    act_order=st.booleans(),
    block_size=st.integers(1, 9),
    scale_dtype=st.sampled_from([torch.float16, torch.bfloat16]),
)
def test_never_worse_than_rtn_and_same_format(
    seed: int, rows: int, cols: int, samples: int, fmt, act_order: bool, block_size: int, scale_dtype
) -> None:
    precision, group_size = fmt
    g = _gen(seed)
    w = torch.randn(rows, cols, generator=g) * float(torch.rand((), generator=g) * 2)
    x = torch.randn(samples, cols, generator=g) @ torch.randn(cols, cols, generator=g)
    x[:, 0] *= 30.0  # an outlier input channel
    h = _hessian(x)
    rtn = QuantizedWeight.quantize(w, precision, group_size, scale_dtype)
    q = gptq_quantize(w, h, precision, group_size, scale_dtype, block_size=block_size, act_order=act_order)

    e_q, e_rtn = _output_error(x, w, q), _output_error(x, w, rtn)
    assert e_q <= e_rtn * (1 + 1e-6) + 1e-12

    # RTN's format exactly: dtypes, shapes, ranges, byte counts
    assert q.precision is rtn.precision and q.group_size == rtn.group_size
    assert q.codes.dtype == rtn.codes.dtype and q.codes.shape == rtn.codes.shape
    assert q.scale.dtype == scale_dtype and q.scale.shape == rtn.scale.shape
    assert bool(torch.isfinite(q.scale).all()) and bool((q.scale > 0).all())
    lo, hi = {("int8", False): (-128, 127), ("int4", False): (-8, 7), ("int4", True): (0, 15)}[
        (precision, group_size is not None)
    ]
    assert int(q.codes.min()) >= lo and int(q.codes.max()) <= hi
    if group_size is None:
        assert q.zero is None and torch.equal(q.scale, rtn.scale)  # per-channel scales are RTN's
    else:
        assert q.zero.dtype == torch.uint8 and q.zero.shape == rtn.zero.shape and int(q.zero.max()) <= 15
    assert q.storage_nbytes() == rtn.storage_nbytes()

    back = QuantizedWeight.from_compressed_tensors(q.compressed_tensors(), group_size, q.precision)
    _assert_same(back, q)
    assert torch.equal(back.dequantize(), q.dequantize())


# ------------------------------------------------------------------------------------------ realistic layer


def test_realistic_layer_beats_rtn_clearly() -> None:
    """W [64, 256] on correlated activations with a few outlier channels: GPTQ clearly lowers the output error."""
    g = _gen(4)
    w = torch.randn(64, 256, generator=g) * 0.02
    mix = torch.randn(256, 256, generator=g) / 16.0
    x = torch.randn(512, 256, generator=g) @ mix  # [512, 256] correlated
    x[:, [3, 77, 190]] *= 25.0  # large-magnitude outlier channels
    h = _hessian(x)
    ratios = {}
    for group_size in (None, 64):
        rtn = QuantizedWeight.quantize(w, "int4", group_size)
        for act_order in (False, True):
            q = gptq_quantize(w, h, "int4", group_size, act_order=act_order)
            ratios[(group_size, act_order)] = _output_error(x, w, q) / _output_error(x, w, rtn)
    print("GPTQ/RTN output error (group_size, act_order):", {k: round(v, 3) for k, v in ratios.items()})
    assert all(r < 0.9 for r in ratios.values()), ratios


# ------------------------------------------------------------------------------------------ accumulator


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_accumulator_chunks_equal_all_at_once(dtype) -> None:
    g = _gen(5)
    x = torch.randn(3, 50, 12, generator=g, dtype=torch.float64)  # [batch, tokens, in]
    acc = HessianAccumulator(12, dtype=dtype)
    assert acc.n_samples == 0 and acc.in_features == 12
    acc.add(x[0])  # 2-D
    acc.add(x[1:, :17])  # 3-D, uneven chunk sizes
    acc.add(x[1:, 17:].to(torch.float32))
    acc.add(x[:, :0])  # no rows
    given = x.clone()
    given[1:, 17:] = x[1:, 17:].to(torch.float32).to(torch.float64)  # what the accumulator was handed
    flat = given.reshape(-1, 12)
    assert acc.n_samples == 150
    h = acc.hessian()
    assert h.shape == (12, 12) and h.dtype == dtype
    # 150 products per entry summed in the accumulator's dtype in any blocking, + 1 for the 2/n scaling, + 2 for
    # rounding float64 activations into an fp32 accumulator
    tol = dot_noise(dtype, 153, 2.0 / 150 * flat.abs().T @ flat.abs())
    assert bool(((h.to(torch.float64) - 2.0 / 150 * flat.T @ flat).abs() <= tol).all())

    half = HessianAccumulator(12)
    half.add(x.to(torch.bfloat16))  # any float dtype
    expect = x.to(torch.bfloat16).to(torch.float64).reshape(-1, 12)
    tol = dot_noise(torch.float32, 151, 2.0 / 150 * expect.abs().T @ expect.abs())  # bf16 values are exact in fp32
    assert bool(((half.hessian().to(torch.float64) - 2.0 / 150 * expect.T @ expect).abs() <= tol).all())


def test_accumulator_rejects_bad_input() -> None:
    acc = HessianAccumulator(4)
    with pytest.raises(ValueError, match="no activations"):
        acc.hessian()
    with pytest.raises(ValueError, match=r"\[\.\.\., 4\]"):
        acc.add(torch.zeros(3, 5))
    with pytest.raises(ValueError, match="floating"):
        acc.add(torch.zeros(3, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="in_features"):
        HessianAccumulator(0)


# ------------------------------------------------------------------------------------------ validation


def test_rejects_bad_arguments() -> None:
    w, h = torch.randn(3, 8), torch.eye(8)
    with pytest.raises(ValueError, match="int8, int4"):
        gptq_quantize(w, h, "fp16")
    with pytest.raises(ValueError, match="group_size"):
        gptq_quantize(w, h, "int8", 4)
    with pytest.raises(ValueError, match=r"\[8, 8\].*\(3, 8\).*\(7, 7\)"):
        gptq_quantize(w, torch.eye(7), "int4")
    with pytest.raises(ValueError, match="2-D"):
        gptq_quantize(torch.randn(8), h, "int4")
    with pytest.raises(ValueError, match="block_size"):
        gptq_quantize(w, h, "int4", block_size=0)
    with pytest.raises(ValueError, match="damp"):
        gptq_quantize(w, h, "int4", damp=-0.1)
    with pytest.raises(ValueError, match="non-finite"):
        gptq_quantize(w, torch.full((8, 8), math.nan), "int4")
    with pytest.raises(ValueError, match="positive definite"):
        gptq_quantize(w, -torch.eye(8), "int4", damp=0.0)
