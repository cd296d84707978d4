"""Calibrated quantization's inputs: the Hessians of a decoder layer's linears on the calibration activations that
reach it.

A walk of the engine (:mod:`lsaq.engine.walk`) brings each layer its inputs, per batch, and its own recorded call
arguments (:func:`lsaq.engine.calls.record_calls`); :func:`input_hessians` runs the layer on them with hooks on its
linears. Sequential GPTQ (:func:`lsaq.quantization.apply.quantize_layers`) quantizes each layer from the Hessians
of the hidden states the already-quantized layers produce, so its error compensation sees the activations the
quantized model will really produce; :func:`float_input_gptq` takes them from the float model instead (one layer
quantized at a time, for the measured loss). Memory: the hidden states (``N x T x hidden`` floats, e.g.
32 x 512 x 576 x 4 B = 38 MB for SmolLM2-135M) and one layer's Hessians (``in x in`` each).

All linears of a layer are measured from the same inputs (no "true sequential" re-measurement inside a layer).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from lsaq.engine.calls import Call, record_calls
from lsaq.engine.skeleton import Resident
from lsaq.engine.walk import walk
from lsaq.models.parts import DecoderParts
from lsaq.precision import Precision, Quantizer
from lsaq.quantization.gptq import HessianAccumulator, gptq_quantize
from lsaq.quantization.primitives import QuantizedWeight

CALIBRATION_BATCH = 8  # sequences per recorded call


def check_quantizer(quantizer: "Quantizer | str", calibration: Any, what: str = "a calibration directory") -> Quantizer:
    """The parsed quantizer, after checking it comes with calibration data (``gptq``: ``what``) or without
    (``rtn``); ``ValueError`` naming the quantizer otherwise."""
    quantizer = Quantizer.parse(quantizer)
    if quantizer is Quantizer.GPTQ and calibration is None:
        raise ValueError(f"quantizer {quantizer.value!r} needs {what} (calibration=...)")
    if quantizer is Quantizer.RTN and calibration is not None:
        given = calibration if isinstance(calibration, (str, Path)) else type(calibration).__name__
        raise ValueError(f"quantizer {quantizer.value!r} takes no calibration (got {given})")
    return quantizer


def input_hessians(layer: nn.Module, names: list[str], calls: Sequence[Call], inputs: Sequence[torch.Tensor],
                   index: int = 0) -> dict[str, torch.Tensor]:
    """GPTQ's Hessian ``2/n X^T X [in, in]`` of each named linear of ``layer`` (decoder layer ``index``), over every
    token of ``inputs`` (per batch ``[B, T, H]``, the layer called as ``calls`` recorded it).

    Linears called on the very same input tensor one after the other (q/k/v, gate/up) share one sum and one
    Hessian tensor: the same values as separate ones, a third (a half) of the memory."""
    # fp32 sums, or fp64 for a float64 layer (whose activations fp32 would round)
    wide = any(p.dtype == torch.float64 for p in layer.parameters())
    dtype = torch.float64 if wide else torch.float32
    accumulators: dict[str, HessianAccumulator] = {}
    last: list[Any] = [None, None]  # (input, accumulator) of the latest linear called

    def pre_hook(name: str) -> Callable[..., None]:
        def add(_module: nn.Module, args: tuple[Any, ...]) -> None:
            x, same = args[0], args[0] is last[0]
            if name not in accumulators:  # decided on the first call
                accumulators[name] = last[1] if same else HessianAccumulator(x.shape[-1], dtype)
            if not (same and accumulators[name] is last[1]):
                accumulators[name].add(x)
            last[:] = [x, accumulators[name]]
        return add

    hooks = [layer.get_submodule(n).register_forward_pre_hook(pre_hook(n)) for n in names]
    try:
        with torch.inference_mode():
            for call, h in zip(calls, inputs):
                call(layer, h)
    finally:
        for h in hooks:
            h.remove()
        last.clear()
    made: dict[int, torch.Tensor] = {}  # id(accumulator) -> its Hessian
    out: dict[str, torch.Tensor] = {}
    for n in names:
        if n not in accumulators:
            raise ValueError(f"linear {n} of layer {index} was not called on the calibration tokens")
        acc = accumulators[n]
        if id(acc) not in made:
            made[id(acc)] = acc.hessian()
        out[n] = made[id(acc)]
    return out


Spec = tuple[Precision, "int | None"]  # (precision, INT4 group size or None)


def float_input_gptq(
    parts: DecoderParts,
    tokens: torch.Tensor,
    specs: Sequence[Spec],
    *,
    act_order: bool = True,
    progress: Callable[[int], None] | None = None,
) -> list[dict[Spec, dict[str, QuantizedWeight]]]:
    """Per decoder layer, every ``nn.Linear`` GPTQ-quantized at every ``(precision, group_size)`` of ``specs``, with
    the Hessian of the *float* model's activations on ``tokens [N, L]``: ``bank[layer][spec][linear name]``.

    That is the quantized layer a one-layer measurement needs (only that layer quantized, so its inputs are float;
    :func:`lsaq.importance.cost.measure_layer_loss`). A whole model quantized for real streams quantized inputs
    instead (:func:`lsaq.quantization.apply.quantize_model`). One walk over the layers (:mod:`lsaq.engine`); memory:
    the hidden states, one layer's Hessians, and the packed bank (INT8 + INT4 codes: 3/4 of the model's fp16 bytes).
    """
    calls = record_calls(parts, tokens, CALIBRATION_BATCH)
    bank: list[dict[Spec, dict[str, QuantizedWeight]]] = []

    def visit(i: int, layer: nn.Module, inputs: Sequence[torch.Tensor], _outputs: Sequence[torch.Tensor]) -> None:
        names = [n for n, m in layer.named_modules() if isinstance(m, nn.Linear)]
        hessians = input_hessians(layer, names, calls.calls[i], inputs, i)
        bank.append({spec: {n: gptq_quantize(layer.get_submodule(n).weight, hessians[n], spec[0], spec[1],
                                             act_order=act_order) for n in names} for spec in specs})
        if progress is not None:
            progress(i)

    walk(Resident(parts), calls, visit)  # the float layers: each layer's float inputs
    return bank
