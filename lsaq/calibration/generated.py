"""Text sampled from the model itself: calibration (and fidelity windows) with no corpus and no download.

Each sequence starts from the BOS token (else EOS) and continues with temperature-1 draws from the model's full
next-token distribution, so the text follows what the model itself finds likely. Every sequence has its own
seeded generator, so a set is reproducible from (model, seed) alone.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

from lsaq.records import canonical_json, sha256_hex

if TYPE_CHECKING:
    import torch
    from torch import nn

# The sampler behind "generated" sets, recorded in their source hash: plain ancestral sampling at temperature 1
# from the full softmax (no top-k/top-p truncation), so the text follows the model's own distribution.
SAMPLER = {"method": "ancestral", "temperature": 1.0, "top_k": None, "top_p": None}
# Rows sampled side by side: on the default model (2 cores) 32 rows draw 167 tokens/s, 16 rows 122 (compute-bound).
SAMPLE_BATCH = 32


def start_token(tokenizer: Any, model: nn.Module | None = None) -> int:
    """The token every generated sequence starts from: BOS, else EOS (tokenizer first, then the model config)."""
    config = getattr(model, "config", None)
    for attr in ("bos_token_id", "eos_token_id"):
        for owner in (tokenizer, config):
            value = getattr(owner, attr, None)
            value = value[0] if isinstance(value, (list, tuple)) and value else value
            if isinstance(value, int) and value >= 0:
                return value
    raise ValueError("cannot generate calibration text: neither the tokenizer nor the model config names a BOS "
                     "or EOS token to start from; pass a text source")


def row_seed(seed: int, row: int) -> int:
    """The seed of sequence ``row``'s own generator (64-bit, derived by hashing, so rows are independent)."""
    return int(sha256_hex(canonical_json([seed, row]))[:16], 16)


def sample_sequences(
    model: nn.Module,
    start: int,
    samples: int,
    seq_len: int,
    seed: int,
    *,
    batch_size: int = SAMPLE_BATCH,
    progress: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Sample ``[samples, seq_len]`` int64 token ids from ``model``: ``start``, then ``seq_len - 1`` sampled tokens.

    Temperature-1 multinomial draws from the full softmax (fp32) of each next-token distribution, ``batch_size``
    sequences at a time with a KV cache. Every sequence has its own generator (:func:`row_seed`) and draws on the
    CPU, so sequence i is the same whatever ``samples`` or ``batch_size`` (up to the float rounding of batched
    matmuls, which the set's hash would show). ``progress(n)`` is called after each step with the n tokens drawn.
    """
    import torch

    if samples < 1 or seq_len < 2 or batch_size < 1:
        raise ValueError(f"need samples >= 1, seq_len >= 2, batch_size >= 1; got {samples}, {seq_len}, {batch_size}")
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if isinstance(limit, int) and seq_len > limit:
        raise ValueError(f"cannot generate {seq_len} tokens per sequence: the model allows {limit} positions")
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    out = torch.empty(samples, seq_len, dtype=torch.int64)
    out[:, 0] = start
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for s in range(0, samples, batch_size):
                rows = range(s, min(s + batch_size, samples))
                gens = [torch.Generator().manual_seed(row_seed(seed, r)) for r in rows]
                step = out[s : rows.stop, :1]  # [b, 1]: the start token, then each newly drawn token
                cache = None
                for t in range(1, seq_len):
                    res = model(input_ids=step.to(device), past_key_values=cache, use_cache=True)
                    cache = res.past_key_values
                    probs = torch.softmax(res.logits[:, -1].float(), dim=-1).cpu()  # [b, V]
                    step = torch.stack([torch.multinomial(probs[i], 1, generator=g) for i, g in enumerate(gens)])
                    out[s : rows.stop, t] = step[:, 0]
                    if progress is not None:
                        progress(len(rows))
    finally:
        model.train(was_training)
    return out
