"""The llama.cpp runtime's byte model: the GGUF type each tensor of a plan is written in, and its exact bytes.

A GGUF file stores each tensor in one ggml type. A row of ``n`` values (a linear weight ``[out, in]`` has ``out``
rows of ``n = in``) is ``n / block`` blocks of ``type_size`` bytes (:data:`BLOCKS`, ggml's own table, which the gguf
package also carries as ``GGML_QUANT_SIZES``: a test holds them equal; this module needs no gguf); a type whose block
does not divide the row cannot store it. lsaq's precisions become:

* FP16 -> F16, or BF16 when the source model is bfloat16 (the 16-bit type the compressed-tensors build keeps).
* INT8 -> by :class:`Int8Format`: Q8_0 (blocks of 32 int8 codes with one fp16 scale, 8.5 bits per weight) or Q6_K
  (super-blocks of 256, 6.5625 bits).
* INT4 -> by :class:`Int4Format`: Q4_K (super-blocks of 256 values, 8 sub-blocks of 32 with 6-bit scales and
  minimums, 4.5 bits per weight; llama.cpp's quantizer), Q4_1 (blocks of 32, an fp16 scale and minimum, 5 bits),
  Q4_0 (blocks of 32, symmetric, an fp16 scale, 4.5 bits), Q5_K (5.5 bits) or Q3_K (3.4375 bits).
* K-quants need rows that are multiples of 256; a shorter or ragged row takes a block-32 type instead
  (:data:`K_FALLBACK`): Q6_K -> Q8_0 and Q5_K -> Q5_1 as llama.cpp falls back, Q4_K -> Q4_1 (llama.cpp's Q5_0
  would not be 4-bit), Q3_K -> Q4_0 (the size of llama.cpp's IQ4_NL).
* Norm weights and biases: F32, as llama.cpp's converter writes every 1-D tensor.

A tied model's GGUF has no ``output`` tensor (llama.cpp multiplies by ``token_embd``), whatever the embedding's
type; it gets one only when the policy asks the head for another precision than the embedding.

The file adds a header (metadata: architecture, tokenizer, chat template; tensor infos) and pads each tensor's
data to 32 bytes; :func:`gguf_data_bytes` counts the padding, the header is known once written.

Run time (:func:`gguf_breakdown`, measured with llama-cpp-python 0.3.36 on the shared model): the weights are
memory-mapped and all resident once used; the KV cache is fp16, ``2 * layers * kv_heads * head_dim * context *
batch * 2`` (llama.cpp's "KV buffer size": 90.00 MiB at context 4096); the compute buffer holds float32 logits of
every position of a step, ``4 * vocab * ubatch``, plus its activations (99.4 MiB at ubatch 512, 24.8 MiB at 128),
so lsaq runs llama.cpp with :data:`UBATCH` tokens per step; the process itself (Python, llama-cpp-python, the
tokenizer's caches) takes about :data:`RUNTIME_OVERHEAD`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from enum import IntEnum

from lsaq.choices import Choice
from lsaq.models.shapes import HEAD_WEIGHT, ModelShape, TensorShape
from lsaq.planning.memory import MemoryBreakdown, WeightPolicy, kv_cache_bytes
from lsaq.precision import Precision

ALIGNMENT = 32  # GGUF's default data alignment: each tensor's data starts at a multiple of it


class GgmlType(IntEnum):
    """The ggml tensor types a GGUF build uses, by ggml's numbers (``ggml_type``)."""

    F32 = 0
    F16 = 1
    Q4_0 = 2
    Q4_1 = 3
    Q5_1 = 7
    Q8_0 = 8
    Q3_K = 11
    Q4_K = 12
    Q5_K = 13
    Q6_K = 14
    BF16 = 30


# ggml type -> (values per block, bytes per block)
BLOCKS = {GgmlType.F32: (1, 4), GgmlType.F16: (1, 2), GgmlType.BF16: (1, 2), GgmlType.Q8_0: (32, 34),
          GgmlType.Q4_0: (32, 18), GgmlType.Q4_1: (32, 20), GgmlType.Q4_K: (256, 144), GgmlType.Q5_K: (256, 176),
          GgmlType.Q6_K: (256, 210), GgmlType.Q5_1: (32, 24), GgmlType.Q3_K: (256, 110)}
K_BLOCK = 256  # values per K-quant super-block
# a K-quant's type for rows that are not multiples of K_BLOCK (module doc)
K_FALLBACK = {GgmlType.Q6_K: GgmlType.Q8_0, GgmlType.Q5_K: GgmlType.Q5_1, GgmlType.Q4_K: GgmlType.Q4_1,
              GgmlType.Q3_K: GgmlType.Q4_0}
UBATCH = 128  # tokens per llama.cpp compute step (n_batch = n_ubatch) when lsaq runs a GGUF build
RUNTIME_OVERHEAD = 64 * 2**20  # the llama.cpp process besides weights, KV cache and compute buffer (measured: 63 MiB)


class _GgufLevel(Choice):
    """A ggml type chosen for one quantized level; its values are the types' names in lower case."""

    @property
    def ggml(self) -> GgmlType:
        return GgmlType[self.name]


class Int4Format(_GgufLevel):
    """How an INT4 tensor is stored in a GGUF build (the K-quants where rows allow, see :data:`K_FALLBACK`)."""

    Q4_K = "q4_k"
    Q4_1 = "q4_1"
    Q4_0 = "q4_0"
    Q5_K = "q5_k"
    Q3_K = "q3_k"

    @classmethod
    def noun(cls) -> tuple[str, str]:
        return "INT4 GGUF format", "formats"


class Int8Format(_GgufLevel):
    """How an INT8 tensor is stored in a GGUF build (Q6_K where rows allow, else Q8_0)."""

    Q8_0 = "q8_0"
    Q6_K = "q6_k"

    @classmethod
    def noun(cls) -> tuple[str, str]:
        return "INT8 GGUF format", "formats"


# INT4 GGUF formats that hold lsaq's own INT4 codes (GPTQ's) exactly, with the group size those codes need: Q4_0
# per-channel symmetric codes, Q4_1 groups of 32 (lsaq.quantization.ggml_codes); K-quants search their own scales.
CODE_GROUPS: dict[Int4Format, int | None] = {Int4Format.Q4_0: None, Int4Format.Q4_1: 32}


@dataclass(frozen=True)
class GgufFormats:
    """The GGUF types of a build: the 16-bit float type, the INT8 and the INT4 format."""

    float_type: str = "f16"  # "f16" or "bf16"
    int4: Int4Format = Int4Format.Q4_K
    int8: Int8Format = Int8Format.Q8_0

    def __post_init__(self) -> None:
        if self.float_type not in ("f16", "bf16"):
            raise ValueError(f"GGUF float type must be 'f16' or 'bf16', got {self.float_type!r}")
        object.__setattr__(self, "int4", Int4Format.parse(self.int4))
        object.__setattr__(self, "int8", Int8Format.parse(self.int8))

    @classmethod
    def for_source(cls, declared_dtype: str | None, int4: Int4Format | str = Int4Format.Q4_K,
                   int8: Int8Format | str = Int8Format.Q8_0) -> "GgufFormats":
        """BF16 for a bfloat16 source, F16 otherwise (float16, float32, a GGUF source)."""
        return cls(float_type="bf16" if declared_dtype == "bfloat16" else "f16", int4=int4, int8=int8)

    @property
    def holds_codes(self) -> bool:
        """Whether both quantized levels can keep lsaq's own codes (GPTQ's): INT8 as Q8_0, INT4 in
        :data:`CODE_GROUPS`; K-quants search their own scales."""
        return self.int8 is Int8Format.Q8_0 and self.int4 in CODE_GROUPS

    def to_json(self) -> dict[str, Any]:
        return {"float_type": self.float_type, "int4": self.int4.value, "int8": self.int8.value}

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> "GgufFormats":
        return cls(float_type=obj["float_type"], int4=obj["int4"], int8=obj.get("int8", Int8Format.Q8_0.value))


def row_bytes(ggml_type: GgmlType, n: int) -> int:
    """Bytes of one row of ``n`` values in ``ggml_type``; ``ValueError`` when its block does not divide ``n``."""
    block, size = BLOCKS[ggml_type]
    if n < 1 or n % block:
        raise ValueError(f"a row of {n} values cannot be stored as {ggml_type.name} (blocks of {block})")
    return n // block * size


def weight_type(precision: Precision | str, row: int, formats: GgufFormats) -> GgmlType:
    """The ggml type of a matrix with rows of ``row`` values stored at ``precision``."""
    p = Precision.parse(precision)
    if p is Precision.FP16:
        return GgmlType.BF16 if formats.float_type == "bf16" else GgmlType.F16
    if row % 32:  # every quantized type here has blocks of 32 or 256
        raise ValueError(f"rows of {row} values are not a multiple of 32: GGUF cannot store them at {p.value}")
    kind = formats.int8.ggml if p is Precision.INT8 else formats.int4.ggml
    return kind if row % BLOCKS[kind][0] == 0 else K_FALLBACK[kind]


@dataclass(frozen=True)
class GgufTensor:
    """One tensor of a GGUF build, by its transformers name: numpy shape ``[rows, row]`` (or ``[n]``), its type."""

    name: str  # the transformers parameter name (the writer maps it to llama.cpp's)
    shape: tuple[int, ...]
    type: GgmlType

    @property
    def nbytes(self) -> int:
        rows = 1
        for d in self.shape[:-1]:
            rows *= d
        return rows * row_bytes(self.type, self.shape[-1])


def _vector(t: TensorShape) -> GgufTensor:
    return GgufTensor(t.name, t.shape, GgmlType.F32)


def _linears(shape: ModelShape, layer: int, precision: Precision, formats: GgufFormats) -> list[GgufTensor]:
    """Decoder layer ``layer``'s linear weights at ``precision`` and their biases (F32)."""
    out = []
    for lin in shape.layer_linears:
        name = shape.layer_name(layer, lin.name)
        out.append(GgufTensor(f"{name}.weight", (lin.out_features, lin.in_features),
                              weight_type(precision, lin.in_features, formats)))
        if lin.bias:
            out.append(GgufTensor(f"{name}.bias", (lin.out_features,), GgmlType.F32))
    return out


def _embeddings(shape: ModelShape, policy: WeightPolicy, formats: GgufFormats) -> tuple[GgufTensor, GgufTensor | None]:
    """The token embedding, and the head when the file stores one (an untied model's, or a tied model's whose
    policy gives the head another precision than the embedding)."""
    vocab, hidden = shape.embed.shape
    embed = GgufTensor(shape.embed.name, (vocab, hidden), weight_type(policy.embed, hidden, formats))
    head = shape.lm_head
    if head is None and policy.head_precision is not policy.embed:
        head = TensorShape(HEAD_WEIGHT, shape.embed.shape)
    if head is None:
        return embed, None
    return embed, GgufTensor(head.name, head.shape, weight_type(policy.head_precision, head.shape[1], formats))


def _check_layers(shape: ModelShape, precisions: Sequence[Precision]) -> None:
    if len(precisions) != shape.num_layers:
        raise ValueError(f"{len(precisions)} precisions given for a model with {shape.num_layers} layers")


def gguf_tensors(shape: ModelShape, precisions: Sequence[Precision], policy: WeightPolicy,
                 formats: GgufFormats) -> list[GgufTensor]:
    """Every tensor a GGUF build of ``shape`` stores, with decoder layer ``i`` at ``precisions[i]``: the embedding,
    then each layer's linears (and biases) and norms, then the final norms and the head when stored."""
    _check_layers(shape, precisions)
    embed, head = _embeddings(shape, policy, formats)
    out = [embed]
    for i, p in enumerate(precisions):
        out.extend(_linears(shape, i, p, formats))
        out.extend(_vector(TensorShape(shape.layer_name(i, t.name), t.shape)) for t in shape.layer_norms)
    out.extend(_vector(t) for t in shape.final_norms)
    return out + ([head] if head is not None else [])


def padded(nbytes: int, alignment: int = ALIGNMENT) -> int:
    """``nbytes`` rounded up to the file's alignment (each tensor's data starts aligned)."""
    return -(-nbytes // alignment) * alignment


def gguf_data_bytes(tensors: Sequence[GgufTensor]) -> int:
    """The bytes of the file's data section: every tensor, each padded to the alignment."""
    return sum(padded(t.nbytes) for t in tensors)


def type_counts(types: Sequence[str]) -> dict[str, int]:
    """How many tensors of each ggml type name, e.g. ``{"F32": 61, "Q4_K": 20, "Q8_0": 40}`` (records, tests)."""
    counts: dict[str, int] = {}
    for name in types:
        counts[name] = counts.get(name, 0) + 1
    return dict(sorted(counts.items()))


def compute_bytes(shape: ModelShape, context: int, batch: int) -> int:
    """llama.cpp's compute buffer for steps of ``min(UBATCH, context) * batch`` tokens: float32 logits of each and
    its activations inside one layer (residual, normed input, attention and MLP outputs, q/k/v, gate/up/product)."""
    tokens = min(UBATCH, context) * batch
    s = shape
    attention = (s.num_heads + 2 * s.num_kv_heads) * s.head_dim
    per_token = s.vocab_size + 4 * s.hidden_size + attention + 3 * s.intermediate_size
    return 4 * tokens * per_token


def runtime_bytes(shape: ModelShape, context: int, batch: int) -> int:
    """What llama.cpp holds besides weights and KV cache: its compute buffer and :data:`RUNTIME_OVERHEAD`."""
    return compute_bytes(shape, context, batch) + RUNTIME_OVERHEAD


def layer_bytes(shape: ModelShape, precision: Precision, formats: GgufFormats) -> int:
    """Bytes (padded) of one decoder layer's linear weights and biases at ``precision``."""
    return sum(padded(t.nbytes) for t in _linears(shape, 0, precision, formats))


def gguf_breakdown(shape: ModelShape, precisions: Sequence[Precision], policy: WeightPolicy, formats: GgufFormats,
                   *, context: int, batch: int, reserve: int = 0, kv_bytes: int = 2) -> MemoryBreakdown:
    """The :class:`~lsaq.planning.memory.MemoryBreakdown` of a GGUF build run by llama.cpp: the bytes of
    :func:`gguf_tensors`, each padded as in the file; ``workspace`` is :func:`runtime_bytes`."""
    _check_layers(shape, precisions)
    norms = sum(padded(t.nbytes) for t in map(_vector, shape.layer_norms))
    cost = {p: layer_bytes(shape, p, formats) for p in set(precisions)}
    embed, head = _embeddings(shape, policy, formats)
    return MemoryBreakdown(
        layers=tuple(cost[p] + norms for p in precisions),
        layer_linears=sum(cost[p] for p in precisions),
        layer_norms=norms * shape.num_layers,
        embeddings=padded(embed.nbytes),
        lm_head=padded(head.nbytes) if head is not None else 0,
        final_norm=sum(padded(t.nbytes) for t in map(_vector, shape.final_norms)),
        kv_cache=kv_cache_bytes(shape, context, batch, kv_bytes),
        workspace=runtime_bytes(shape, context, batch),
        reserve=reserve,
    )


def gguf_average_bits(shape: ModelShape, precisions: Sequence[Precision], policy: WeightPolicy,
                      formats: GgufFormats) -> dict[str, float]:
    """As :func:`lsaq.planning.memory.average_bits`, for the GGUF build's tensors (unpadded)."""
    by_name = {t.name: t.nbytes for t in gguf_tensors(shape, precisions, policy, formats)}
    linear = sum(by_name[shape.layer_name(i, f"{lin.name}.weight")]
                 for i in range(shape.num_layers) for lin in shape.layer_linears)
    return {"quantizable_linears": 8 * linear / (shape.num_layers * shape.linear_params_per_layer),
            "all_weights": 8 * sum(by_name.values()) / shape.num_params}


__all__ = ["ALIGNMENT", "BLOCKS", "CODE_GROUPS", "K_BLOCK", "K_FALLBACK", "RUNTIME_OVERHEAD", "UBATCH", "GgmlType",
           "GgufFormats", "GgufTensor", "Int4Format", "Int8Format", "compute_bytes", "gguf_average_bits",
           "gguf_breakdown", "gguf_data_bytes", "gguf_tensors", "layer_bytes", "padded", "row_bytes", "runtime_bytes",
           "type_counts", "weight_type"]
