"""A model's decoder layers as something to load and release one at a time.

:class:`Skeleton` builds the model from its config with every parameter on the meta device and every buffer real
(rotary frequencies, Gemma's embedding scale: ``accelerate.init_empty_weights`` computes them as usual), then
materializes what every layer's walk needs at once: the embedding, the final norm and the LM head. A decoder
layer's float tensors are read from the checkpoint when the walk loads it and dropped when it releases it, so
resident memory is the skeleton plus one layer. :class:`Resident` is the same interface over a model already in
memory (loading and releasing cost nothing), so one walk serves both.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn

from lsaq.engine.checkpoint import Checkpoint
from lsaq.models.families import family
from lsaq.models.loading import empty_model
from lsaq.models.parts import DecoderParts, decoder_parts
from lsaq.resources import trim_heap

HEAD_LIMIT = 2**30  # bytes of a compute-dtype LM head above which it stays in the checkpoint's dtype


class Layers(Protocol):
    """Decoder layers a walk loads one at a time (:func:`lsaq.engine.walk.walk`)."""

    parts: DecoderParts

    def load(self, index: int) -> nn.Module:
        """Decoder layer ``index`` with its weights in place."""

    def release(self, index: int) -> None:
        """Drop what :meth:`load` put in memory."""


@dataclass
class Resident:
    """The layers of a model already in memory."""

    parts: DecoderParts

    def load(self, index: int) -> nn.Module:
        return self.parts.layers[index]

    def release(self, index: int) -> None:
        pass


@dataclass
class Skeleton:
    """The model of ``checkpoint`` with its decoder layers' parameters on the meta device; everything else
    (embedding, final norm, LM head, buffers) real, in ``dtype``."""

    checkpoint: Checkpoint
    model: nn.Module
    parts: DecoderParts
    dtype: torch.dtype
    layer_prefix: str  # "model.layers": layer i's tensors are named "model.layers.{i}.*"
    sources: list[dict[str, str]] = field(repr=False)  # per layer: its state's names -> the checkpoint's names
    templates: list[nn.Module] = field(repr=False)  # per layer: a pristine copy on the meta device
    device: torch.device = torch.device("cpu")  # where the resident parts live and each layer is loaded

    @classmethod
    def build(cls, checkpoint: Checkpoint, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False,
              head: bool = True, device: torch.device | str = "cpu") -> "Skeleton":
        """The skeleton of ``checkpoint``'s model; ``ValueError`` naming a tensor the checkpoint lacks or has
        too many of outside the decoder layers, before any layer is read.

        ``head``: materialize an untied LM head (False: it stays on the meta device, for stages that never
        project onto the vocabulary). A head whose ``dtype`` copy would pass :data:`HEAD_LIMIT` bytes stays in
        the checkpoint's 16-bit dtype: users of ``parts.lm_head.weight`` upcast it in slices of the vocabulary.
        An embedding above the same size stays 16-bit too, its output upcast to ``dtype`` (the rows as stored;
        Gemma's scaled embedding then multiplies in 16 bits). ``device``: where the resident parts and the buffers
        are put and each layer is loaded (the compute device).
        """
        device = torch.device(device)
        model_type = checkpoint.config.get("model_type")
        prefix = family(model_type, f" in {checkpoint.path / 'config.json'}").layer_prefix
        model = empty_model(checkpoint.path, dtype, trust_remote_code)
        to_device(model, device)
        parts = decoder_parts(model)
        templates = [copy.deepcopy(layer) for layer in parts.layers]
        names = model_names(model, checkpoint.names())
        head_names = {n for n, p in model.named_parameters(remove_duplicate=False) if p is parts.lm_head.weight}
        embed_names = {n for n, p in model.named_parameters(remove_duplicate=False) if p is parts.embed.weight}
        head_names -= embed_names
        outside = [n for n in names if not n.startswith(prefix + ".") and names[n] not in head_names]
        # A large embedding (a 128k vocabulary at width 8192: 4.2 GB in float32) stays in the checkpoint's dtype:
        # its rows are gathered there and upcast (exact for a plain embedding), see upcast_output.
        large_embed = parts.embed.weight.numel() * dtype.itemsize > HEAD_LIMIT
        as_stored = [n for n in outside if large_embed and names[n] in embed_names]
        resident = {names[n]: t.to(device) for n, t in checkpoint.read([n for n in outside if n not in as_stored],
                                                                      dtype).items()}
        resident.update({names[n]: t.to(device) for n, t in checkpoint.read(as_stored).items()})
        in_head = [n for n in names if names[n] in head_names]
        if head and in_head:
            large = parts.lm_head.weight.numel() * dtype.itemsize > HEAD_LIMIT
            resident.update({names[n]: t.to(device)
                             for n, t in checkpoint.read(in_head, None if large else dtype).items()})
        try:
            _, unexpected = model.load_state_dict(resident, strict=False, assign=True)
        except RuntimeError as e:  # a shape that is not the config's
            raise ValueError(f"{checkpoint.path}: {str(e).strip().splitlines()[-1].strip()}") from None
        if unexpected:
            raise ValueError(f"{checkpoint.path}: tensor {unexpected[0]!r} is not part of a {model_type} model")
        if parts.lm_head.weight.is_meta and getattr(model.config.get_text_config(), "tie_word_embeddings", False):
            parts.lm_head.weight = parts.embed.weight  # a tied head is the embedding itself
        parts = decoder_parts(model)
        if parts.embed.weight.dtype != dtype:
            parts.embed.register_forward_hook(upcast_output(dtype))
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            if tensor.is_meta and not name.startswith(prefix + ".") and (head or name not in head_names):
                raise ValueError(f"{checkpoint.path}: the checkpoint has no tensor {name!r}")
        by_layer: list[dict[str, str]] = [{} for _ in parts.layers]
        for source, name in names.items():
            index, _, rest = name[len(prefix) + 1:].partition(".")
            if name.startswith(prefix + ".") and index.isdigit() and int(index) < len(by_layer):
                by_layer[int(index)][rest] = source
            elif name.startswith(prefix + "."):
                raise ValueError(f"{checkpoint.path}: tensor {source!r} is not in one of the config's "
                                 f"{len(by_layer)} layers")
        for index, (sources, template) in enumerate(zip(by_layer, templates)):  # every layer whole, before any work
            expected = set(template.state_dict())
            if set(sources) != expected:
                missing, extra = sorted(expected - set(sources)), sorted(set(sources) - expected)
                what = f"has no tensor {prefix}.{index}.{missing[0]}" if missing else \
                    f"has an unexpected tensor {sources[extra[0]]!r}"
                raise ValueError(f"{checkpoint.path}: the checkpoint {what}")
        return cls(checkpoint, model, parts, dtype, prefix, by_layer, templates, device)

    def load(self, index: int) -> nn.Module:
        """Decoder layer ``index`` with its tensors read from the checkpoint in the skeleton's dtype."""
        layer = self.parts.layers[index]
        sources = self.sources[index]
        read = self.checkpoint.read(list(sources.values()), self.dtype)
        tensors = {name: read[source].to(self.device) for name, source in sources.items()}
        expected = self.templates[index].state_dict()
        for name, tensor in tensors.items():
            if tensor.shape != expected[name].shape:
                raise ValueError(f"{self.checkpoint.path}: tensor {self.layer_prefix}.{index}.{name} has shape "
                                 f"{tuple(tensor.shape)}, the config gives {tuple(expected[name].shape)}")
        layer.load_state_dict(tensors, strict=True, assign=True)
        return layer

    def release(self, index: int) -> None:
        """Put layer ``index`` back as it was built, on the meta device (also after a stage swapped its modules,
        as quantization does), and return its memory to the system.

        The old module's tensors go to the meta device first, so a caller still holding it (a loop variable until
        the next layer is loaded) holds no memory: otherwise two layers would be resident at each load."""
        self.parts.layers[index].to("meta")
        self.parts.layers[index] = copy.deepcopy(self.templates[index])
        trim_heap()


def upcast_output(dtype: torch.dtype):
    """A forward hook giving an embedding's output ``[B, T, H]`` in ``dtype`` (its weight stays 16-bit)."""

    def hook(_module: nn.Module, _inputs: object, output: torch.Tensor) -> torch.Tensor:
        return output.to(dtype)

    return hook


def to_device(model: nn.Module, device: torch.device) -> None:
    """Move ``model``'s real tensors to ``device`` and leave its meta parameters where they are (``Module.to``
    cannot copy a meta tensor): the rotary tables and other buffers a skeleton computes on the CPU."""
    if device.type == "cpu":
        return
    for module in model.modules():
        for name, buffer in module._buffers.items():  # torch keeps buffers there; no public setter keeps persistence
            if buffer is not None and not buffer.is_meta:
                module._buffers[name] = buffer.to(device)
        for name, param in module._parameters.items():
            if param is not None and not param.is_meta:
                module._parameters[name] = nn.Parameter(param.to(device), requires_grad=param.requires_grad)


def model_names(model: nn.Module, names: list[str]) -> dict[str, str]:
    """Each checkpoint tensor name -> the model's name for it, after transformers' own renamings for the family
    (``embed_out`` -> ``lm_head`` for gpt_neox, legacy ``gamma``/``beta`` norms): what ``from_pretrained`` does."""
    from transformers.conversion_mapping import WeightRenaming, get_model_conversion_mapping

    renamings = [t for t in get_model_conversion_mapping(model) if isinstance(t, WeightRenaming)]
    out = {}
    for source in names:
        name = source
        for renaming in renamings:
            name, _ = renaming.rename_source_key(name)
        out[source] = name
    return out
