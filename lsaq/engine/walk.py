"""The one walk over a model's decoder layers: load layer i, run every batch through it with its own call
arguments, hand ``(i, layer, inputs, outputs)`` to the stage's visitor, release it, carry the outputs on.

Memory: the skeleton (embedding, final norm, LM head), one layer, and two copies of the hidden states
(``2 x N x T x H`` floats: 2 x 8 x 512 x 4096 x 4 B = 128 MiB for a 7B at 8 x 512 tokens). Cost: each layer's
weights are read once and each layer runs once per batch.

:func:`walk_branches` walks several streams of hidden states together (a float model beside its quantized build,
each with its own layers): layer i of every distinct layer source is loaded once, every branch runs through its
own, and all are released before layer i + 1 is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
from torch import nn

from lsaq.engine.calls import LayerCalls
from lsaq.engine.skeleton import Layers

# (layer index, the loaded layer, its input hidden states per batch, its outputs per batch), each [B, T, H]
Visitor = Callable[[int, nn.Module, Sequence[torch.Tensor], Sequence[torch.Tensor]], None]


@dataclass(frozen=True)
class Branch:
    """One stream of hidden states through ``layers``, each layer called as ``calls`` recorded it."""

    layers: Layers
    calls: LayerCalls


# (layer index, the loaded layer, its inputs per batch): change the layer before it runs (quantize it in place)
Prepare = Callable[[int, nn.Module, Sequence[torch.Tensor]], None]
Step = tuple[int, nn.Module, list[torch.Tensor], list[torch.Tensor]]


def layer_steps(layers: Layers, num_layers: int) -> Iterator[tuple[int, nn.Module]]:
    """Yield ``(i, layer i loaded)`` in order, each released once the caller asks for the next (or stops): for
    stages that change each layer without running it (round-to-nearest quantization)."""
    for i in range(num_layers):
        layer = layers.load(i)
        try:
            yield i, layer
        finally:
            layers.release(i)


def load_every(layers: Layers, num_layers: int) -> None:
    """Load every decoder layer and keep it: the whole model in memory (what a runtime that is not a walk needs)."""
    for i in range(num_layers):
        layers.load(i)


def walk_steps(layers: Layers, calls: LayerCalls, prepare: Prepare | None = None) -> Iterator[Step]:
    """The walk as an iterator: yield ``(i, layer, inputs, outputs)`` per layer, the layer still loaded.
    ``prepare(i, layer, inputs)`` runs first and may change the layer in place (GPTQ quantizes it from the
    Hessians of its inputs), so the outputs, the next layer's inputs, are the changed layer's."""
    hidden = list(calls.inputs)
    for i, layer in layer_steps(layers, calls.num_layers):
        with torch.inference_mode():
            if prepare is not None:
                prepare(i, layer, hidden)
            out = [call(layer, h) for call, h in zip(calls.calls[i], hidden)]
        yield i, layer, hidden, out
        hidden = out


def walk(layers: Layers, calls: LayerCalls, visit: Visitor) -> list[torch.Tensor]:
    """Walk every decoder layer in order (see the module doc); returns the last layer's outputs per batch."""
    out = list(calls.inputs)
    for i, layer, inputs, out in walk_steps(layers, calls):
        with torch.inference_mode():
            visit(i, layer, inputs, out)
    return out


def walk_branches(branches: Sequence[Branch]) -> list[list[torch.Tensor]]:
    """Walk ``branches`` together, one layer index at a time (see the module doc); returns each branch's last
    layer outputs per batch, ``[B, T, H]`` each. Memory: one layer per distinct layer source, two copies of each
    branch's hidden states. ``ValueError`` when the branches' depths differ."""
    depths = {b.calls.num_layers for b in branches}
    if len(depths) != 1:
        raise ValueError(f"branches of different depths cannot walk together: {sorted(depths)} layers")
    sources = list({id(b.layers): b.layers for b in branches}.values())
    hidden = [list(b.calls.inputs) for b in branches]
    with torch.inference_mode():
        for i in range(depths.pop()):
            loaded: dict[int, nn.Module] = {}
            try:
                for source in sources:
                    loaded[id(source)] = source.load(i)
                hidden = [[call(loaded[id(b.layers)], h) for call, h in zip(b.calls.calls[i], hs)]
                          for b, hs in zip(branches, hidden)]
            finally:
                for source in sources:
                    if id(source) in loaded:
                        source.release(i)
    return hidden
