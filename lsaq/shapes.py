"""Model shapes from a Hugging Face config alone: every weight tensor a checkpoint holds, with no weights at hand.

The planner and the byte model need, per decoder layer, the linear weights (HF module names relative to the
layer, ``[out_features, in_features]`` as ``nn.Linear`` stores them, bias or not) plus the tensors that are
never quantized (norms), the token embedding and the LM head. Names follow the transformers modules of the
installed version (``model.layers.3.self_attn.q_proj``), so the quantize stage can match them one for one; the
test suite checks each supported family against a model built from a tiny config on the meta device.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable, Mapping


@dataclass(frozen=True)
class LinearShape:
    """One linear weight of a decoder layer. ``name`` is relative to the layer, e.g. ``self_attn.q_proj``."""

    name: str
    out_features: int
    in_features: int
    bias: bool = False

    @property
    def params(self) -> int:
        """Weight elements (bias excluded)."""
        return self.out_features * self.in_features


@dataclass(frozen=True)
class TensorShape:
    """A tensor kept in float (norm weights and biases, embeddings): a parameter name and its shape."""

    name: str
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True)
class ModelShape:
    """Every weight of a decoder-only LM. All decoder layers share one layout (true of every supported family)."""

    model_type: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tied: bool  # LM head shares the embedding matrix: stored and counted once
    layer_prefix: str  # layer i's parameters are named f"{layer_prefix}.{i}.{relative name}"
    layer_linears: tuple[LinearShape, ...]  # quantizable, relative to the layer
    layer_norms: tuple[TensorShape, ...]  # always fp16, relative to the layer
    embed: TensorShape  # full name, [vocab, hidden]
    lm_head: TensorShape | None  # full name, [vocab, hidden]; None when tied
    final_norms: tuple[TensorShape, ...]  # full names

    def layer_name(self, layer: int, relative: str) -> str:
        return f"{self.layer_prefix}.{layer}.{relative}"

    @property
    def linear_params_per_layer(self) -> int:
        return sum(lin.params for lin in self.layer_linears)

    @property
    def num_params(self) -> int:
        """All parameters, a tied head counted once (what a checkpoint stores)."""
        per_layer = self.linear_params_per_layer + sum(
            lin.out_features for lin in self.layer_linears if lin.bias
        ) + sum(t.numel for t in self.layer_norms)
        head = self.lm_head.numel if self.lm_head is not None else 0
        return self.num_layers * per_layer + self.embed.numel + head + sum(t.numel for t in self.final_norms)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> "ModelShape":
        def tensor(t: Mapping[str, Any]) -> TensorShape:
            return TensorShape(name=t["name"], shape=tuple(int(d) for d in t["shape"]))

        fields = dict(obj)
        fields["layer_linears"] = tuple(LinearShape(**lin) for lin in obj["layer_linears"])
        fields["layer_norms"] = tuple(tensor(t) for t in obj["layer_norms"])
        fields["embed"] = tensor(obj["embed"])
        fields["lm_head"] = tensor(obj["lm_head"]) if obj.get("lm_head") is not None else None
        fields["final_norms"] = tuple(tensor(t) for t in obj["final_norms"])
        return cls(**fields)


# ------------------------------------------------------------------------------------------- per family

# tie_word_embeddings when a config omits it: the default of each family's transformers config class.
_TIE_DEFAULT = {"gemma": True, "gemma2": True, "gemma3_text": True}


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


def _llama_like(c: Mapping[str, Any], mt: str, d: dict[str, int]) -> tuple[list[LinearShape], list[TensorShape]]:
    h, q, kv = d["hidden"], d["heads"] * d["head_dim"], d["kv"] * d["head_dim"]
    # Bias flags as the transformers modules set them: qwen2 hard-codes q/k/v bias, mistral none,
    # llama/qwen3/gemma* read attention_bias (and llama mlp_bias).
    attn_bias = bool(c.get("attention_bias", False)) and mt != "mistral"
    qkv_bias = True if mt == "qwen2" else attn_bias
    o_bias = False if mt == "qwen2" else attn_bias
    mlp_bias = bool(c.get("mlp_bias", False)) and mt == "llama"
    linears = [
        LinearShape("self_attn.q_proj", q, h, qkv_bias),
        LinearShape("self_attn.k_proj", kv, h, qkv_bias),
        LinearShape("self_attn.v_proj", kv, h, qkv_bias),
        LinearShape("self_attn.o_proj", h, q, o_bias),
        LinearShape("mlp.gate_proj", d["inter"], h, mlp_bias),
        LinearShape("mlp.up_proj", d["inter"], h, mlp_bias),
        LinearShape("mlp.down_proj", h, d["inter"], mlp_bias),
    ]
    norms = [TensorShape("input_layernorm.weight", (h,)), TensorShape("post_attention_layernorm.weight", (h,))]
    if mt in ("gemma2", "gemma3_text"):
        norms += [
            TensorShape("pre_feedforward_layernorm.weight", (h,)),
            TensorShape("post_feedforward_layernorm.weight", (h,)),
        ]
    if mt in ("qwen3", "gemma3_text"):
        norms += [TensorShape("self_attn.q_norm.weight", (d["head_dim"],)), TensorShape("self_attn.k_norm.weight", (d["head_dim"],))]
    return linears, norms


def _phi3(c: Mapping[str, Any], mt: str, d: dict[str, int]) -> tuple[list[LinearShape], list[TensorShape]]:
    h, q, kv = d["hidden"], d["heads"] * d["head_dim"], d["kv"] * d["head_dim"]
    linears = [
        LinearShape("self_attn.qkv_proj", q + 2 * kv, h),  # fused q, k, v
        LinearShape("self_attn.o_proj", h, q),
        LinearShape("mlp.gate_up_proj", 2 * d["inter"], h),  # fused gate, up
        LinearShape("mlp.down_proj", h, d["inter"]),
    ]
    norms = [TensorShape("input_layernorm.weight", (h,)), TensorShape("post_attention_layernorm.weight", (h,))]
    return linears, norms


def _gpt_neox(c: Mapping[str, Any], mt: str, d: dict[str, int]) -> tuple[list[LinearShape], list[TensorShape]]:
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


_Builder = Callable[[Mapping[str, Any], str, dict[str, int]], tuple[list[LinearShape], list[TensorShape]]]
# model_type -> (layer builder, stack prefix, embedding name, final norm tensor names)
_FAMILIES: dict[str, tuple[_Builder, str, str, tuple[str, ...]]] = {
    **{
        mt: (_llama_like, "model", "model.embed_tokens.weight", ("model.norm.weight",))
        for mt in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text")
    },
    "phi3": (_phi3, "model", "model.embed_tokens.weight", ("model.norm.weight",)),
    "gpt_neox": (
        _gpt_neox,
        "gpt_neox",
        "gpt_neox.embed_in.weight",
        ("gpt_neox.final_layer_norm.weight", "gpt_neox.final_layer_norm.bias"),
    ),
}
SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(sorted(_FAMILIES))


def model_shape(config: Mapping[str, Any]) -> ModelShape:
    """The :class:`ModelShape` of a HF ``config.json`` dict; ``ValueError`` for unsupported or incomplete configs."""
    mt = config.get("model_type")
    if mt not in _FAMILIES:
        raise ValueError(
            f"cannot plan for model_type {mt!r}: no shape model for it; supported model types: "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    builder, stack, embed_name, final_names = _FAMILIES[mt]
    d = _dims(config, mt)
    linears, norms = builder(config, mt, d)
    tie = config.get("tie_word_embeddings")
    tied = bool(_TIE_DEFAULT.get(mt, False) if tie is None else tie)
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
        layer_prefix=f"{stack}.layers",
        layer_linears=tuple(linears),
        layer_norms=tuple(norms),
        embed=TensorShape(embed_name, (vocab, hidden)),
        lm_head=None if tied else TensorShape("lm_head.weight", (vocab, hidden)),
        final_norms=tuple(TensorShape(n, (hidden,)) for n in final_names),
    )
