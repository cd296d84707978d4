"""The one walk over a model's decoder layers: load layer i, run every batch through it with its own call
arguments, hand ``(i, layer, inputs, outputs)`` to the stage's visitor, release it, carry the outputs on.

Memory: the skeleton (embedding, final norm, LM head), one layer, and two copies of the hidden states
(``2 x N x T x H`` floats: 2 x 8 x 512 x 4096 x 4 B = 128 MiB for a 7B at 8 x 512 tokens). Cost: each layer's
weights are read once and each layer runs once per batch.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

from lsaq.engine.calls import LayerCalls
from lsaq.engine.skeleton import Layers

# (layer index, the loaded layer, its input hidden states per batch, its outputs per batch), each [B, T, H]
Visitor = Callable[[int, nn.Module, Sequence[torch.Tensor], Sequence[torch.Tensor]], None]


def walk(layers: Layers, calls: LayerCalls, visit: Visitor) -> list[torch.Tensor]:
    """Walk every decoder layer in order (see the module doc); returns the last layer's outputs per batch."""
    hidden = list(calls.inputs)
    with torch.inference_mode():
        for i in range(calls.num_layers):
            layer = layers.load(i)
            try:
                out = [call(layer, h) for call, h in zip(calls.calls[i], hidden)]
                visit(i, layer, hidden, out)
            finally:
                layers.release(i)
            hidden = out
    return hidden
