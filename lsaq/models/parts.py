"""The parts of a decoder-only LM that the logit lens, the sensitivity probe and the quantizer work on."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lsaq.models.families import family

VOCAB_SLICE = 16384  # rows of a 16-bit head upcast at once: 16384 x 4096 x 4 B = 256 MiB for a 7B-width model


@dataclass(frozen=True)
class DecoderParts:
    """The pieces of a decoder-only LM that the logit lens and the quantizer work on."""

    base: nn.Module  # the decoder stack without the LM head (embeddings -> layers -> final norm)
    layers: nn.ModuleList
    final_norm: nn.Module
    lm_head: nn.Module
    embed: nn.Module
    logit_divisor: float = 1.0  # granite: logits / config.logits_scaling
    softcap: float | None = None  # gemma2/3: cap * tanh(logits / cap), config.final_logit_softcapping

    def project(self, z: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """The LM head's output ``[P, V]`` for normed hidden states ``z`` ``[P, H]`` (written into ``out`` when
        given). A linear head stored in another dtype than ``z`` (a streamed skeleton keeps a large head in 16
        bits) is upcast :data:`VOCAB_SLICE` rows at a time, so no full-precision copy of it exists."""
        w = getattr(self.lm_head, "weight", None)
        if not isinstance(self.lm_head, nn.Linear) or w is None or w.dtype == z.dtype:
            logits = self.lm_head(z)
            return logits if out is None else out.copy_(logits)
        out = torch.empty(z.shape[0], w.shape[0], dtype=z.dtype, device=z.device) if out is None else out
        for v in range(0, w.shape[0], VOCAB_SLICE):
            torch.mm(z, w[v:v + VOCAB_SLICE].to(z.dtype).t(), out=out[:, v:v + VOCAB_SLICE])
        if self.lm_head.bias is not None:
            out += self.lm_head.bias.to(z.dtype)
        return out

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """The model's next-token logits ``[..., V]`` of last-layer hidden states ``h`` ``[..., H]``: final norm,
        LM head, and the family's own scaling of the head's output (what ``model(...).logits`` holds)."""
        z = self.final_norm(h)
        logits = self.project(z.reshape(-1, z.shape[-1])).view(*z.shape[:-1], -1)
        if self.logit_divisor != 1.0:
            logits = logits / self.logit_divisor
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


def _getattr_path(obj: Any, path: str) -> Any:
    for name in path.split("."):
        obj = getattr(obj, name)
    return obj


def decoder_parts(model: nn.Module) -> DecoderParts:
    """Find decoder layers, final norm, LM head and input embedding; ``ValueError`` for unknown architectures."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", type(model).__name__)
    arch = (getattr(config, "architectures", None) or [type(model).__name__])[0]
    fam = family(model_type, f" ({arch})")
    base_path, layers_attr, norm_attr = fam.stack, fam.layers, fam.final_norm
    try:
        base = _getattr_path(model, base_path)
        layers, norm = getattr(base, layers_attr), getattr(base, norm_attr)
    except AttributeError as e:
        raise ValueError(f"architecture {arch!r} ({model_type}) does not have the expected layout: {e}") from e
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0 or head is None:
        raise ValueError(f"architecture {arch!r} ({model_type}): no decoder layers or no LM head found")
    softcap = getattr(config, "final_logit_softcapping", None)
    return DecoderParts(base=base, layers=layers, final_norm=norm, lm_head=head, embed=embed,
                        logit_divisor=float(getattr(config, "logits_scaling", None) or 1.0),
                        softcap=float(softcap) if softcap else None)


def layer_output(output: Any) -> torch.Tensor:
    """The hidden state ``[B, T, H]`` a decoder layer returns (some families return a tuple, others a tensor)."""
    return output[0] if isinstance(output, (tuple, list)) else output
