"""Apply a plan to a loaded float model: swap each decoder layer's linears for packed quantized modules.

"Decide" (:mod:`lsaq.planning.planner`) produced per-layer precisions from shapes alone; this module checks the plan
against the real model and quantizes layer by layer. Each float weight is released as soon as its quantized
module replaces it, so peak memory stays near the float model plus one layer's temporaries.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from lsaq.models.identity import ModelInfo
from lsaq.models.parts import DecoderParts, decoder_parts
from lsaq.planning.planner import Plan
from lsaq.precision import Precision
from lsaq.quantization.qlinear import Int4Linear, Int8Linear
from lsaq.quantization.primitives import QuantizedWeight
from lsaq.models.families import model_shape


QUANTIZED_LINEARS = (Int8Linear, Int4Linear)


def quantized_linear(qw: QuantizedWeight, bias: torch.Tensor | None = None) -> nn.Module:
    """The packed runtime module for one quantized weight (INT8 or INT4)."""
    cls = Int8Linear if qw.precision is Precision.INT8 else Int4Linear
    return cls.from_quantized(qw, bias)


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


def quantize_model(
    model: nn.Module,
    info: ModelInfo,
    plan: Plan,
    *,
    progress: Callable[[int], None] | None = None,
) -> nn.Module:
    """Quantize ``model`` in place following ``plan`` and return it.

    INT8/INT4 layers get packed modules (:mod:`lsaq.quantization.qlinear`); FP16 layers and the rest (norms, embeddings, the
    LM head under the default policy) are cast to fp16. The model's activations then run in the dtype the
    caller picks with ``model.to(dtype)`` for float parts; packed modules follow their input's dtype.
    """
    parts = decoder_parts(model)
    check_plan(plan, info, parts)
    policy = plan.options.policy
    if policy.embed is not Precision.FP16 or policy.head_precision is not Precision.FP16:
        raise ValueError(
            f"embedding/LM head policy {policy.embed.value}/{policy.head_precision.value} is not supported by the "
            "quantizer yet; valid: fp16 (plan with the default embedding policy)"
        )
    with torch.inference_mode():
        for i, (layer, precision) in enumerate(zip(parts.layers, plan.precisions)):
            for lin in plan.shape.layer_linears:
                float_linear = layer.get_submodule(lin.name)
                if precision is Precision.FP16:
                    float_linear.to(torch.float16)
                    continue
                qw = QuantizedWeight.quantize(float_linear.weight, precision, plan.options.policy.group_size)
                bias = float_linear.bias.detach().to(torch.float16) if float_linear.bias is not None else None
                _set_submodule(layer, lin.name, quantized_linear(qw, bias))
                del float_linear  # the float weight goes with the last reference
            for p in layer.parameters():  # norms (and FP16 linears) of the layer
                p.data = p.data.to(torch.float16)
            if progress is not None:
                progress(i)
        for p in model.parameters():
            p.data = p.data.to(torch.float16)
    model.config.dtype = torch.float16
    return model


def artifact_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Tensors of the artifact, compressed-tensors names: plain codes for quantized linears, fp16 otherwise.

    A tied LM head is stored once, under the embedding's name (as ``save_pretrained`` does).
    """
    out: dict[str, torch.Tensor] = {}
    quantized_prefixes = []
    for name, module in model.named_modules():
        if isinstance(module, QUANTIZED_LINEARS):
            quantized_prefixes.append(name + ".")
            for suffix, t in module.to_quantized_weight().compressed_tensors().items():
                out[f"{name}.{suffix}"] = t.contiguous()
            if module.bias is not None:
                out[f"{name}.bias"] = module.bias.detach().to(torch.float16).contiguous()
    seen: set[int] = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if any(name.startswith(q) for q in quantized_prefixes):
            continue
        if id(p) in seen:  # tied weights: keep the first name (the embedding)
            continue
        seen.add(id(p))
        out[name] = p.detach().to(torch.float16).contiguous()
    return out
