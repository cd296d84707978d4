"""An artifact read back onto lsaq's packed runtime, whole or one decoder layer at a time.

:class:`ArtifactLayers` is the artifact's model with its decoder layers on the meta device and everything else
real: the embedding (a quantized one stays packed and dequantizes the rows it looks up,
:class:`~lsaq.quantization.qembedding.QuantizedEmbedding`), the final norm and the LM head (packed when the plan
quantizes it). :meth:`ArtifactLayers.load` builds decoder layer i from the artifact's tensors (INT8/INT4 linears
packed, float parts in the compute dtype) and :meth:`ArtifactLayers.release` drops it again, so an evaluation walks
a build beside its float model (:mod:`lsaq.engine.walk`) holding one layer of each. :func:`load_quantized` loads
every layer and keeps them: the whole quantized model.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from lsaq.engine.checkpoint import Checkpoint
from lsaq.engine.skeleton import HEAD_LIMIT, to_device, upcast_output
from lsaq.engine.walk import load_every
from lsaq.models.families import family
from lsaq.models.identity import ModelInfo
from lsaq.models.loading import LoadedModel
from lsaq.models.parts import DecoderParts, decoder_parts
from lsaq.models.shapes import HEAD_WEIGHT
from lsaq.planning.memory import head_tensor
from lsaq.planning.planner import Plan
from lsaq.precision import Precision
from lsaq.quantization.apply import quantized_linear
from lsaq.quantization.artifact import PLAN, ArtifactError, verify_artifact
from lsaq.quantization.primitives import QuantizedWeight
from lsaq.quantization.qembedding import QuantizedEmbedding
from lsaq.resources import trim_heap

__all__ = ["ArtifactCodes", "ArtifactLayers", "load_quantized", "read_codes"]


def stored_suffixes(precision: Precision, group_size: int | None, int8_packed: bool = True) -> tuple[str, ...]:
    """The compressed-tensors names a quantized weight is stored under (``q_proj.weight_packed``, ...);
    ``int8_packed`` False: INT8 as plain codes (an embedding; every INT8 weight of an artifact written by lsaq 0.1)."""
    if precision is Precision.INT8 and not int8_packed:
        return ("weight", "weight_scale")
    return ("weight_packed", "weight_scale", "weight_shape") + (("weight_zero_point",) if group_size else ())


def read_codes(checkpoint: Checkpoint, module: str, precision: Precision, group_size: int | None,
               int8_packed: bool = True) -> QuantizedWeight:
    """The quantized weight of ``module`` (``model.layers.0.self_attn.q_proj``) as its codes, read from
    ``checkpoint`` (an artifact's weights)."""
    names = [f"{module}.{s}" for s in stored_suffixes(precision, group_size, int8_packed)]
    stored = {n.rsplit(".", 1)[1]: t for n, t in checkpoint.read(names).items()}
    return QuantizedWeight.from_compressed_tensors(stored, group_size, precision)


class ArtifactCodes:
    """The codes of an artifact's quantized decoder linears by weight name (``...q_proj.weight``): what a GGUF build
    of the same plan keeps code for code. Every file is checked (sizes, headers, sha256) on opening."""

    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        verify_artifact(path)
        self.plan = Plan.load(path / PLAN)
        self.checkpoint = Checkpoint.open(path)
        shape, group = self.plan.shape, self.plan.options.policy.group_size
        names = set(self.checkpoint.names())
        # weight name -> module, precision, group, packed
        self.modules: dict[str, tuple[str, Precision, int | None, bool]] = {}
        for i, precision in enumerate(self.plan.precisions):
            if precision is not Precision.FP16:
                for lin in shape.layer_linears:
                    module = shape.layer_name(i, lin.name)
                    self.modules[f"{module}.weight"] = (module, precision,
                                                        group if precision is Precision.INT4 else None,
                                                        f"{module}.weight_packed" in names)

    def __call__(self, weight: str) -> QuantizedWeight | None:
        """The codes stored for ``weight``; None for a weight the artifact keeps in float."""
        found = self.modules.get(weight)
        return None if found is None else read_codes(self.checkpoint, *found)


@dataclass
class ArtifactLayers:
    """The model of an artifact directory, its decoder layers read one at a time (see the module doc)."""

    path: Path
    model: nn.Module
    parts: DecoderParts
    plan: Plan
    info: ModelInfo
    dtype: torch.dtype
    checkpoint: Checkpoint = field(repr=False)
    layer_prefix: str  # "model.layers"
    templates: list[nn.Module] = field(repr=False)  # per layer: a pristine copy on the meta device
    device: torch.device = torch.device("cpu")  # where the resident parts live and each layer is built

    @classmethod
    def open(cls, path: str | Path, *, dtype: torch.dtype = torch.bfloat16, checksums: bool = True,
             whole: bool = False, device: torch.device | str = "cpu") -> "ArtifactLayers":
        """The artifact in ``path`` with its embedding, final norm and head in place, activations in ``dtype``.
        An untied float embedding or head whose ``dtype`` copy would pass :data:`HEAD_LIMIT` bytes stays as stored
        (the embedding's output upcast, the head projected a slice of the vocabulary at a time by
        ``parts.project``); ``whole``: a model whose forward calls the head itself, so the head is in ``dtype``.
        ``device``: the compute device the resident parts go to and each layer is built on (packed modules in that
        device's layout).

        Every file is checked first (sizes, headers, ``checksums``: sha256) and every layer's tensor names against
        the plan, so a damaged or inconsistent artifact is named (:class:`ArtifactError`) before any layer runs."""
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoModelForCausalLM

        path = Path(path)
        manifest = verify_artifact(path, checksums=checksums)
        plan = Plan.load(path / PLAN)
        config = AutoConfig.from_pretrained(path)
        if hasattr(config, "quantization_config"):
            del config.quantization_config  # lsaq swaps modules itself; stock loading keeps it
        with init_empty_weights(include_buffers=False):  # parameters on meta, buffers (rotary tables) real
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        model.eval()
        device = torch.device(device)
        to_device(model, device)  # the buffers computed on the CPU (rotary tables)
        parts = decoder_parts(model)
        templates = [copy.deepcopy(layer) for layer in parts.layers]
        try:
            checkpoint = Checkpoint.open(path)
        except ValueError as e:
            raise ArtifactError(str(e)) from e
        prefix = family(config.model_type).layer_prefix
        info = ModelInfo.from_json(manifest["model"] | {"config": config.to_dict()})
        layers = cls(path, model, parts, plan, info, dtype, checkpoint, prefix, templates, device)
        layers._check_layer_names()
        layers._load_outside(whole)
        return layers

    def group(self, precision: Precision) -> int | None:
        """The group size of ``precision``'s codes: the policy's for INT4, none for INT8."""
        return self.plan.options.policy.group_size if precision is Precision.INT4 else None

    def _layer_names(self, index: int) -> dict[str, str]:
        """Layer ``index``'s artifact tensors: name within the layer -> name in the artifact."""
        start = f"{self.layer_prefix}.{index}."
        return {n[len(start):]: n for n in self.checkpoint.names(start)}

    def _check_layer_names(self) -> None:
        """Every layer holds exactly the tensors its precision in the plan gives it."""
        if len(self.plan.precisions) != len(self.templates):
            raise ArtifactError(f"{self.path}: the plan has {len(self.plan.precisions)} layers, the config "
                                f"{len(self.templates)}")
        for index, (precision, template) in enumerate(zip(self.plan.precisions, self.templates)):
            expected = set(template.state_dict())
            held = set(self._layer_names(index))
            if precision is not Precision.FP16:
                for lin in self.plan.shape.layer_linears:
                    expected.discard(f"{lin.name}.weight")
                    packed = f"{lin.name}.weight_packed" in held
                    expected |= {f"{lin.name}.{s}" for s in stored_suffixes(precision, self.group(precision), packed)}
            if held != expected:
                missing, extra = sorted(expected - held), sorted(held - expected)
                what = "is missing from its weights" if missing else "is not part of the plan's model"
                name = missing[0] if missing else extra[0]
                raise ArtifactError(f"{self.path}: tensor {self.layer_prefix}.{index}.{name} {what}")
        start = self.layer_prefix + "."
        for name in self.checkpoint.names(start):
            index = name[len(start):].partition(".")[0]
            if not index.isdigit() or int(index) >= len(self.templates):
                raise ArtifactError(f"{self.path}: tensor {name} is not in one of the plan's "
                                    f"{len(self.templates)} layers")

    def _load_outside(self, whole: bool = False) -> None:
        """Embedding, final norm and LM head (packed where the plan quantizes them), and every other tensor outside
        the decoder layers, in place."""
        policy, shape = self.plan.options.policy, self.plan.shape
        outside = set(self.checkpoint.names()) - {n for n in self.checkpoint.names(self.layer_prefix + ".")}
        taken: set[str] = set()

        def quantized(module: str, precision: Precision) -> QuantizedWeight:
            packed = f"{module}.weight_packed" in outside
            names = [f"{module}.{s}" for s in stored_suffixes(precision, self.group(precision), packed)]
            missing = [n for n in names if n not in outside]
            if missing:
                raise ArtifactError(f"{self.path}: tensor {missing[0]} is missing from its weights")
            taken.update(names)
            return read_codes(self.checkpoint, module, precision, self.group(precision), packed)

        if policy.embed is not Precision.FP16:
            qw = quantized(shape.embed.name.removesuffix(".weight"), policy.embed)
            like = self.model.get_input_embeddings()
            self.model.set_input_embeddings(QuantizedEmbedding.from_quantized(qw, self.dtype, like=like)
                                            .to(self.device))
        head = head_tensor(shape, policy)
        if head is not None and policy.head_precision is not Precision.FP16:
            qw = quantized(head.name.removesuffix(".weight"), policy.head_precision)
            self.model.set_output_embeddings(quantized_linear(qw, device=self.device))
        # A large float embedding or head of an untied model stays as stored (16 bits; see Skeleton.build); a tied
        # embedding is also the head, which a whole-model forward calls in self.dtype.
        large = shape.embed.numel * self.dtype.itemsize > HEAD_LIMIT and not self.model.config.tie_word_embeddings
        keep = {shape.embed.name} if large and policy.embed is Precision.FP16 else set()
        if large and not whole and head is not None and policy.head_precision is Precision.FP16:
            keep.add(head.name)
        rest = {n: t.to(self.device) if n in keep else t.to(self.device, self.dtype)
                for n, t in self.checkpoint.read(sorted(outside - taken)).items()}
        if shape.embed.name in keep and rest[shape.embed.name].dtype != self.dtype:
            self.model.get_input_embeddings().register_forward_hook(upcast_output(self.dtype))
        result = self.model.load_state_dict(rest, strict=False, assign=True)
        layer_keys = self.layer_prefix + "."
        missing = [k for k in result.missing_keys if not k.startswith(layer_keys)
                   and not (k == HEAD_WEIGHT and self.model.config.tie_word_embeddings)]
        if missing or result.unexpected_keys:
            raise ArtifactError(f"{self.path}: tensors do not match the model (missing {missing[:5]}, "
                                f"unexpected {result.unexpected_keys[:5]})")
        self.model.tie_weights()
        self.parts = decoder_parts(self.model)

    def load(self, index: int) -> nn.Module:
        """Decoder layer ``index`` built from the artifact: its INT8/INT4 linears packed, the rest in ``dtype``."""
        layer = self.parts.layers[index]
        names = self._layer_names(index)
        tensors = self.checkpoint.read(list(names.values()))  # as stored: codes, 16-bit scales and floats
        by_name = {rel: tensors[full] for rel, full in names.items()}
        precision = self.plan.precisions[index]
        if precision is not Precision.FP16:
            for lin in self.plan.shape.layer_linears:
                suffixes = stored_suffixes(precision, self.group(precision), f"{lin.name}.weight_packed" in by_name)
                stored = {s: by_name.pop(f"{lin.name}.{s}") for s in suffixes}
                bias = by_name.pop(f"{lin.name}.bias") if lin.bias else None
                qw = QuantizedWeight.from_compressed_tensors(stored, self.group(precision), precision)
                layer.set_submodule(lin.name, quantized_linear(qw, bias, self.device))
        layer.load_state_dict({n: t.to(self.device, self.dtype) for n, t in by_name.items()}, strict=False,
                              assign=True)
        empty = next((n for n, t in [*layer.named_parameters(), *layer.named_buffers()] if t.is_meta), None)
        if empty is not None:  # names were checked on opening: a module the plan's shape does not know
            raise ArtifactError(f"{self.path}: nothing in the artifact fills {self.layer_prefix}.{index}.{empty}")
        return layer

    def release(self, index: int) -> None:
        """Put layer ``index`` back on the meta device as it was built (its packed modules swapped out again) and
        return its memory to the system; a caller still holding the old module holds no memory."""
        self.parts.layers[index].to("meta")
        self.parts.layers[index] = copy.deepcopy(self.templates[index])
        trim_heap()


def load_quantized(path: str | Path, *, dtype: torch.dtype = torch.bfloat16, checksums: bool = True) -> LoadedModel:
    """Load an artifact onto lsaq's packed runtime, every layer resident: INT8/INT4 layers (and a quantized LM
    head) stay packed, a quantized embedding stays packed and dequantizes the rows it looks up; float parts and
    activations in ``dtype``."""
    from transformers import AutoTokenizer

    layers = ArtifactLayers.open(path, dtype=dtype, checksums=checksums, whole=True)
    load_every(layers, len(layers.templates))
    return LoadedModel(model=layers.model, tokenizer=AutoTokenizer.from_pretrained(path), info=layers.info)
