"""The byte model, model shapes and size units: hand-computed counts, published sizes, HF module names."""

from __future__ import annotations

import json
from importlib import resources

import pytest

from lsaq.models.families import SUPPORTED_MODEL_TYPES, model_shape
from lsaq.planning.memory import (
    WeightPolicy,
    average_bits,
    kv_cache_bytes,
    layer_linear_bytes,
    linear_tensor_bytes,
    memory_breakdown,
    weight_tensor_bytes,
    workspace_bytes,
)
from lsaq.precision import Precision
from lsaq.units import format_bytes, parse_bytes

FP16, INT8, INT4 = Precision.FP16, Precision.INT8, Precision.INT4

# hidden 64, 4 heads of 16, 2 KV heads, MLP 96, 2 layers, vocab 100, untied.
SMALL = {
    "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 96,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 100,
    "tie_word_embeddings": False,
}


def shipped(name: str) -> dict:
    return json.loads(resources.files("lsaq").joinpath(f"data/configs/{name}.json").read_text())


# ---------------------------------------------------------------------------------------- per tensor


def test_linear_tensor_bytes_formulas():
    assert linear_tensor_bytes(5, 9, FP16) == {"weight": 90}
    assert linear_tensor_bytes(5, 9, FP16, bias=True) == {"weight": 90, "bias": 10}
    assert linear_tensor_bytes(5, 9, INT8) == {"weight_packed": 5 * 3 * 4, "weight_scale": 10, "weight_shape": 16}
    assert linear_tensor_bytes(5, 9, INT8, int8_packed=False) == {"weight": 45, "weight_scale": 10}
    assert linear_tensor_bytes(5, 9, INT8, group_size=4) == linear_tensor_bytes(5, 9, INT8)  # INT8: per-channel
    # ceil(9/8) = 2 int32 words per row
    assert linear_tensor_bytes(5, 9, INT4) == {"weight_packed": 40, "weight_scale": 10, "weight_shape": 16}
    # groups of 4: ceil(9/4) = 3 scales per row; zero points packed 8 rows per int32: ceil(5/8) * 3 * 4
    assert linear_tensor_bytes(5, 9, INT4, group_size=4, bias=True) == {
        "weight_packed": 40, "weight_scale": 30, "weight_zero_point": 12, "weight_shape": 16, "bias": 10,
    }


@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_bad_group_size(bad):
    with pytest.raises(ValueError, match="group size"):
        linear_tensor_bytes(8, 8, INT4, group_size=bad)


def test_unknown_precision_lists_valid():
    with pytest.raises(ValueError, match="fp16, int8, int4"):
        linear_tensor_bytes(8, 8, "int3")


# ------------------------------------------------------------------------------------ hand-computed


def test_small_config_by_hand():
    s = model_shape(SMALL)
    assert s.head_dim == 16 and s.num_kv_heads == 2 and not s.tied
    # q,o [64,64]; k,v [32,64]; gate,up [96,64]; down [64,96]: 30720 weights per layer
    assert s.linear_params_per_layer == 30720
    assert layer_linear_bytes(s, FP16) == 61440
    # one byte per code in 8-bit words, scales, 7 shape tensors
    assert layer_linear_bytes(s, INT8) == 30720 + 2 * (64 + 32 + 32 + 64 + 96 + 96 + 64) + 7 * 16  # 31728
    # packed 15360 + scales 896 + 7 shape tensors
    assert layer_linear_bytes(s, INT4) == 15360 + 896 + 7 * 16
    # group 32: scales 1920, zero points 480
    assert layer_linear_bytes(s, INT4, 32) == 15360 + 1920 + 480 + 112
    bd = memory_breakdown(s, [FP16, INT4], WeightPolicy(), context=10, batch=3, reserve=1000)
    assert bd.layers == (61440 + 256, 16368 + 256)
    assert (bd.layer_norms, bd.embeddings, bd.lm_head, bd.final_norm) == (512, 12800, 12800, 128)
    assert bd.weights == 61440 + 16368 + 512 + 12800 + 12800 + 128
    assert bd.kv_cache == 2 * 2 * 2 * 16 * 10 * 3 * 2 == 7680
    # per token 4*64 + (4+2*2)*16 + 3*96 = 672; logits 8*3*100; largest linear 96*64 in fp16
    assert bd.workspace == 2 * 3 * 10 * 672 + 2400 + 12288
    assert bd.total == bd.weights + 7680 + bd.workspace + 1000
    assert s.num_params == 2 * (30720 + 128) + 2 * 6400 + 64


def test_embedding_policy_and_tied_head():
    s = model_shape(SMALL)
    bd = memory_breakdown(s, [FP16, FP16], WeightPolicy(embed=INT8), context=1, batch=1)
    # the embedding's INT8 codes plain, the head's (a linear) in 8-bit words with its shape tensor
    assert (bd.embeddings, bd.lm_head) == (6400 + 200, 6400 + 200 + 16)
    bd = memory_breakdown(s, [FP16, FP16], WeightPolicy(embed=INT8, head=FP16), context=1, batch=1)
    assert (bd.embeddings, bd.lm_head) == (6600, 12800)
    tied = model_shape({**SMALL, "tie_word_embeddings": True})
    bd = memory_breakdown(tied, [FP16, FP16], WeightPolicy(), context=1, batch=1)
    assert (bd.embeddings, bd.lm_head) == (12800, 0)  # stored and counted once
    assert not WeightPolicy().unties(tied) and not WeightPolicy(embed=INT8).unties(s)


def test_quantized_embedding_or_head_unties_a_tied_model():
    """A tied head gets its own matrix once either side is quantized: both are stored, both are counted."""
    tied = model_shape({**SMALL, "tie_word_embeddings": True})
    cases = {  # policy -> (embedding bytes, head bytes)
        WeightPolicy(embed=INT8): (6400 + 200, 6400 + 200 + 16),
        WeightPolicy(embed=FP16, head=INT8): (12800, 6616),
        WeightPolicy(embed=INT8, head=FP16): (6600, 12800),
        WeightPolicy(embed=INT4): (100 * 8 * 4 + 200 + 16,) * 2,
        # group-wise INT4 applies to both: packed 100 x 8 words, scales [100, 2], zero points [13, 2] words, shape
        WeightPolicy(group_size=32, embed=INT4, head=INT8): (3200 + 400 + 104 + 16, 6616),
    }
    for policy, (embed, head) in cases.items():
        assert policy.unties(tied)
        bd = memory_breakdown(tied, [FP16, FP16], policy, context=1, batch=1)
        assert (bd.embeddings, bd.lm_head) == (embed, head), policy
        tensors = weight_tensor_bytes(tied, [FP16, FP16], policy)
        assert sum(v for k, v in tensors.items() if k.startswith("lm_head.")) == head, policy
        assert sum(v for k, v in tensors.items() if k.startswith("model.embed_tokens.")) == embed, policy
        assert sum(tensors.values()) == bd.weights
    tensors = weight_tensor_bytes(tied, [FP16, FP16], WeightPolicy(embed=INT4))
    assert {k for k in tensors if k.startswith("lm_head.")} == {
        "lm_head.weight_packed", "lm_head.weight_scale", "lm_head.weight_shape"}
    # all_weights divides by the model's parameters (tied head once), so untying shows as more bits
    fp16_tied = average_bits(tied, [FP16, FP16], WeightPolicy())["all_weights"]
    assert fp16_tied == 16.0 and average_bits(tied, [FP16, FP16], WeightPolicy(embed=INT8))["all_weights"] > 16.0


@pytest.mark.parametrize("field", ["embed", "head"])
def test_unknown_embedding_policy_lists_valid(field):
    with pytest.raises(ValueError, match="'int3'.*fp16, int8, int4"):
        WeightPolicy(**{field: "int3"})


def test_per_tensor_breakdown_sums_to_weights_and_names():
    s = model_shape({**SMALL, "attention_bias": True})
    precisions = [INT4, INT8]
    policy = WeightPolicy(group_size=32, embed=INT8)
    tensors = weight_tensor_bytes(s, precisions, policy)
    assert sum(tensors.values()) == memory_breakdown(s, precisions, policy, context=1, batch=1).weights
    assert tensors["model.layers.0.self_attn.q_proj.weight_packed"] == 64 * 8 * 4
    assert tensors["model.layers.0.self_attn.q_proj.weight_zero_point"] == 8 * 2 * 4
    assert tensors["model.layers.0.self_attn.q_proj.bias"] == 128
    assert tensors["model.layers.1.mlp.down_proj.weight_packed"] == 64 * 96
    assert tensors["model.layers.1.mlp.down_proj.weight_scale"] == 128
    assert tensors["model.embed_tokens.weight"] == 6400 and tensors["model.embed_tokens.weight_scale"] == 200
    assert tensors["lm_head.weight_packed"] == 6400 and tensors["lm_head.weight_shape"] == 16  # a linear: packed
    assert tensors["model.norm.weight"] == 128 and tensors["model.layers.1.input_layernorm.weight"] == 128


def test_average_bits():
    s = model_shape(SMALL)
    assert average_bits(s, [FP16, FP16], WeightPolicy())["quantizable_linears"] == 16.0
    assert average_bits(s, [FP16, FP16], WeightPolicy())["all_weights"] == 16.0
    bits = average_bits(s, [INT4, INT4], WeightPolicy())
    assert bits["quantizable_linears"] == pytest.approx(8 * 16368 / 30720)
    assert bits["all_weights"] > bits["quantizable_linears"]  # fp16 embeddings and norms


def test_runtime_validation():
    s = model_shape(SMALL)
    for kw in ({"context": 0, "batch": 1}, {"context": 4, "batch": -1}):
        with pytest.raises(ValueError, match="positive"):
            kv_cache_bytes(s, **kw)
        with pytest.raises(ValueError, match="positive"):
            workspace_bytes(s, **kw)
    with pytest.raises(ValueError, match="3 precisions"):
        memory_breakdown(s, [FP16] * 3, WeightPolicy(), context=1, batch=1)


# ----------------------------------------------------------------------------------- published sizes

PUBLISHED_PARAMS = {
    "llama-2-7b": 6_738_415_616,
    "llama-2-13b": 13_015_864_320,
    "llama-3-8b": 8_030_261_248,
    "mistral-7b": 7_241_732_096,
    "llama-3-70b": 70_553_706_496,
}


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS))
def test_shipped_configs_match_published_parameter_counts(name):
    s = model_shape(shipped(name))
    assert s.num_params == PUBLISHED_PARAMS[name]
    bd = memory_breakdown(s, [FP16] * s.num_layers, WeightPolicy(), context=1, batch=1)
    assert bd.weights == 2 * PUBLISHED_PARAMS[name]


def test_llama2_7b_published_sizes():
    s = model_shape(shipped("llama-2-7b"))
    fp16 = memory_breakdown(s, [FP16] * 32, WeightPolicy(), context=4096, batch=1)
    int4 = memory_breakdown(s, [INT4] * 32, WeightPolicy(), context=4096, batch=1)
    assert fp16.weights == 13_476_831_232  # "about 13.5 GB"
    assert int4.weights == 3_765_546_496  # per-channel INT4, fp16 embeddings and head: 3.77 GB
    assert 3.5e9 <= int4.weights <= 3.9e9
    assert fp16.kv_cache == 2 * 1024**3  # 2 x 32 layers x 32 heads x 128 x 4096 x 2 bytes
    int4_g128 = memory_breakdown(s, [INT4] * 32, WeightPolicy(group_size=128), context=1, batch=1)
    assert int4_g128.weights == 3_889_311_232


# ----------------------------------------------------------------------------- shapes vs transformers


def _tiny(model_type: str) -> dict:
    base = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=100, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    extra = {"qwen3": {"head_dim": 32}, "gemma": {"head_dim": 16}, "gemma2": {"head_dim": 16},
             "gemma3_text": {"head_dim": 16}, "llama": {"attention_bias": True, "mlp_bias": True},
             "gpt_neox": {"num_key_value_heads": None}}.get(model_type, {})
    return {k: v for k, v in {**base, **extra}.items() if v is not None}


@pytest.mark.parametrize("model_type", SUPPORTED_MODEL_TYPES)
def test_shapes_match_transformers_modules(model_type):
    """Every tensor name and shape equals the state dict of a model built from the config (on the meta device)."""
    torch = pytest.importorskip("torch")
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type, **_tiny(model_type))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    hf = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    s = model_shape(config.to_dict())
    if s.tied:
        hf.pop("lm_head.weight")
    fp16 = weight_tensor_bytes(s, [FP16] * s.num_layers, WeightPolicy())
    assert set(fp16) == set(hf)
    for name, shape in hf.items():
        n = 1
        for d in shape:
            n *= d
        assert fp16[name] == 2 * n, name
    assert s.num_params == sum(p.numel() for p in model.parameters())


def test_unsupported_model_type():
    with pytest.raises(ValueError, match=r"'mixtral'.*supported model types: gemma"):
        model_shape({**SMALL, "model_type": "mixtral"})
    with pytest.raises(ValueError, match="intermediate_size"):
        model_shape({k: v for k, v in SMALL.items() if k != "intermediate_size"})


# ------------------------------------------------------------------------------------------- units


@pytest.mark.parametrize("text, expected", [
    ("180MiB", 180 * 1024**2), ("6GiB", 6 * 1024**3), ("6GB", 6_000_000_000), ("6e9", 6_000_000_000),
    ("6 gb", 6_000_000_000), ("1.5KiB", 1536), ("1.1GB", 1_100_000_000), ("512", 512), (4096, 4096), ("0.5B", 0),
])
def test_parse_bytes(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("text", ["", "six GB", "6XB", "-1GB", "1e400GB x", float("nan"), -5, True])
def test_parse_bytes_rejects(text):
    with pytest.raises(ValueError):
        parse_bytes(text)


def test_parse_bytes_error_lists_units():
    with pytest.raises(ValueError, match="KiB, MiB, GiB"):
        parse_bytes("6XB", what="--budget")


def test_format_bytes():
    assert format_bytes(13_476_831_232) == "12.55 GiB"
    assert format_bytes(3_765_546_496, "GB") == "3.77 GB"
    assert format_bytes(512) == "512 B"
    assert format_bytes(-2 * 1024**2) == "-2.00 MiB"
