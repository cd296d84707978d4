"""The byte model: exact bytes of every stored tensor at each precision, plus what a device holds at run time.

Storage follows the compressed-tensors layout the quantize stage writes. "FP16" (``Precision.FP16``, "fp16" in
plans) means a 16-bit float: the artifact stores its float tensors and scales in bfloat16 unless the source
declares float16 (:func:`lsaq.models.loading.storage_dtype`); both take 2 bytes, so the byte counts below do not
depend on which. For a linear weight ``[out, in]`` (``nn.Linear`` convention):

* FP16: ``weight`` out*in*2; ``bias`` out*2 when present (biases are 16-bit at every precision).
* INT8 per-channel, symmetric ("pack-quantized", 8 bits: the form vLLM serves): ``weight_packed`` int32
  ``[out, ceil(in/4)]``; ``weight_scale`` fp16 ``[out, 1]``; ``weight_shape`` int64 ``[2]`` (16 bytes). An INT8
  embedding is "int-quantized" (the form stock transformers loads for an embedding): ``weight`` int8 out*in and
  ``weight_scale``.
* INT4 per-channel, symmetric ("pack-quantized"): ``weight_packed`` int32 ``[out, ceil(in/8)]``;
  ``weight_scale`` fp16 ``[out, 1]``; ``weight_shape`` int64 ``[2]`` (16 bytes).
* INT4 group-wise (group size g), asymmetric: ``weight_packed`` as above; ``weight_scale`` fp16
  ``[out, ceil(in/g)]``; ``weight_zero_point`` int4 packed into int32 along dim 0, ``[ceil(out/8), ceil(in/g)]``;
  ``weight_shape`` 16 bytes. The group size applies to INT4 only; INT8 is always per-channel.

Norm weights and biases stay 16-bit. The token embedding and LM head (``[vocab, hidden]``) follow a policy:
fp16 by default, int8 or int4 on request with the same formulas (one scale per token row, per channel; INT4
group-wise with the policy's group size). A tied head is stored once while embedding and head are both fp16;
quantizing either unties them (:meth:`WeightPolicy.unties`): the artifact stores ``lm_head`` beside the
embedding with ``tie_word_embeddings: false``, and both are counted. (Stock transformers ties the head to the
embedding's *stored* tensor before compressed-tensors decompresses it, so a shared quantized matrix does not
load there, and a packed INT4 head on a tied model fails outright.)

Run time adds the KV cache, ``2 * layers * kv_heads * head_dim * context * batch * kv_bytes``, and an activation
workspace estimate (:func:`workspace_bytes`). The device profile's reserve comes on top (see the planner).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Mapping, Sequence

from lsaq.models.shapes import HEAD_WEIGHT, ModelShape, TensorShape
from lsaq.precision import GROUP_SIZES, Precision, check_group_size

FP16_BYTES = 2
SHAPE_TENSOR_BYTES = 16  # weight_shape: int64 [2]


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def group_widths(shape: ModelShape) -> tuple[int, ...]:
    """The input widths INT4 groups run along: every decoder linear's ``in_features`` and the hidden size (the
    embedding and LM head, ``[vocab, hidden]``), sorted."""
    return tuple(sorted({lin.in_features for lin in shape.layer_linears} | {shape.hidden_size}))


def check_group_divides(shape: ModelShape, group_size: int | None) -> None:
    """``ValueError`` when ``group_size`` leaves a ragged last group in some tensor: compressed-tensors refuses
    ragged groups, so an artifact with them would load nowhere but lsaq. The message lists the sizes that fit."""
    if group_size is None:
        return
    widths = group_widths(shape)
    ragged = [w for w in widths if w % group_size]
    if ragged:
        fits = [g for g in GROUP_SIZES if all(w % g == 0 for w in widths)]
        raise ValueError(f"INT4 group size {group_size} does not divide the input width "
                         f"{', '.join(map(str, ragged))} of this {shape.model_type} (widths {list(widths)}); "
                         f"group sizes that fit: {', '.join(map(str, fits)) or 'none of ' + str(list(GROUP_SIZES))}, "
                         f"or per-channel")


def fitting_group_size(shape: ModelShape, largest: int = GROUP_SIZES[0]) -> int | None:
    """The largest of :data:`GROUP_SIZES` (at most ``largest``) that divides every width of :func:`group_widths`,
    or None when none does. E.g. 64 for SmolLM2-135M (widths 576 and 1536), 128 for Llama-2-7B."""
    widths = group_widths(shape)
    return next((g for g in GROUP_SIZES if g <= largest and all(w % g == 0 for w in widths)), None)




def linear_tensor_bytes(
    out_features: int,
    in_features: int,
    precision: Precision | str,
    group_size: int | None = None,
    bias: bool = False,
    int8_packed: bool = True,
) -> dict[str, int]:
    """Bytes of each stored tensor of one ``[out, in]`` weight, keyed by compressed-tensors suffix; ``int8_packed``
    False: INT8 as plain codes (an embedding).

    The single source of truth for per-tensor sizes: the planner sums it, the quantize stage asserts its
    artifact against it tensor by tensor. Keys: ``weight``, ``weight_packed``, ``weight_scale``,
    ``weight_zero_point``, ``weight_shape``, ``bias`` (only those the precision stores).
    """
    p = Precision.parse(precision)
    group_size = check_group_size(group_size)
    o, i = out_features, in_features
    if o < 1 or i < 1:
        raise ValueError(f"linear shape must be positive, got [{o}, {i}]")
    if p is Precision.FP16:
        out = {"weight": o * i * FP16_BYTES}
    elif p is Precision.INT8 and not int8_packed:
        out = {"weight": o * i, "weight_scale": o * FP16_BYTES}
    elif p is Precision.INT8:
        out = {"weight_packed": o * _ceil_div(i, 4) * 4, "weight_scale": o * FP16_BYTES,
               "weight_shape": SHAPE_TENSOR_BYTES}
    elif group_size is None:
        out = {"weight_packed": o * _ceil_div(i, 8) * 4, "weight_scale": o * FP16_BYTES, "weight_shape": SHAPE_TENSOR_BYTES}
    else:
        groups = _ceil_div(i, group_size)
        out = {
            "weight_packed": o * _ceil_div(i, 8) * 4,
            "weight_scale": o * groups * FP16_BYTES,
            "weight_zero_point": _ceil_div(o, 8) * groups * 4,
            "weight_shape": SHAPE_TENSOR_BYTES,
        }
    if bias:
        out["bias"] = o * FP16_BYTES
    return out


def _fp16_bytes(numel: int) -> int:
    return numel * FP16_BYTES


@dataclass(frozen=True)
class WeightPolicy:
    """How the tensors outside the per-layer choice are stored, and the INT4 group size.

    ``embed`` and ``head`` are each fp16 (a 16-bit float, see the module docstring), int8 or int4, tied model or
    not: the quantize stage builds every combination (an unknown value is a ``ValueError`` naming the valid
    ones). ``group_size`` applies to every INT4 tensor, embedding and head included.
    """

    group_size: int | None = None  # None: INT4 per-channel
    embed: Precision = Precision.FP16
    head: Precision | None = None  # None: same as the embedding

    def __post_init__(self) -> None:
        check_group_size(self.group_size)
        object.__setattr__(self, "embed", Precision.parse(self.embed))
        if self.head is not None:  # "same as the embedding" has one spelling, so equal policies compare equal
            head = Precision.parse(self.head)
            object.__setattr__(self, "head", None if head is self.embed else head)

    @property
    def head_precision(self) -> Precision:
        return self.embed if self.head is None else self.head

    def unties(self, shape: ModelShape) -> bool:
        """Whether ``shape``'s tied LM head gets its own stored matrix: a tied model, embedding or head quantized."""
        return shape.tied and (self.embed is not Precision.FP16 or self.head_precision is not Precision.FP16)

    def to_json(self) -> dict[str, Any]:
        return {"group_size": self.group_size, "embed": self.embed.value, "head": self.head_precision.value}

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> "WeightPolicy":
        return cls(group_size=obj.get("group_size"), embed=Precision.parse(obj["embed"]), head=Precision.parse(obj["head"]))


def layer_linear_bytes(shape: ModelShape, precision: Precision, group_size: int | None = None) -> int:
    """Bytes of one decoder layer's linear weights (with their biases) at ``precision``."""
    return sum(
        sum(linear_tensor_bytes(lin.out_features, lin.in_features, precision, group_size, lin.bias).values())
        for lin in shape.layer_linears
    )


def layer_norm_bytes(shape: ModelShape) -> int:
    """Bytes of one decoder layer's norm tensors (always 16-bit)."""
    return sum(_fp16_bytes(t.numel) for t in shape.layer_norms)


# The name transformers gives every supported family's output projection (lsaq.models.families names an untied
# head the same way); a tied model's head is stored under it once the policy unties it.


def head_tensor(shape: ModelShape, policy: WeightPolicy) -> TensorShape | None:
    """The LM head matrix the artifact stores on its own: the model's untied head, a tied model's head once the
    policy unties it (same shape as the embedding), or None when it is stored once with the embedding."""
    if shape.lm_head is not None:
        return shape.lm_head
    return TensorShape(HEAD_WEIGHT, shape.embed.shape) if policy.unties(shape) else None


def embedding_bytes(shape: ModelShape, policy: WeightPolicy) -> tuple[int, int]:
    """``(embedding, lm_head)`` bytes; the head is 0 when tied and stored once with the embedding."""
    vocab, hidden = shape.embed.shape
    embed = sum(linear_tensor_bytes(vocab, hidden, policy.embed, policy.group_size, int8_packed=False).values())
    head = head_tensor(shape, policy)
    if head is None:
        return embed, 0
    hv, hh = head.shape
    return embed, sum(linear_tensor_bytes(hv, hh, policy.head_precision, policy.group_size).values())


def kv_cache_bytes(shape: ModelShape, context: int, batch: int, kv_bytes: int = FP16_BYTES) -> int:
    """``2 (K and V) * layers * kv_heads * head_dim * context * batch * kv_bytes``.

    Every layer is counted at the full context, also for families with sliding-window layers (an upper bound).
    """
    _check_positive(context=context, batch=batch, kv_bytes=kv_bytes)
    return 2 * shape.num_layers * shape.num_kv_heads * shape.head_dim * context * batch * kv_bytes


def workspace_bytes(shape: ModelShape, context: int, batch: int) -> int:
    """Activation workspace estimate for one forward pass over the whole context (the prefill), in 16-bit floats.

    ``2 * batch * context * (4*hidden + (heads + 2*kv_heads)*head_dim + 3*intermediate)``: residual stream,
    normed input, attention output and projection output, the q/k/v projections, and the MLP's gate, up and
    activation product, alive at once inside one layer. Attention is assumed memory-efficient (SDPA/flash: no
    ``context x context`` score matrix). Plus fp32 logits of the last position and one sampling copy
    (``8 * batch * vocab``; generation computes logits for the last position only), plus one dequantization
    buffer the size of the largest decoder linear in fp16 (kernels that dequantize a weight before a prefill
    GEMM). The LM head only ever multiplies the last position (a GEMV, fused kernels), so it gets no buffer.
    Independent of the per-layer precisions and of the embedding policy: the planner treats it as a fixed cost.
    """
    _check_positive(context=context, batch=batch)
    s = shape
    per_token = 4 * s.hidden_size + (s.num_heads + 2 * s.num_kv_heads) * s.head_dim + 3 * s.intermediate_size
    activations = FP16_BYTES * batch * context * per_token
    logits = 8 * batch * s.vocab_size
    scratch = max(_fp16_bytes(lin.params) for lin in s.layer_linears)
    return activations + logits + scratch


def _check_positive(**values: int) -> None:
    for name, v in values.items():
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")


@dataclass(frozen=True)
class MemoryBreakdown:
    """Bytes per component of one model at one assignment of per-layer precisions, plus run-time needs."""

    layers: tuple[int, ...]  # per decoder layer: linears (with biases) + norms
    layer_linears: int  # all decoder layers' linears, biases included
    layer_norms: int
    embeddings: int
    lm_head: int  # 0 when tied and stored once with the embedding
    final_norm: int
    kv_cache: int
    workspace: int
    reserve: int

    @property
    def weights(self) -> int:
        """Everything the checkpoint stores."""
        return self.layer_linears + self.layer_norms + self.embeddings + self.lm_head + self.final_norm

    @property
    def required(self) -> int:
        """What the model needs at run time: weights, KV cache and workspace (not the reserve)."""
        return self.weights + self.kv_cache + self.workspace

    @property
    def total(self) -> int:
        """``required`` plus the device's reserve: compared with the device's total memory."""
        return self.required + self.reserve

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["layers"] = list(self.layers)
        d.update(weights=self.weights, required=self.required, total=self.total)
        return d


def memory_breakdown(
    shape: ModelShape,
    precisions: Sequence[Precision],
    policy: WeightPolicy,
    *,
    context: int,
    batch: int,
    reserve: int = 0,
    kv_bytes: int = FP16_BYTES,
) -> MemoryBreakdown:
    """The :class:`MemoryBreakdown` of ``shape`` with decoder layer ``i`` stored at ``precisions[i]``."""
    if len(precisions) != shape.num_layers:
        raise ValueError(f"{len(precisions)} precisions given for a model with {shape.num_layers} layers")
    norms = layer_norm_bytes(shape)
    cost = {p: layer_linear_bytes(shape, p, policy.group_size) for p in set(precisions)}
    embed, head = embedding_bytes(shape, policy)
    return MemoryBreakdown(
        layers=tuple(cost[p] + norms for p in precisions),
        layer_linears=sum(cost[p] for p in precisions),
        layer_norms=norms * shape.num_layers,
        embeddings=embed,
        lm_head=head,
        final_norm=sum(_fp16_bytes(t.numel) for t in shape.final_norms),
        kv_cache=kv_cache_bytes(shape, context, batch, kv_bytes),
        workspace=workspace_bytes(shape, context, batch),
        reserve=reserve,
    )


def average_bits(shape: ModelShape, precisions: Sequence[Precision], policy: WeightPolicy) -> dict[str, float]:
    """Average stored bits per weight.

    ``quantizable_linears``: 8 * bytes of the decoder layers' linear weights (codes, scales, zero points, shape
    tensors; biases excluded) / their number of weight elements. ``all_weights``: 8 * every stored byte
    (checkpoint total: a tied head once, or twice when the policy unties it) / every parameter of the model (a
    tied head counted once).
    """
    bits = 0
    for p in precisions:
        for lin in shape.layer_linears:
            bits += 8 * sum(linear_tensor_bytes(lin.out_features, lin.in_features, p, policy.group_size).values())
    n_linear = shape.num_layers * shape.linear_params_per_layer
    bd = memory_breakdown(shape, precisions, policy, context=1, batch=1)
    return {"quantizable_linears": bits / n_linear, "all_weights": 8 * bd.weights / shape.num_params}


def weight_tensor_bytes(shape: ModelShape, precisions: Sequence[Precision], policy: WeightPolicy) -> dict[str, int]:
    """Bytes of every tensor the quantized checkpoint stores, keyed by full parameter name.

    e.g. ``model.layers.3.self_attn.q_proj.weight_packed``. The values sum to ``memory_breakdown(...).weights``.
    """
    if len(precisions) != shape.num_layers:
        raise ValueError(f"{len(precisions)} precisions given for a model with {shape.num_layers} layers")
    out: dict[str, int] = {}
    for i, p in enumerate(precisions):
        for lin in shape.layer_linears:
            prefix = shape.layer_name(i, lin.name)
            for suffix, n in linear_tensor_bytes(lin.out_features, lin.in_features, p, policy.group_size, lin.bias).items():
                out[f"{prefix}.{suffix}"] = n
        for t in shape.layer_norms:
            out[shape.layer_name(i, t.name)] = _fp16_bytes(t.numel)
    head = head_tensor(shape, policy)
    heads = [(shape.embed, policy.embed, False)] + ([(head, policy.head_precision, True)] if head is not None else [])
    for tensor, p, packed in heads:
        module = tensor.name.removesuffix(".weight")
        for suffix, n in linear_tensor_bytes(tensor.shape[0], tensor.shape[1], p, policy.group_size,
                                             int8_packed=packed).items():
            out[f"{module}.{suffix}"] = n
    for t in shape.final_norms:
        out[t.name] = _fp16_bytes(t.numel)
    return out
