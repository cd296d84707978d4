"""lsaq codes as ggml blocks: Q8_0 and Q4_0 exact, Q4_1 exact where float16 holds the minimum, rows in llama.cpp's
q/k order."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lsaq.planning.ggml import GgmlType, row_bytes
from lsaq.quantization.ggml_codes import code_type, encode_codes, permute_rope, permute_rope_rows
from lsaq.quantization.primitives import QuantizedWeight

gguf = pytest.importorskip("gguf")


def ggml_values(kind: GgmlType, data: np.ndarray) -> np.ndarray:
    """What llama.cpp reads from the blocks (the gguf package's dequantizer, float32)."""
    return gguf.dequantize(data, gguf.GGMLQuantizationType(int(kind)))


def weight(seed: int, rows: int, cols: int, magnitude: float) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * magnitude
    w[0, :5] = 0.0  # exact zeros, a row's edge values
    return w


FORMATS = [("int8", None, GgmlType.Q8_0), ("int4", None, GgmlType.Q4_0), ("int4", 32, GgmlType.Q4_1),
           ("int4", 64, GgmlType.Q4_1), ("int4", 128, GgmlType.Q4_1)]


@pytest.mark.parametrize("precision,group,kind", FORMATS)
def test_types_and_bytes(precision, group, kind):
    qw = QuantizedWeight.quantize(weight(0, 8, 256, 1.0), precision, group)
    got, data = encode_codes(qw)
    assert got is kind == code_type(qw)
    assert data.dtype == np.uint8 and data.shape == (8, row_bytes(kind, 256))


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**16), rows=st.integers(1, 9), blocks=st.integers(1, 6),
       magnitude=st.sampled_from([1e-3, 0.05, 1.0, 40.0]), precision=st.sampled_from(["int8", "int4"]),
       scale_dtype=st.sampled_from([torch.float16, torch.bfloat16]))
def test_q8_0_and_q4_0_hold_per_channel_codes_exactly(seed, rows, blocks, magnitude, precision, scale_dtype):
    qw = QuantizedWeight.quantize(weight(seed, rows, 32 * blocks, magnitude), precision, None, scale_dtype)
    kind, data = encode_codes(qw)
    # every value bit for bit what lsaq's own dequantization gives (code * scale in float32)
    np.testing.assert_array_equal(ggml_values(kind, data), qw.dequantize(torch.float32).numpy())


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**16), rows=st.integers(1, 9), groups=st.integers(1, 4),
       group=st.sampled_from([32, 64, 128]), magnitude=st.sampled_from([1e-3, 0.05, 1.0, 40.0]),
       scale_dtype=st.sampled_from([torch.float16, torch.bfloat16]))
def test_q4_1_holds_group_codes_where_float16_holds_the_minimum(seed, rows, groups, group, magnitude, scale_dtype):
    qw = QuantizedWeight.quantize(weight(seed, rows, group * groups, magnitude), "int4", group, scale_dtype)
    kind, data = encode_codes(qw)
    got, want = ggml_values(kind, data), qw.dequantize(torch.float32).numpy()
    # m = -zero * scale per group: exact when float16 holds it, else rounded to the nearest float16
    m = (-qw.zero.float() * qw.scale.float()).repeat_interleave(group, dim=1).numpy()
    m16 = m.astype(np.float16).astype(np.float32)
    exact = m16 == m
    np.testing.assert_array_equal(got[exact], want[exact])
    # rounding m moves a value by at most half a float16 step of m (plus float32 rounding of d * q + m)
    bound = np.abs(m16 - m) + np.spacing(np.abs(want).astype(np.float32))
    assert np.all(np.abs(got - want) <= bound)


def test_q4_1_error_is_a_tiny_fraction_of_a_step():
    qw = QuantizedWeight.quantize(weight(1, 64, 512, 1.0), "int4", 32, torch.float16)
    kind, data = encode_codes(qw)
    err = np.abs(ggml_values(kind, data) - qw.dequantize(torch.float32).numpy()).reshape(64, 16, 32).max(-1)
    assert np.all(err <= qw.scale.float().numpy() * 2**-7)  # half a float16 step of |m| < 16 * scale
    # bfloat16 scales (8 significant bits) times a 4-bit zero mostly fit float16's 11: most groups exact
    qw = QuantizedWeight.quantize(weight(1, 64, 512, 1.0), "int4", 32, torch.bfloat16)
    kind, data = encode_codes(qw)
    same = (ggml_values(kind, data) == qw.dequantize(torch.float32).numpy()).reshape(64, 16, 32).all(-1)
    assert same.mean() > 0.9


@pytest.mark.parametrize("precision,group,cols,message", [
    ("int8", None, 48, "not whole blocks of 32"),
    ("int4", 16, 64, "groups of 16 are not whole blocks"),
    ("int4", 48, 96, "groups of 48 are not whole blocks"),
])
def test_formats_without_a_ggml_block_are_refused(precision, group, cols, message):
    qw = QuantizedWeight.quantize(weight(0, 4, cols, 1.0), precision, group)
    with pytest.raises(ValueError, match=message):
        encode_codes(qw)


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (8, 1)])
def test_rope_rows_are_what_transformers_gguf_loader_undoes(heads, kv_heads):
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    head_dim, hidden = 8, 32
    undo = LlamaTensorProcessor(config={"num_attention_heads": heads, "num_key_value_heads": kv_heads})
    for name, n in [("blk.0.attn_q.weight", heads), ("blk.0.attn_k.weight", kv_heads)]:
        w = torch.randn(n * head_dim, hidden)
        stored = permute_rope_rows(w, n).numpy()
        np.testing.assert_array_equal(undo.process(stored, name).weights, w.numpy())


def test_rope_permutation_moves_codes_with_their_scales():
    w = weight(3, 4 * 16, 64, 1.0)
    for group in (None, 32):
        qw = QuantizedWeight.quantize(w, "int4", group)
        moved = permute_rope(qw, heads=4)
        np.testing.assert_array_equal(moved.dequantize().numpy(), permute_rope_rows(qw.dequantize(), 4).numpy())
