"""Apply a plan to a loaded float model: swap each decoder layer's linears for packed quantized modules, and the
token embedding and LM head when the plan's weight policy quantizes them.

"Decide" (:mod:`lsaq.planning.planner`) produced per-layer precisions from shapes alone; this module checks the plan
against the real model and quantizes layer by layer. Each float weight is released as soon as its quantized
module replaces it, so peak memory stays near the float model plus one layer's temporaries.

Every 16-bit tensor (FP16 layers, norms, float embedding/head, biases, quantization scales) is stored in
:func:`lsaq.models.loading.storage_dtype` of the source's declared dtype: bfloat16 unless the source says float16.
``Precision.FP16`` ("fp16" in plans) means this 16-bit float, whichever it is.
"""

from __future__ import annotations

from typing import Callable, Iterator, Sequence

import torch
from torch import nn

from lsaq.engine.calls import record_calls
from lsaq.engine.skeleton import Layers, Resident
from lsaq.engine.walk import layer_steps, walk_steps
from lsaq.models.families import model_shape
from lsaq.models.identity import ModelInfo
from lsaq.models.loading import storage_dtype
from lsaq.models.parts import DecoderParts, decoder_parts
from lsaq.planning.memory import WeightPolicy, head_tensor
from lsaq.planning.planner import Plan
from lsaq.precision import Precision
from lsaq.quantization.gptq import gptq_quantize
from lsaq.quantization.primitives import QuantizedWeight
from lsaq.quantization.qembedding import QuantizedEmbedding
from lsaq.quantization.qlinear import Int4Linear, Int8Linear
from lsaq.precision import Quantizer
from lsaq.quantization.sequential import CALIBRATION_BATCH, check_quantizer, input_hessians

QUANTIZED_MODULES = (Int8Linear, Int4Linear, QuantizedEmbedding)


def quantized_linear(qw: QuantizedWeight, bias: torch.Tensor | None = None,
                     device: torch.device | str | None = None) -> nn.Module:
    """The packed runtime module for one quantized weight (INT8 or INT4), built on ``device`` (default: where the
    codes are), so its packing is that device's (the CPU kernels' layout only on the CPU)."""
    cls = Int8Linear if qw.precision is Precision.INT8 else Int4Linear
    return cls.from_quantized(qw, bias, device)


class PlanMismatchError(ValueError):
    """The plan was made for another model (identity, layer count, architecture or shapes differ)."""


def check_plan(plan: Plan, info: ModelInfo, parts: DecoderParts) -> None:
    """Refuse a plan that does not describe this model, naming the first difference."""
    planned = plan.model
    if planned.content_hash and planned.content_hash != info.content_hash:
        raise PlanMismatchError(
            f"plan was made for model {planned.name!r} with content hash {planned.content_hash[:16]}..., "
            f"but {info.id!r} has content hash {info.content_hash[:16]}...; score and plan this model first"
        )
    if plan.shape.model_type != info.model_type:
        raise PlanMismatchError(f"plan is for architecture {plan.shape.model_type!r}, model is {info.model_type!r}")
    if plan.shape.num_layers != len(parts.layers):
        raise PlanMismatchError(f"plan has {plan.shape.num_layers} layers, model {info.id!r} has {len(parts.layers)}")
    expected = model_shape(info.config)
    if expected.to_json() != plan.shape.to_json():
        raise PlanMismatchError(f"plan's tensor shapes differ from model {info.id!r}'s config")
    for lin in plan.shape.layer_linears:
        module = parts.layers[0].get_submodule(lin.name)
        if not isinstance(module, nn.Linear) or tuple(module.weight.shape) != (lin.out_features, lin.in_features):
            got = tuple(module.weight.shape) if hasattr(module, "weight") else type(module).__name__
            raise PlanMismatchError(f"layer 0 {lin.name}: plan expects [{lin.out_features}, {lin.in_features}], model has {got}")


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


def quantize_embeddings(model: nn.Module, plan: Plan, dtype: torch.dtype) -> None:
    """Quantize the token embedding and LM head in place as ``plan.options.policy`` says (float ones are cast to
    ``dtype``, which also holds the scales).

    A tied model whose policy quantizes either is untied first (:meth:`WeightPolicy.unties`): the head gets its own
    matrix and ``config.tie_word_embeddings`` becomes False, so the artifact stores both, as the byte model counts.
    """
    policy: WeightPolicy = plan.options.policy
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    weight = embed.weight  # [vocab, hidden]; also the head's when tied
    quantized_head = head_tensor(plan.shape, policy) is not None and policy.head_precision is not Precision.FP16
    if quantized_head and getattr(head, "bias", None) is not None:  # no supported family has one
        raise ValueError(f"an LM head with a bias ({type(head).__name__}) cannot be quantized to "
                         f"{policy.head_precision.value}; valid head precision for this model: fp16")

    def group(precision: Precision) -> int | None:
        return policy.group_size if precision is Precision.INT4 else None

    if policy.unties(plan.shape):
        if policy.head_precision is Precision.FP16:
            head.weight = nn.Parameter(weight.detach().to(dtype), requires_grad=False)
        model.config.tie_word_embeddings = False
    if quantized_head:
        p = policy.head_precision
        model.set_output_embeddings(quantized_linear(QuantizedWeight.quantize(head.weight.detach(), p, group(p), dtype)))
    if policy.embed is not Precision.FP16:
        qw = QuantizedWeight.quantize(weight.detach(), policy.embed, group(policy.embed), dtype)
        model.set_input_embeddings(QuantizedEmbedding.from_quantized(qw, dtype, like=embed))
    del weight, embed, head  # float matrices go with their last reference


def quantize_layer(layer: nn.Module, precision: Precision, names: list[str], group_size: int | None,
                   dtype: torch.dtype, hessians: dict[str, torch.Tensor] | None = None, cast: bool = True) -> None:
    """Quantize one float decoder layer in place: its linears ``names`` at ``precision`` become packed modules
    (INT4 in groups of ``group_size``), and unless not ``cast`` everything else is cast to ``dtype``
    (:func:`cast_layer`). With ``hessians`` (GPTQ: each linear's input Hessian, :func:`~lsaq.quantization.
    sequential.input_hessians`) the codes come from them, each Hessian dropped once its linear is quantized;
    without, weights are rounded to nearest."""
    quantized = precision is not Precision.FP16
    hessians = hessians if quantized and hessians is not None else None
    for name in names if quantized else ():  # FP16 linears are cast with the layer's other parameters
        float_linear = layer.get_submodule(name)
        g = group_size if precision is Precision.INT4 else None
        w = float_linear.weight
        qw = (gptq_quantize(w, hessians.pop(name), precision, g, dtype, act_order=True) if hessians is not None
              else QuantizedWeight.quantize(w, precision, g, dtype))
        bias = float_linear.bias.detach().to(dtype) if float_linear.bias is not None else None
        _set_submodule(layer, name, quantized_linear(qw, bias))
        del float_linear, w  # the float weight goes with the last reference
    if cast:
        cast_layer(layer, dtype)


def cast_layer(layer: nn.Module, dtype: torch.dtype) -> None:
    """Cast a layer's float parameters (norms, FP16 linears) to ``dtype``, in place."""
    for p in layer.parameters():
        p.data = p.data.to(dtype)


def quantize_layers(layers: Layers, plan: Plan, dtype: torch.dtype, calibration: torch.Tensor | None = None,
                    progress: Callable[[int], None] | None = None) -> Iterator[tuple[int, nn.Module]]:
    """Quantize every decoder layer of ``layers`` following ``plan``, one at a time (:mod:`lsaq.engine`): yield
    ``(i, layer i quantized)`` while it is loaded. ``calibration`` (token ids ``[N, T]``): GPTQ, each layer's codes
    from the Hessians of the hidden states the already-quantized layers produce (the walk runs each layer once
    quantized, its float parts still in float: those are the next layer's inputs); else round to nearest, and
    no layer runs."""
    names = [lin.name for lin in plan.shape.layer_linears]
    group = plan.options.policy.group_size
    if calibration is None:
        for i, layer in layer_steps(layers, plan.shape.num_layers):
            with torch.inference_mode():
                quantize_layer(layer, plan.precisions[i], names, group, dtype)
            yield i, layer
            if progress is not None:
                progress(i)
        return
    calls = record_calls(layers.parts, calibration, CALIBRATION_BATCH)

    def prepare(i: int, layer: nn.Module, inputs: Sequence[torch.Tensor]) -> None:
        quantized = plan.precisions[i] is not Precision.FP16
        hessians = input_hessians(layer, names, calls.calls[i], inputs, i) if quantized else None
        quantize_layer(layer, plan.precisions[i], names, group, dtype, hessians, cast=False)

    for i, layer, _inputs, _outputs in walk_steps(layers, calls, prepare):
        with torch.inference_mode():
            cast_layer(layer, dtype)
        yield i, layer
        if progress is not None:
            progress(i)


def quantize_model(
    model: nn.Module,
    info: ModelInfo,
    plan: Plan,
    *,
    progress: Callable[[int], None] | None = None,
    quantizer: Quantizer | str = Quantizer.RTN,
    calibration: torch.Tensor | None = None,
) -> nn.Module:
    """Quantize ``model`` in place following ``plan`` and return it.

    ``quantizer``: ``rtn`` rounds each weight to nearest; ``gptq`` chooses the codes with GPTQ's error feedback on
    the activations of the calibration token ids ``calibration [N, L]``, streamed layer by layer
    (:func:`quantize_layers`), columns in activation order (on the default model, all-INT4: KL to the float model
    0.72x RTN's with it, 0.77x without; tests/test_gptq_model.py). Both give the same tensors, shapes and bytes.

    INT8/INT4 layers get packed modules (:mod:`lsaq.quantization.qlinear`); the embedding and LM head are
    quantized when the plan's policy says so (:func:`quantize_embeddings`); FP16 layers and everything else
    (norms, float embedding/head, biases) and all scales are cast to ``storage_dtype(info.dtype)`` (bfloat16 unless
    the source declares float16), which ``model.config.dtype`` then declares. The model's activations run in the
    dtype the caller picks with ``model.to(dtype)`` for float parts; packed linears follow their input's dtype.
    """
    parts = decoder_parts(model)
    check_plan(plan, info, parts)
    check_quantizer(quantizer, calibration, what="calibration token ids")
    dtype = storage_dtype(info.dtype)
    for _ in quantize_layers(Resident(parts), plan, dtype, calibration, progress):
        pass
    with torch.inference_mode():
        quantize_embeddings(model, plan, dtype)
        for p in model.parameters():
            p.data = p.data.to(dtype)
    model.config.dtype = dtype
    return model


def artifact_state_dict(model: nn.Module, dtype: torch.dtype, skip: str | None = None) -> dict[str, torch.Tensor]:
    """Tensors of the artifact, compressed-tensors names: packed codes and scales for quantized linears (an INT8
    embedding's codes plain), ``dtype`` for every float tensor; names starting with ``skip`` left out (a streamed
    model's decoder layers, written layer by layer).

    A tied LM head is stored once, under the embedding's name (as ``save_pretrained`` does).
    """
    out: dict[str, torch.Tensor] = {}
    quantized_prefixes = []
    for name, module in model.named_modules():
        if skip and name.startswith(skip):
            continue
        if isinstance(module, QUANTIZED_MODULES):
            quantized_prefixes.append(name + ".")
            # INT8 linears as 8-bit words (what vLLM serves), an INT8 embedding as plain codes (what stock loads)
            packed = not isinstance(module, QuantizedEmbedding)
            for suffix, t in module.to_quantized_weight().compressed_tensors(pack_int8=packed).items():
                out[f"{name}.{suffix}"] = t.contiguous()
            bias = getattr(module, "bias", None)
            if bias is not None:
                out[f"{name}.bias"] = bias.detach().to(dtype).contiguous()
    seen: set[int] = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if (skip and name.startswith(skip)) or any(name.startswith(q) for q in quantized_prefixes):
            continue
        if id(p) in seen:  # tied weights: keep the first name (the embedding)
            continue
        seen.add(id(p))
        out[name] = p.detach().to(dtype).contiguous()
    return out

