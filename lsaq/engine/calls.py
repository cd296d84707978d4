"""Every decoder layer's own call arguments for a set of token batches.

A decoder stack calls layer i as ``layer(hidden_states, attention_mask=..., position_embeddings=..., ...)``, and
the arguments differ between layers where a family mixes attention types (``config.layer_types``): gemma2 and
qwen3's sliding layers get a sliding-window mask, gemma3_text's also a local rotary embedding. So each layer's
call is recorded, not layer 0's: every layer's ``forward`` is swapped for a recorder that keeps its arguments and
returns the hidden states unchanged, and the stack's own forward runs once per batch (embedding and final norm
real, layers untouched, so a skeleton's meta layers serve). Replaying layer i's call on the hidden states the
walk brings gives exactly the whole model's hidden states.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lsaq.models.parts import DecoderParts, layer_output


@dataclass(frozen=True)
class Call:
    """One recorded call of a decoder layer, without its hidden states: ``layer(h, *args, **kwargs)``."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]

    def __call__(self, layer: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """``layer``'s output hidden states ``[B, T, H]`` for input ``hidden`` ``[B, T, H]``."""
        return layer_output(layer(hidden, *self.args, **self.kwargs))


@dataclass(frozen=True)
class LayerCalls:
    """``inputs[b]``: the hidden states ``[B, T, H]`` entering layer 0 for batch ``b``; ``calls[i][b]``: layer
    ``i``'s call for batch ``b``. Memory: one ``[N, T, H]`` copy of the hidden states, plus masks and rotary
    tables, which the layers of one attention type share."""

    inputs: list[torch.Tensor]
    calls: list[list[Call]]

    @property
    def num_layers(self) -> int:
        return len(self.calls)


def record_calls(parts: DecoderParts, tokens: torch.Tensor, batch_size: int) -> LayerCalls:
    """Every layer's call for the token ids ``tokens`` ``[N, T]`` (int64) in batches of ``batch_size``."""
    if tokens.dim() != 2 or tokens.dtype != torch.int64 or tokens.shape[0] == 0:
        raise ValueError(f"tokens must be int64 [N, T] with N >= 1, got {tokens.dtype} {tuple(tokens.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {batch_size}")
    inputs: list[torch.Tensor] = []
    calls: list[list[Call]] = [[] for _ in parts.layers]
    device = parts.embed.weight.device  # the compute device: the calls' masks and rotary tables are made there

    def recorder(index: int):
        def forward(*args: Any, **kwargs: Any) -> torch.Tensor:
            hidden = args[0] if args else kwargs.pop("hidden_states")
            calls[index].append(Call(tuple(args[1:]), dict(kwargs)))
            if index == 0:
                inputs.append(hidden)
            return hidden

        return forward

    for i, layer in enumerate(parts.layers):
        layer.forward = recorder(i)  # an instance attribute: the layer keeps its class and attributes
    try:
        with torch.inference_mode():
            for start in range(0, tokens.shape[0], batch_size):
                parts.base(input_ids=tokens[start:start + batch_size].to(device), use_cache=False)
    finally:
        for layer in parts.layers:
            del layer.forward
    if any(len(c) != len(inputs) for c in calls) or not inputs:
        raise RuntimeError(f"the decoder stack did not call each of its {len(calls)} layers once per batch")
    return LayerCalls(inputs, calls)
