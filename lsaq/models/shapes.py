"""Model shapes from a Hugging Face config alone: every weight tensor a checkpoint holds, with no weights at hand.

The planner and the byte model need, per decoder layer, the linear weights (HF module names relative to the
layer, ``[out_features, in_features]`` as ``nn.Linear`` stores them, bias or not) plus the tensors that are
never quantized (norms), the token embedding and the LM head. Names follow the transformers modules of the
installed version (``model.layers.3.self_attn.q_proj``), so the quantize stage can match them one for one; the
test suite checks each supported family against a model built from a tiny config on the meta device.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Mapping

HEAD_WEIGHT = "lm_head.weight"  # every supported family names its LM head so (untied, or untied by quantizing)


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
    def params_per_layer(self) -> int:
        """Every parameter of one decoder layer: linear weights, their biases, norms."""
        return self.linear_params_per_layer + sum(
            lin.out_features for lin in self.layer_linears if lin.bias
        ) + sum(t.numel for t in self.layer_norms)

    @property
    def resident_params(self) -> int:
        """The parameters outside the decoder layers: embedding, an untied head, final norms."""
        head = self.lm_head.numel if self.lm_head is not None else 0
        return self.embed.numel + head + sum(t.numel for t in self.final_norms)

    @property
    def num_params(self) -> int:
        """All parameters, a tied head counted once (what a checkpoint stores)."""
        return self.num_layers * self.params_per_layer + self.resident_params

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
