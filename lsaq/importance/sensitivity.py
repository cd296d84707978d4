"""Measured layer sensitivity: how far the model's next-token distribution moves when one layer is quantized.

For decoder layer ``i``, sensitivity_i is the mean (over positions and samples) of
``KL(p_float || p_i)``, where ``p_float`` is the float model's next-token distribution and ``p_i`` the
distribution with only layer ``i``'s linears quantized (per-channel INT4 by default, the lowest precision the
planner uses) and every other layer float. It is the ground truth that the cheap proxies (``jaccard``,
``cosine``) try to predict, and it is usable by the planner as an importance itself (non-negative, in nats).

Measured in one walk over the decoder layers (:mod:`lsaq.engine`, the model in memory or read one layer at a
time from its checkpoint): at layer ``i`` the float hidden states also go through layer ``i`` quantized, one new
branch per probe, and every branch is carried forward by the float layers after it, each layer called with its own
recorded arguments (rotary embeddings, masks), so any family :func:`lsaq.models.parts.decoder_parts` supports
works. Each layer is loaded once; it runs ``1 + P x (i + 1)`` times per batch (about ``P x L / 2`` forward passes in
all) and the LM head once per branch and position (:func:`probe_samples`).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from lsaq.calibration.sets import CalibrationSet
from lsaq.engine.calls import record_calls
from lsaq.engine.skeleton import Layers, Resident
from lsaq.engine.spill import DEFAULT_BUDGET, HiddenStore
from lsaq.engine.walk import walk
from lsaq.importance.similarity import kl_divergence
from lsaq.methods import SENSITIVITY_PROBE
from lsaq.models.parts import DecoderParts, decoder_parts
from lsaq.precision import Precision, Quantizer
from lsaq.quantization.gptq import gptq_quantize
from lsaq.quantization.primitives import QuantizedWeight
from lsaq.quantization.sequential import input_hessians


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



@dataclass(frozen=True)
class ProbeRun:
    """What :func:`probe_samples` measured and what it cost. ``scores[probe, sample, layer]``: mean KL (nats) of
    the float model's next-token distributions to those with only ``layer`` quantized as ``probe``.
    ``layer_loads``: decoder layers read (one walk: L); ``layer_runs``: decoder-layer calls on a batch;
    ``hidden_bytes_on_disk``: probe hidden states that did not fit the memory budget."""

    scores: np.ndarray  # [P, N, L] float64
    layer_loads: int
    layer_runs: int
    hidden_bytes_on_disk: int

    def cost(self) -> dict[str, int]:
        return {"layer_loads": self.layer_loads, "layer_runs": self.layer_runs,
                "hidden_bytes_on_disk": self.hidden_bytes_on_disk}


def sensitivity_samples(
    model: nn.Module | Layers,
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
    return probe_samples(model, calib, [probe], batch_size=batch_size, chunk=chunk, progress=progress).scores[0]


def probe_samples(
    model: nn.Module | Layers,
    calib: CalibrationSet,
    probes: Sequence[Probe],
    *,
    batch_size: int = 4,
    chunk: int = 1024,
    progress: Callable[[int], None] | None = None,
    quantizer: Quantizer | str = Quantizer.RTN,
    stride: int = 1,
    budget: int = DEFAULT_BUDGET,
) -> ProbeRun:
    """Per-probe, per-sample, per-layer KL to the float model (:class:`ProbeRun`): for each probe and layer, only
    that layer quantized that way, in one walk over the decoder layers (a model in memory, or a
    :class:`~lsaq.engine.skeleton.Skeleton` read one layer at a time; ``progress(1)`` after each layer).

    At layer i the float hidden states go through the float layer, and through layer i quantized by each probe:
    one new branch per probe, which every later float layer then carries forward. So each layer is loaded once
    (``L`` loads) and run ``batches x (1 + P x (i + 1))`` times at layer i: ``batches x (L + P x L(L+1)/2)``
    layer runs in all, the float pass's included (``quantizer="gptq"``: plus one run per layer and batch for the
    Hessian). The branches' hidden states (``P x (i + 1)`` copies of ``[N, T, H]`` after layer i) stay in memory
    within ``budget`` bytes, the rest on disk (:class:`~lsaq.engine.spill.HiddenStore`). At the end, each
    branch's and the float model's logits are compared a ``chunk`` of positions at a time.

    ``quantizer``: ``rtn`` rounds each probe to nearest; ``gptq`` chooses its codes with the Hessian of the float
    inputs of that layer (the float model's activations: only that layer is quantized).
    ``stride``: the KL is taken at every ``stride``-th position only (the last of each run of ``stride``), which
    divides the LM-head projections by ``stride``; every position still flows through the layers, so attention
    sees the whole context."""
    if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1:
        raise ValueError(f"stride must be a positive integer, got {stride!r}")
    if not probes:
        raise ValueError("give at least one probe (int8, int4, int4-g<size>)")
    gptq = Quantizer.parse(quantizer) is Quantizer.GPTQ
    layers = Resident(decoder_parts(model)) if isinstance(model, nn.Module) else model
    parts = layers.parts
    calls = record_calls(parts, calib.tokens, batch_size)
    n_layers, batches = calls.num_layers, len(calls.inputs)
    runs = [batches * n_layers]  # the float pass
    with HiddenStore(budget) as store:

        def visit(i: int, layer: nn.Module, inputs: Sequence[torch.Tensor], _outputs: Sequence[torch.Tensor]) -> None:
            for start, k in _branches(store, i):  # the branches of layers < i: float layer i
                for b, call in enumerate(calls.calls[i]):
                    store.put((start, k, b, i), call(layer, store.take((start, k, b, i - 1))))
            runs[0] += batches * len(probes) * i
            names = [n for n, m in layer.named_modules() if isinstance(m, nn.Linear)]
            hessians = input_hessians(layer, names, calls.calls[i], inputs, i) if gptq else {}
            runs[0] += batches if gptq else 0
            for k, probe in enumerate(probes):  # new branches: layer i quantized, on the float inputs
                codes = {n: gptq_quantize(layer.get_submodule(n).weight, h, probe.precision, probe.group_size,
                                          act_order=True) for n, h in hessians.items()} if gptq else None
                with quantized_layer(layer, probe.precision, probe.group_size, codes):
                    for b, (call, h) in enumerate(zip(calls.calls[i], inputs)):
                        store.put((i, k, b, i), call(layer, h))
            runs[0] += batches * len(probes)
            if progress is not None:
                progress(1)

        final = walk(layers, calls, visit)  # the float model's last hidden states, per batch
        scores = _branch_kl(parts, final, store, len(probes), n_layers, stride, chunk)
        spilled = store.spilled
    return ProbeRun(scores, n_layers, runs[0], spilled)


def _branches(store: HiddenStore, layer: int) -> list[tuple[int, int]]:
    """The ``(start layer, probe)`` of every branch whose hidden states reached ``layer - 1``."""
    keys = [*store.memory, *store.files]
    return sorted({(start, k) for start, k, b, at in keys if at == layer - 1})


def _branch_kl(parts: DecoderParts, final: Sequence[torch.Tensor], store: HiddenStore, n_probes: int,
               n_layers: int, stride: int, chunk: int) -> np.ndarray:
    """``[P, N, L]``: per sample, the mean over its scored positions of KL(float || branch) of every branch."""
    scores = np.zeros((n_probes, sum(h.shape[0] for h in final), n_layers), dtype=np.float64)
    first = 0
    with torch.inference_mode():
        for b, h in enumerate(final):
            kept = h[:, stride - 1 :: stride]  # [B, T', H]
            size, t = kept.shape[:2]
            ref = [_logits(parts, c) for c in kept.reshape(size * t, -1).split(chunk)]  # [c, V] each
            for start in range(n_layers):
                for k in range(n_probes):
                    branch = store.take((start, k, b, n_layers - 1))[:, stride - 1 :: stride]
                    flat = branch.reshape(size * t, -1)
                    kl = torch.cat([kl_divergence(r, _logits(parts, c)) for r, c in zip(ref, flat.split(chunk))])
                    scores[k, first:first + size, start] = kl.view(size, t).mean(-1).cpu().numpy()
            first += size
    return scores


def _logits(parts: DecoderParts, h: torch.Tensor) -> torch.Tensor:
    """``h`` ``[P, H]`` (last layer output) -> next-token logits ``[P, V]``, fp32 (fp64 for a float64 model)."""
    logits = parts.logits(h)
    return logits.to(torch.promote_types(logits.dtype, torch.float32))
