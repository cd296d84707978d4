"""Next-token logits of token windows from models walked one decoder layer at a time, several side by side.

:func:`branch_logits` runs windows ``[N, T]`` through every source's layers together (:func:`lsaq.engine.walk.
walk_branches`: a float model and its quantized build, each loaded one layer at a time), then projects each
branch's last hidden states through its own final norm and LM head a chunk of positions at a time, so that
full-vocabulary logits exist for one chunk per branch only.

The windows go through in passes of at most :data:`PASS_BYTES` of hidden states per copy, each pass one walk:
memory is one layer per source, the heads, and three ``[n, T, H]`` copies per branch (the inputs the calls keep,
a layer's inputs and its outputs); cost is one read of every layer per pass.
"""

from __future__ import annotations

from typing import Callable, Iterator, Sequence

import torch

from lsaq.engine.calls import record_calls
from lsaq.engine.skeleton import Layers
from lsaq.engine.walk import Branch, walk_branches

PASS_BYTES = 2**27  # one fp32 copy of a pass's hidden states: 128 MiB = 8192 positions at the 7B width (4096)
CHUNK = 256  # positions whose [CHUNK, V] logits exist at once per branch


def hidden_size(layers: Layers) -> int:
    """The width of ``layers``' residual stream, from its model's config."""
    config = layers.parts.base.config
    return int(getattr(config, "hidden_size", None) or getattr(config.get_text_config(), "hidden_size"))


def pass_windows(sources: Sequence[Layers], seq_len: int, budget: int = PASS_BYTES) -> int:
    """Windows of ``seq_len`` tokens per pass: as many as keep one fp32 copy of the widest source's hidden states
    within ``budget`` bytes, at least one."""
    width = max(hidden_size(s) for s in sources)
    return max(1, budget // (seq_len * width * 4))


def branch_logits(
    sources: Sequence[Layers],
    windows: torch.Tensor,
    *,
    batch_size: int,
    chunk: int = CHUNK,
    budget: int = PASS_BYTES,
    progress: Callable[[int], None] | None = None,
) -> Iterator[tuple[int, list[torch.Tensor]]]:
    """Yield ``(start, [logits [c, V] per source])`` for consecutive chunks of the windows' positions in row-major
    order (``start``: the first position's index in ``windows.reshape(-1)``), each source's logits as its model's
    ``model(input_ids=windows).logits`` gives them, within float rounding. ``batch_size`` windows per layer call;
    ``progress(n)`` after each pass of ``n`` windows."""
    if windows.ndim != 2 or windows.shape[0] < 1 or windows.shape[1] < 1:
        raise ValueError(f"windows must have shape [N>=1, T>=1], got {tuple(windows.shape)}")
    if batch_size < 1 or chunk < 1:
        raise ValueError(f"batch size and chunk must be at least 1, got {batch_size} and {chunk}")
    n, t = windows.shape
    per_pass = pass_windows(sources, t, budget)
    ids = windows.to(torch.int64)
    for first in range(0, n, per_pass):
        tokens = ids[first:first + per_pass]  # [n', T]
        branches = [Branch(s, record_calls(s.parts, tokens, batch_size)) for s in sources]
        finals = walk_branches(branches)  # per branch, per batch: [B, T, H]
        del branches  # the calls and their recorded inputs
        start = first * t
        for batch in zip(*finals):
            flat = [h.reshape(-1, h.shape[-1]) for h in batch]  # [B*T, H] per branch
            for s in range(0, flat[0].shape[0], chunk):
                with torch.inference_mode():
                    logits = [src.parts.logits(h[s:s + chunk]) for src, h in zip(sources, flat)]
                yield start + s, logits
            start += flat[0].shape[0]
        del finals
        if progress is not None:
            progress(tokens.shape[0])
