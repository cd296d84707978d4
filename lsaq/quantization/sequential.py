"""Calibrated quantization, streamed layer by layer: the inputs of decoder layer i come from layers 0..i-1 already
quantized, so each layer's error compensation (GPTQ, :mod:`lsaq.quantization.gptq`) sees the activations the
quantized model will really produce.

:class:`LayerFeed` holds the calibration activations entering the current decoder layer: one recorded call
``(args, kwargs)`` per batch, captured at layer 0 by running the model's embedding (and whatever precedes the
first layer: rotary position embeddings, masks) on the calibration tokens. For each layer it measures every
linear's input Hessian (:meth:`LayerFeed.hessians`), and once the layer is quantized it runs the layer to
produce the next layer's inputs (:meth:`LayerFeed.advance`). Memory: the model, the feed (``N x L x hidden``
floats, e.g. 32 x 512 x 576 x 4 B = 38 MB for SmolLM2-135M) and one layer's Hessians (``in x in`` each).

All linears of a layer are measured from the same inputs (no "true sequential" re-measurement inside a layer).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

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


class _Captured(Exception):
    """Raised by the capture hook: the rest of the model is not needed."""


@dataclass
class LayerFeed:
    """The calibration inputs of the current decoder layer: ``calls[b] = (args, kwargs)`` for batch ``b``, where
    the hidden states ``[batch, L, hidden]`` are ``args[0]`` (or ``kwargs["hidden_states"]``)."""

    calls: list[tuple[tuple[Any, ...], dict[str, Any]]]

    @classmethod
    def capture(cls, model: nn.Module, parts: DecoderParts, tokens: torch.Tensor,
                batch_size: int = CALIBRATION_BATCH) -> "LayerFeed":
        """Record the first decoder layer's calls for the token ids ``tokens [N, L]`` (int64), in batches."""
        if tokens.dim() != 2 or tokens.dtype != torch.int64 or tokens.shape[0] == 0:
            raise ValueError(f"calibration tokens must be int64 [N, L] with N >= 1, got {tokens.dtype} "
                             f"{tuple(tokens.shape)}")
        calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = []

        def record(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            calls.append((args, dict(kwargs)))
            raise _Captured

        hook = parts.layers[0].register_forward_pre_hook(record, with_kwargs=True)
        try:
            with torch.inference_mode():
                for start in range(0, tokens.shape[0], batch_size):
                    try:
                        model(input_ids=tokens[start:start + batch_size], use_cache=False)
                    except _Captured:
                        pass
        finally:
            hook.remove()
        assert len(calls) == -(-tokens.shape[0] // batch_size), "the first decoder layer was not reached"
        return cls(calls)

    def run(self, layer: nn.Module) -> list[torch.Tensor]:
        """``layer``'s output hidden states ``[batch, L, hidden]`` for every recorded call."""
        outs = []
        with torch.inference_mode():
            for args, kwargs in self.calls:
                out = layer(*args, **kwargs)
                outs.append(out[0] if isinstance(out, tuple) else out)
        return outs

    def hessians(self, layer: nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
        """GPTQ's Hessian ``2/n X^T X [in, in]`` of each named linear of ``layer``, over every calibration token."""
        # fp32 sums, or fp64 for a float64 layer (whose activations fp32 would round)
        wide = any(p.dtype == torch.float64 for p in layer.parameters())
        dtype = torch.float64 if wide else torch.float32
        accumulators = {n: HessianAccumulator(layer.get_submodule(n).in_features, dtype) for n in names}
        hooks = [layer.get_submodule(n).register_forward_pre_hook(
            lambda _m, args, acc=accumulators[n]: acc.add(args[0])) for n in names]
        try:
            self.run(layer)
        finally:
            for h in hooks:
                h.remove()
        return {n: acc.hessian() for n, acc in accumulators.items()}

    def advance(self, layer: nn.Module) -> None:
        """Replace the recorded hidden states by ``layer``'s outputs: the feed of the next layer."""
        for b, ((args, kwargs), hidden) in enumerate(zip(self.calls, self.run(layer))):
            if args:
                self.calls[b] = ((hidden, *args[1:]), kwargs)
            else:
                self.calls[b] = (args, {**kwargs, "hidden_states": hidden})


Spec = tuple[Precision, "int | None"]  # (precision, INT4 group size or None)


def float_input_gptq(
    model: nn.Module,
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
    instead (:func:`lsaq.quantization.apply.quantize_model`). Memory: the feed, one layer's Hessians, and the packed
    bank (INT8 + INT4 codes: 3/4 of the model's fp16 bytes).
    """
    feed = LayerFeed.capture(model, parts, tokens)
    bank: list[dict[Spec, dict[str, QuantizedWeight]]] = []
    with torch.inference_mode():
        for i, layer in enumerate(parts.layers):
            names = [n for n, m in layer.named_modules() if isinstance(m, nn.Linear)]
            hessians = feed.hessians(layer, names)
            bank.append({spec: {n: gptq_quantize(layer.get_submodule(n).weight, hessians[n], spec[0], spec[1],
                                                 act_order=act_order) for n in names} for spec in specs})
            del hessians
            if i + 1 < len(parts.layers):
                feed.advance(layer)  # the float layer: the next layer's float inputs
            if progress is not None:
                progress(i)
    return bank
