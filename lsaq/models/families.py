"""The one registry of model families lsaq supports: where each keeps its decoder stack, and every tensor it stores.

Loading (:func:`lsaq.models.loading.decoder_parts`), planning (:func:`model_shape`, the byte model's input) and
quantizing (tensor names in the artifact) all read this table, so a family is either supported by every stage or
by none. Each entry is checked end to end on a tiny random model of the family (``tests/test_families.py``):
shapes equal to the transformers modules (with and without biases, tied and untied, head_dim != hidden/heads),
scoring with both proxies, a plan mixing FP16/INT8/INT4, an artifact whose bytes equal the byte model's, and
loading in lsaq's runtime and in stock transformers + compressed-tensors with logits equal to the exact
dequantized reference and the same greedy tokens.

Names follow the transformers modules of the installed version (``model.layers.3.self_attn.q_proj``); linear
shapes are ``[out_features, in_features]`` as ``nn.Linear`` stores them.

Not supported, and why (transformers 5.23, compressed-tensors 0.20):

* ``mixtral``, ``qwen3_moe`` (MoE): transformers keeps each layer's experts as two fused 3-D parameters
  (``mlp.experts.gate_up_proj [E, 2*inter, hidden]``, ``mlp.experts.down_proj [E, hidden, inter]``), not
  ``nn.Linear`` modules, and ``save_pretrained`` writes them back per expert under other names (mixtral:
  ``block_sparse_moe.experts.N.w1``). lsaq's quantizer and runtime swap linears, so experts cannot get a
  precision without a fused quantized-experts module; and stock transformers loads compressed-tensors experts
  only by dequantizing them at load time with one scheme for all experts and only for packed (INT4) or FP8
  formats: INT8 experts, and INT8/INT4 experts in different layers (what a plan produces), fail to load.
* ``gemma3`` (multimodal): ``Gemma3ForConditionalGeneration`` keeps the text stack under
  ``model.language_model`` beside a vision tower and projector that no shape here counts; only the text-only
  ``gemma3_text`` is registered.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

from lsaq.models.shapes import HEAD_WEIGHT, LinearShape, ModelShape, TensorShape

LayerTensors = tuple[list[LinearShape], list[TensorShape]]
LayerBuilder = Callable[[Mapping[str, Any], str, dict[str, int]], LayerTensors]


@dataclass(frozen=True)
class Family:
    """One model family (a transformers ``model_type``) and where its parts live on the ``*ForCausalLM`` module."""

    model_type: str
    layer_tensors: LayerBuilder  # (config, model_type, dims) -> (quantizable linears, norm tensors) of one layer
    stack: str = "model"  # attribute path from the CausalLM to the decoder stack (embedding, layers, final norm)
    layers: str = "layers"
    final_norm: str = "norm"
    embed: str = "embed_tokens"
    final_norm_params: tuple[str, ...] = ("weight",)
    tie_default: bool = False  # tie_word_embeddings when a config omits it (the config class's default)

    @property
    def layer_prefix(self) -> str:
        return f"{self.stack}.{self.layers}"


def _req(config: Mapping[str, Any], key: str, model_type: str) -> int:
    value = config.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"model config ({model_type}): {key!r} must be a positive integer, got {value!r}")
    return value


def _dims(c: Mapping[str, Any], mt: str) -> dict[str, int]:
    hidden, heads = _req(c, "hidden_size", mt), _req(c, "num_attention_heads", mt)
    kv = c.get("num_key_value_heads") or heads
    head_dim = c.get("head_dim") or hidden // heads
    if heads % kv:
        raise ValueError(f"model config ({mt}): num_attention_heads {heads} is not a multiple of num_key_value_heads {kv}")
    return {
        "hidden": hidden,
        "heads": heads,
        "kv": int(kv),
        "head_dim": int(head_dim),
        "inter": _req(c, "intermediate_size", mt),
        "layers": _req(c, "num_hidden_layers", mt),
        "vocab": _req(c, "vocab_size", mt),
    }


def _llama_like(c: Mapping[str, Any], mt: str, d: dict[str, int]) -> LayerTensors:
    h, q, kv = d["hidden"], d["heads"] * d["head_dim"], d["kv"] * d["head_dim"]
    # Bias flags as the transformers modules set them: qwen2 hard-codes q/k/v bias, mistral none,
    # the others read attention_bias (and llama/granite/smollm3 mlp_bias).
    attn_bias = bool(c.get("attention_bias", False)) and mt != "mistral"
    qkv_bias = True if mt == "qwen2" else attn_bias
    o_bias = False if mt == "qwen2" else attn_bias
    mlp_bias = bool(c.get("mlp_bias", False)) and mt in ("llama", "granite", "smollm3")
    linears = [
        LinearShape("self_attn.q_proj", q, h, qkv_bias),
        LinearShape("self_attn.k_proj", kv, h, qkv_bias),
        LinearShape("self_attn.v_proj", kv, h, qkv_bias),
        LinearShape("self_attn.o_proj", h, q, o_bias),
        LinearShape("mlp.gate_proj", d["inter"], h, mlp_bias),
        LinearShape("mlp.up_proj", d["inter"], h, mlp_bias),
        LinearShape("mlp.down_proj", h, d["inter"], mlp_bias),
    ]
    if mt == "olmo2":  # norms after attention and MLP, none before; q/k norms over all heads
        norms = [
            TensorShape("post_attention_layernorm.weight", (h,)),
            TensorShape("post_feedforward_layernorm.weight", (h,)),
            TensorShape("self_attn.q_norm.weight", (q,)),
            TensorShape("self_attn.k_norm.weight", (kv,)),
        ]
        return linears, norms
    norms = [TensorShape("input_layernorm.weight", (h,)), TensorShape("post_attention_layernorm.weight", (h,))]
    if mt in ("gemma2", "gemma3_text"):
        norms += [
            TensorShape("pre_feedforward_layernorm.weight", (h,)),
            TensorShape("post_feedforward_layernorm.weight", (h,)),
        ]
    if mt in ("qwen3", "gemma3_text"):
        norms += [TensorShape("self_attn.q_norm.weight", (d["head_dim"],)), TensorShape("self_attn.k_norm.weight", (d["head_dim"],))]
    return linears, norms


def _phi3(c: Mapping[str, Any], mt: str, d: dict[str, int]) -> LayerTensors:
    h, q, kv = d["hidden"], d["heads"] * d["head_dim"], d["kv"] * d["head_dim"]
    linears = [
        LinearShape("self_attn.qkv_proj", q + 2 * kv, h),  # fused q, k, v
        LinearShape("self_attn.o_proj", h, q),
        LinearShape("mlp.gate_up_proj", 2 * d["inter"], h),  # fused gate, up
        LinearShape("mlp.down_proj", h, d["inter"]),
    ]
    norms = [TensorShape("input_layernorm.weight", (h,)), TensorShape("post_attention_layernorm.weight", (h,))]
    return linears, norms


def _gpt_neox(c: Mapping[str, Any], mt: str, d: dict[str, int]) -> LayerTensors:
    h = d["hidden"]
    attn_bias = bool(c.get("attention_bias", True))
    linears = [
        LinearShape("attention.query_key_value", 3 * h, h, attn_bias),  # fused, multi-head (no GQA)
        LinearShape("attention.dense", h, h, attn_bias),
        LinearShape("mlp.dense_h_to_4h", d["inter"], h, True),
        LinearShape("mlp.dense_4h_to_h", h, d["inter"], True),
    ]
    norms = [
        TensorShape(f"{n}.{p}", (h,)) for n in ("input_layernorm", "post_attention_layernorm") for p in ("weight", "bias")
    ]
    return linears, norms


_FAMILIES = (
    *(Family(mt, _llama_like) for mt in ("llama", "mistral", "qwen2", "qwen3", "granite", "olmo2", "smollm3")),
    *(Family(mt, _llama_like, tie_default=True) for mt in ("gemma", "gemma2", "gemma3_text")),
    Family("phi3", _phi3),
    Family("gpt_neox", _gpt_neox, stack="gpt_neox", final_norm="final_layer_norm", embed="embed_in",
           final_norm_params=("weight", "bias")),
)
FAMILIES: dict[str, Family] = {f.model_type: f for f in _FAMILIES}
SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(sorted(FAMILIES))


def family(model_type: str | None, where: str = "") -> Family:
    """The registry entry of ``model_type``; ``ValueError`` naming it (``where`` it was found) and the supported types."""
    if model_type not in FAMILIES:
        raise ValueError(
            f"unsupported architecture: model_type {model_type!r}{where}; supported model types: "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    return FAMILIES[model_type]


def model_shape(config: Mapping[str, Any]) -> ModelShape:
    """The :class:`ModelShape` of a HF ``config.json`` dict; ``ValueError`` for unsupported or incomplete configs."""
    mt = config.get("model_type")
    fam = family(mt, " in the model config")
    d = _dims(config, mt)
    linears, norms = fam.layer_tensors(config, mt, d)
    tie = config.get("tie_word_embeddings")
    tied = bool(fam.tie_default if tie is None else tie)
    vocab, hidden = d["vocab"], d["hidden"]
    return ModelShape(
        model_type=mt,
        num_layers=d["layers"],
        hidden_size=hidden,
        num_heads=d["heads"],
        num_kv_heads=d["kv"],
        head_dim=d["head_dim"],
        intermediate_size=d["inter"],
        vocab_size=vocab,
        tied=tied,
        layer_prefix=fam.layer_prefix,
        layer_linears=tuple(linears),
        layer_norms=tuple(norms),
        embed=TensorShape(f"{fam.stack}.{fam.embed}.weight", (vocab, hidden)),
        lm_head=None if tied else TensorShape(HEAD_WEIGHT, (vocab, hidden)),
        final_norms=tuple(TensorShape(f"{fam.stack}.{fam.final_norm}.{p}", (hidden,)) for p in fam.final_norm_params),
    )
