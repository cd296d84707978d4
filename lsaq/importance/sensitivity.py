"""Measured layer sensitivity: how far the model's next-token distribution moves when one layer is quantized.

For decoder layer ``i``, sensitivity_i is the mean (over positions and samples) of
``KL(p_float || p_i)``, where ``p_float`` is the float model's next-token distribution and ``p_i`` the
distribution with only layer ``i``'s linears quantized (per-channel INT4 by default, the lowest precision the
planner uses) and every other layer float. It is the ground truth that the cheap proxies (``jaccard``,
``cosine``) try to predict, and it is usable by the planner as an importance itself (non-negative, in nats).

Cost: one float forward pass per batch that records every layer's input and call arguments, then for each layer
``i`` a replay of layers ``i..L-1`` from the recorded input (about ``L/2`` extra forward passes in total) and one
LM-head projection. The replay calls each layer with exactly the arguments the model passed it (rotary
embeddings, masks), so it works for any family :func:`lsaq.models.loading.decoder_parts` supports.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from lsaq.calibration.sets import CalibrationSet
from lsaq.importance.similarity import kl_divergence
from lsaq.methods import SENSITIVITY_PROBE
from lsaq.models.parts import DecoderParts, decoder_parts, layer_output
from lsaq.precision import Precision
from lsaq.quantization.primitives import QuantizedWeight


@contextmanager
def quantized_layer(layer: nn.Module, precision: Precision, group_size: int | None = None,
                    weights: Mapping[str, QuantizedWeight] | None = None) -> Iterator[None]:
    """Within the block, every ``nn.Linear`` of ``layer`` holds its ``precision`` round trip (codes -> weights).

    The weights are the exact dequantized values of :meth:`QuantizedWeight.quantize` (or of ``weights[name]``,
    codes chosen elsewhere, e.g. by GPTQ), i.e. what the packed runtime multiplies by; the float weights are
    restored on exit.
    """
    saved: list[tuple[nn.Linear, torch.Tensor]] = []
    try:
        for name, module in layer.named_modules():
            if isinstance(module, nn.Linear):
                w = module.weight.data
                saved.append((module, w))
                qw = weights[name] if weights is not None else QuantizedWeight.quantize(w, precision, group_size)
                module.weight.data = qw.dequantize(w.dtype)
        yield
    finally:
        for module, w in saved:
            module.weight.data = w


def _head_logits(parts: DecoderParts, h: torch.Tensor) -> torch.Tensor:
    """``h`` ``[P, H]`` (last layer output) -> next-token logits ``[P, V]``, fp32 (fp64 for a float64 model)."""
    logits = parts.logits(h)
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


def _kl_per_sample(parts: DecoderParts, ref: torch.Tensor, h: torch.Tensor, chunk: int) -> torch.Tensor:
    """Mean over positions of KL(ref || lens(h)) per sample, float64 ``[B]``. ``ref``: ``[B, T, V]`` logits of
    the float model; ``h``: ``[B, T, H]``."""
    b, t = h.shape[:2]
    flat_h, flat_ref = h.reshape(b * t, -1), ref.view(b * t, -1)
    kl = torch.empty(b * t, dtype=torch.float64)
    for s in range(0, b * t, chunk):
        kl[s : s + chunk] = kl_divergence(flat_ref[s : s + chunk], _head_logits(parts, flat_h[s : s + chunk]))
    return kl.view(b, t).mean(-1)


@dataclass(frozen=True)
class Probe:
    """One way of quantizing a layer for measurement: INT8, INT4 per-channel (``group_size`` None) or INT4 in
    groups of ``group_size`` input columns."""

    precision: Precision
    group_size: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "precision", Precision.parse(self.precision))
        if self.precision is Precision.FP16:
            raise ValueError("sensitivity needs a quantized probe precision (fp16 is the reference); valid: int8, int4")
        if self.group_size is not None and self.precision is not Precision.INT4:
            raise ValueError(f"group_size applies to int4 only, got {self.precision.value} with {self.group_size}")

    @property
    def label(self) -> str:
        """``int8``, ``int4`` or ``int4-g<size>``."""
        return self.precision.value + (f"-g{self.group_size}" if self.group_size else "")

    @classmethod
    def parse(cls, label: "str | Probe") -> "Probe":
        """The probe of a :attr:`label`; ``ValueError`` naming the bad label and the valid forms."""
        if isinstance(label, Probe):
            return label
        text = str(label).lower()
        precision, _, group = text.partition("-g")
        try:
            return cls(Precision.parse(precision), int(group) if group else None)
        except ValueError as e:
            raise ValueError(f"unknown probe {label!r} ({e}); valid: int8, int4, int4-g<group size>") from None


def sensitivity_samples(
    model: nn.Module,
    calib: CalibrationSet,
    *,
    precision: Precision | str = SENSITIVITY_PROBE,
    group_size: int | None = None,
    batch_size: int = 4,
    chunk: int = 1024,
    progress: Callable[[int], None] | None = None,
) -> np.ndarray:
    """Per-sample, per-layer sensitivity ``[N, num_layers]`` (float64, nats), see the module docstring."""
    probe = Probe(Precision.parse(precision), group_size)
    return probe_samples(model, calib, [probe], batch_size=batch_size, chunk=chunk, progress=progress)[0]


def probe_samples(
    model: nn.Module,
    calib: CalibrationSet,
    probes: Sequence[Probe],
    *,
    batch_size: int = 4,
    chunk: int = 1024,
    progress: Callable[[int], None] | None = None,
    bank: Sequence[Mapping[Probe, Mapping[str, QuantizedWeight]]] | None = None,
    stride: int = 1,
) -> np.ndarray:
    """Per-probe, per-sample, per-layer KL to the float model ``[P, N, num_layers]`` (float64, nats): for each
    probe and layer, only that layer quantized that way. Every probe shares one float pass per batch (the reference
    logits and every layer's recorded input). ``bank[layer][probe][linear name]``: codes chosen by
    another quantizer (:func:`lsaq.quantization.sequential.float_input_gptq`); None rounds to nearest.
    ``stride``: the KL is taken at every ``stride``-th position only (the last of each run of ``stride``), which
    divides the LM-head projections (``[positions, vocab]`` per layer and probe) by ``stride``; every position still
    flows through the replayed layers, so attention sees the whole context."""
    if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1:
        raise ValueError(f"stride must be a positive integer, got {stride!r}")
    if not probes:
        raise ValueError("give at least one probe (int8, int4, int4-g<size>)")
    parts = decoder_parts(model)
    layers = list(parts.layers)
    n, n_layers = calib.samples, len(layers)
    scores = np.zeros((len(probes), n, n_layers), dtype=np.float64)
    calls: list[tuple[tuple, dict] | None] = [None] * n_layers
    last: dict[str, torch.Tensor] = {}

    def record(index: int) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            calls[index] = (args, dict(kwargs))

        return hook

    def keep_last(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        last["h"] = layer_output(output)

    handles = [layer.register_forward_pre_hook(record(i), with_kwargs=True) for i, layer in enumerate(layers)]
    handles.append(layers[-1].register_forward_hook(keep_last, with_kwargs=True))
    try:
        with torch.inference_mode():
            for s in range(0, n, batch_size):
                ids = calib.tokens[s : s + batch_size]  # [B, T]
                parts.base(input_ids=ids, use_cache=False)
                kept = last["h"][:, stride - 1 :: stride]  # [B, T', H], T' = T // stride positions scored
                b, t = kept.shape[:2]
                ref = torch.cat([_head_logits(parts, c) for c in kept.reshape(b * t, -1).split(chunk)]).view(b, t, -1)
                recorded = list(calls)
                for i in range(n_layers):
                    for k, probe in enumerate(probes):
                        weights = bank[i][probe] if bank is not None else None
                        with quantized_layer(layers[i], probe.precision, probe.group_size, weights):
                            h = _replay(layers, recorded, i)[:, stride - 1 :: stride]
                        scores[k, s : s + b, i] = _kl_per_sample(parts, ref, h, chunk).numpy()
                del ref
                if progress is not None:
                    progress(b)
    finally:
        for handle in handles:
            handle.remove()
    return scores


def _replay(layers: list[nn.Module], recorded: list[tuple[tuple, dict] | None], start: int) -> torch.Tensor:
    """Run layers ``start..`` from layer ``start``'s recorded input, each with its recorded other arguments."""
    h: torch.Tensor | None = None
    for j in range(start, len(layers)):
        entry = recorded[j]
        assert entry is not None, f"layer {j} was not called in the float pass"
        args, kwargs = entry
        if h is None:  # the recorded input of the first replayed layer
            h = args[0] if args else kwargs["hidden_states"]
        if args:
            out = layers[j](h, *args[1:], **kwargs)
        else:
            out = layers[j](**{**kwargs, "hidden_states": h})
        h = layer_output(out)
    assert h is not None
    return h
