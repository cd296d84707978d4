"""Token embedding and LM head at INT8 / INT4, tied and untied: the packed embedding module, the artifact's bytes,
and logits against the exact dequantized reference in lsaq's runtime and (where it loads) stock transformers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import PROMPT, logit_noise, tiny_llama_dir, tiny_plan
from safetensors import safe_open
from torch import nn

from lsaq.models.loading import load_model
from lsaq.planning.memory import WeightPolicy, weight_tensor_bytes
from lsaq.planning.planner import Plan
from lsaq.precision import Precision
from lsaq.quantization.artifact import PLAN, WEIGHTS
from lsaq.quantization.reader import load_quantized
from lsaq.quantization.primitives import QuantizedWeight
from lsaq.quantization.qembedding import QuantizedEmbedding
from lsaq.quantization.qlinear import Int4Linear, Int8Linear
from lsaq.quantization.record import STOCK_RUNTIME
from lsaq.quantization.stage import quantize

FP16, INT8, INT4 = Precision.FP16, Precision.INT8, Precision.INT4
KINDS = {"int8": (INT8, None), "int4": (INT4, None), "int4-g16": (INT4, 16)}


# ------------------------------------------------------------------------------------- QuantizedEmbedding


def _table(vocab: int = 50, hidden: int = 40, seed: int = 0) -> torch.Tensor:
    w = torch.randn(vocab, hidden, generator=torch.Generator().manual_seed(seed))
    w[3] = 0.0  # an all-zero row
    w[7] *= 100.0  # a row on another scale: its own scale
    return w


@pytest.mark.parametrize("scale_dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", KINDS)
def test_lookup_equals_the_dequantized_rows(kind: str, scale_dtype: torch.dtype) -> None:
    precision, group = KINDS[kind]
    qw = QuantizedWeight.quantize(_table(), precision, group, scale_dtype)
    emb = QuantizedEmbedding(qw, dtype=torch.float32)
    full = qw.dequantize(torch.float32)  # [50, 40]
    ids = torch.tensor([[0, 7, 3, 49, 7], [1, 2, 8, 9, 48]])  # 48, 49: the last, short zero-point word
    out = emb(ids)
    assert out.shape == (2, 5, 40) and out.dtype == torch.float32
    assert torch.equal(out, full[ids])
    assert torch.equal(emb.dequantized_weight(), full)
    assert torch.equal(out[0, 2], torch.zeros(40))
    # the output dtype follows .to(), like an nn.Embedding's weight; values are the same rows rounded once
    emb.to(torch.bfloat16)
    assert torch.equal(emb(ids), full[ids].to(torch.bfloat16))
    back = emb.to_quantized_weight()
    assert torch.equal(back.codes, qw.codes) and (back.zero is None) == (qw.zero is None)
    assert back.zero is None or torch.equal(back.zero, qw.zero)


@pytest.mark.parametrize("kind", KINDS)
def test_resident_bytes_are_the_stored_bytes(kind: str) -> None:
    precision, group = KINDS[kind]
    qw = QuantizedWeight.quantize(_table(), precision, group, torch.bfloat16)
    emb = QuantizedEmbedding(qw)
    assert emb.resident_bytes == qw.storage_nbytes()
    assert not list(emb.parameters())
    assert not any(b.is_floating_point() and b.numel() >= 50 * 40 // 8 for b in emb.buffers())


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_compressed_tensors_decodes_the_embedding_like_our_lookup(kind: str) -> None:
    """compressed-tensors' own decompression of the stored embedding tensors equals every row we look up (bf16)."""
    from compressed_tensors.compressors.naive_quantized.base import NaiveQuantizationCompressor
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    precision, _ = KINDS[kind]
    qw = QuantizedWeight.quantize(_table(), precision, None, torch.bfloat16)
    scheme = QuantizationScheme(targets=["Embedding"], weights=QuantizationArgs(
        num_bits=precision.bits, type="int", symmetric=True, strategy="channel"))
    compressor = NaiveQuantizationCompressor if kind == "int8" else PackedQuantizationCompressor
    want = compressor.decompress(dict(qw.compressed_tensors(pack_int8=False)), scheme)["weight"]
    emb = QuantizedEmbedding(qw, dtype=torch.bfloat16)
    assert want.dtype == torch.bfloat16 and torch.equal(emb(torch.arange(50)), want)


def test_gemma3_embed_scale_is_kept() -> None:
    from transformers.models.gemma3.modeling_gemma3 import Gemma3TextScaledWordEmbedding

    float_emb = Gemma3TextScaledWordEmbedding(50, 40, padding_idx=0, embed_scale=40**0.5)
    qw = QuantizedWeight.quantize(float_emb.weight.detach(), INT8, None, torch.bfloat16)
    with torch.no_grad():
        float_emb.weight.copy_(qw.dequantize(torch.float32))
    emb = QuantizedEmbedding.from_quantized(qw, torch.float32, like=float_emb)
    ids = torch.tensor([[4, 0, 49]])
    assert emb.padding_idx == 0 and torch.equal(emb(ids), float_emb(ids))


def test_bad_embedding_arguments() -> None:
    qw = QuantizedWeight.quantize(_table(), INT8)
    with pytest.raises(ValueError, match="float dtype"):
        QuantizedEmbedding(qw, dtype=torch.int8)
    with pytest.raises(ValueError, match="fp16 or bf16"):
        QuantizedEmbedding(QuantizedWeight(INT8, qw.codes, qw.scale.float()))


# ------------------------------------------------------------------------------------ artifacts, end to end

# (tied, embedding, head, INT4 group size); decoder layers are INT8 / FP16 / INT4 in every case
CASES = [
    (False, INT8, FP16, None),
    (False, FP16, INT4, None),
    (False, INT8, INT4, None),
    (False, INT4, INT8, 16),  # group-wise INT4 embedding (and layer 2): lsaq's runtime only
    (True, INT8, INT8, None),
    (True, INT4, INT4, None),  # INT4 embedding: lsaq's runtime only
    (True, FP16, INT8, None),
    (True, INT8, FP16, None),
]


def _case_id(case) -> str:
    tied, embed, head, group = case
    return f"{'tied' if tied else 'untied'}-{embed.value}-{head.value}" + (f"-g{group}" if group else "")


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[bool, Path]:
    root = tmp_path_factory.mktemp("embed-head")
    return {tied: tiny_llama_dir(root / ("tied" if tied else "untied"), tied=tied, head_gain=20.0)
            for tied in (False, True)}


def dequantized_reference(path: Path) -> nn.Module:
    """A float32 model holding exactly the artifact's weights: every quantized tensor set dequantized with the
    primitives (checked against compressed-tensors' own decoding in test_quant), every float tensor as stored."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path)
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    group_size = Plan.load(path / PLAN).options.policy.group_size
    state = {}
    with safe_open(path / WEIGHTS, framework="pt") as f:
        modules: dict[str, dict[str, torch.Tensor]] = {}
        for name in f.keys():
            module, _, suffix = name.rpartition(".")
            modules.setdefault(module, {})[suffix] = f.get_tensor(name)
    for module, tensors in modules.items():
        if "weight_scale" not in tensors:
            state.update({f"{module}.{s}": t.float() for s, t in tensors.items()})
            continue
        bias = tensors.pop("bias", None)
        group = group_size if "weight_zero_point" in tensors else None
        state[f"{module}.weight"] = QuantizedWeight.from_compressed_tensors(tensors, group).dequantize(torch.float32)
        if bias is not None:
            state[f"{module}.bias"] = bias.float()
    result = model.load_state_dict(state, strict=False)
    assert not result.unexpected_keys
    assert result.missing_keys in ([], ["lm_head.weight"]) and (not result.missing_keys or config.tie_word_embeddings)
    model.tie_weights()
    return model


def _stored_bytes(path: Path) -> dict[str, int]:
    with safe_open(path / WEIGHTS, framework="pt") as f:
        return {k: f.get_tensor(k).nbytes for k in f.keys()}


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_embedding_and_head_artifact(case, sources, tmp_path) -> None:
    from transformers import AutoModelForCausalLM

    tied, embed, head, group = case
    src = sources[tied]
    info = load_model(src).info
    plan = tiny_plan(info, [INT8, FP16, INT4], WeightPolicy(group_size=group, embed=embed, head=head))
    art = quantize(plan, tmp_path / "art", model=str(src))

    # bytes: every stored tensor is what the byte model predicted, both matrices counted once untied
    predicted = weight_tensor_bytes(plan.shape, plan.precisions, plan.options.policy)
    assert _stored_bytes(art.path) == predicted
    assert art.tensor_bytes == art.predicted_tensor_bytes == plan.breakdown.weights == sum(predicted.values())
    assert (plan.breakdown.lm_head > 0) == (not tied or embed is not FP16 or head is not FP16)
    config = json.loads((art.path / "config.json").read_text())
    assert config["tie_word_embeddings"] is False  # untied source, or untied because a side is quantized
    qc = config["quantization_config"]
    targets = [t for g in qc["config_groups"].values() for t in g["targets"]]
    assert ("re:^model\\.embed_tokens$" in targets) == (embed is not FP16)
    assert ("re:^lm_head$" in targets) == (head is not FP16) and ("lm_head" in qc["ignore"]) == (head is FP16)

    reference = dequantized_reference(art.path)
    ids = load_model(src).tokenizer(PROMPT + ", and more text", return_tensors="pt")
    with torch.inference_mode():
        want = reference(**ids).logits
    scale = float(want.abs().max())

    # lsaq's runtime: packed modules where quantized; the fp32 dequantize path is exact, the bf16 kernels close
    ours = load_quantized(art.path, dtype=torch.float32)
    emb_module, head_module = ours.model.get_input_embeddings(), ours.model.get_output_embeddings()
    assert isinstance(emb_module, QuantizedEmbedding) == (embed is not FP16)
    assert isinstance(head_module, (Int8Linear, Int4Linear)) == (head is not FP16)
    if embed is not FP16:
        assert emb_module.resident_bytes == sum(n for k, n in predicted.items()
                                                if k.startswith("model.embed_tokens.") and not k.endswith("_shape"))
    with torch.inference_mode():
        for m in ours.model.modules():
            if hasattr(m, "path"):
                m.path = "dequant"
        exact = ours.model(**ids).logits
        fast = load_quantized(art.path)  # bf16 activations, packed kernels
        approx = fast.model(**ids).logits.float()
    tol = logit_noise(torch.float32, scale, 3 * 128)  # fp32 rounding over 3 layers x 128-term dot products
    assert torch.allclose(exact, want, rtol=0, atol=tol), (exact - want).abs().max()
    assert float((approx - want).abs().max()) < 0.05 * scale

    # stock transformers + compressed-tensors, where the format can express it
    if STOCK_RUNTIME in art.runtimes:
        stock = AutoModelForCausalLM.from_pretrained(art.path, dtype=torch.float32).eval()
        with torch.inference_mode():
            got = stock(**ids).logits
        assert torch.allclose(got, want, rtol=0, atol=tol), (got - want).abs().max()
    else:
        assert embed is INT4 or group is not None
        with pytest.raises((AttributeError, RuntimeError)):  # see runtimes_for_plan; fails loudly, never silently
            AutoModelForCausalLM.from_pretrained(art.path, dtype=torch.float32)
