"""Perplexity with the protocol of quantization papers (GPTQ style).

The split's texts are joined with ``"\\n\\n"``, tokenized once, cut into non-overlapping windows of ``seq_len``
tokens (the tail that does not fill a window is dropped), and every window is scored independently: each of its
``seq_len - 1`` next-token predictions adds one negative log-likelihood. Perplexity is ``exp(mean NLL)`` over all
scored tokens. Because every window scores the same number of tokens, this equals GPTQ's
``exp(sum(window_mean_loss * seq_len) / (windows * seq_len))``.

Sources:

* a local WikiText ``.raw`` file (e.g. ``shared/data/wikitext-2-raw/wiki.test.raw``): mapped to exactly the rows
  of the Hugging Face ``wikitext-2-raw-v1`` dataset (one row per line, newline kept, whitespace-only lines
  become ``""``), then joined with ``"\\n\\n"`` as GPTQ joins ``load_dataset(...)["text"]``, so local and hub
  runs tokenize the same string;
* any other ``.txt``/``.jsonl`` file, read by :func:`lsaq.calibration.sets.read_text` (``.txt`` as one text,
  ``.jsonl`` ``text`` fields joined with ``"\\n\\n"``);
* a Hugging Face dataset ``NAME[:CONFIG[:SPLIT]]`` (split defaults to ``test``; needs the hub). All rows are
  joined with ``"\\n\\n"``, empty ones included, as GPTQ does.

The tokenizer's own special-token default is used (GPTQ calls ``tokenizer(text)``): for tokenizers that add a
BOS token it appears once, at the start of the first window only.

The model is only called as ``model(input_ids=ids, use_cache=False)`` and its output's ``.logits`` read, so any
transformers-style causal LM works, quantized ones (linear layers swapped in place) included.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from lsaq.engine.logits import CHUNK, PASS_BYTES, branch_logits
from lsaq.engine.skeleton import Layers
from lsaq.eval.options import DEFAULT_SEQ_LEN
from lsaq.calibration.sets import hub_unreachable, read_text
from lsaq.paths import shared_dir
from lsaq.records import file_sha256, sha256_hex

# Windows per forward pass when batch_size is not given: about 4096 tokens, so one batch's fp32 logits
# ([B, L, V], 4 bytes each) stay near 800 MB for a 49k vocabulary at L=2048.
AUTO_BATCH_TOKENS = 4096
HF_DEFAULT_SPLIT = "test"
WIKITEXT_TEST = "data/wikitext-2-raw/wiki.test.raw"  # under lsaq.paths.shared_dir()
HF_DEFAULT = "wikitext:wikitext-2-raw-v1:test"


@dataclass(frozen=True)
class PerplexityResult:
    """One perplexity measurement. ``nll`` is the mean NLL per scored token, in nats; ``ppl = exp(nll)``."""

    ppl: float
    nll: float
    tokens: int  # scored tokens: windows * (seq_len - 1)
    windows: int  # windows scored
    windows_available: int  # full windows the source gives at this seq_len
    seq_len: int  # window length actually used (after capping at the model's maximum)
    source: str
    source_hash: str  # sha256 of the local file, or of the joined text for hub datasets
    text_tokens: int  # length of the whole tokenized source
    seconds: float  # wall time of the forward passes (tokenization excluded)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def local_ppl_source() -> str | None:
    """WikiText-2 raw test from the shared folder, or None when there is no local copy."""
    shared = shared_dir()
    local = shared / WIKITEXT_TEST if shared is not None else None
    return str(local) if local is not None and local.is_file() else None


def default_ppl_source() -> str:
    """WikiText-2 raw test: the shared local copy when present, else the hub dataset (needs network)."""
    return local_ppl_source() or HF_DEFAULT


def read_eval_text(source: str) -> tuple[str, str]:
    """Return ``(text, source_hash)`` for a perplexity source, joined as the GPTQ protocol does.

    ``ValueError`` when the file does not exist, is empty, or the name is not a reachable hub dataset.
    """
    path = Path(source).expanduser()
    if path.is_file() and path.suffix == ".raw":
        # Same rows as the HF wikitext script: `for row in f: yield row if row.strip() else ""`.
        with open(path, encoding="utf-8") as f:
            rows = [row if row.strip() else "" for row in f]
        text, digest = "\n\n".join(rows), file_sha256(path)
    elif path.is_file() or path.suffix in {".txt", ".raw", ".jsonl"} or source.startswith((".", "/", "~")):
        if not path.is_file():
            raise ValueError(f"perplexity source file {path} does not exist")
        text, digest = read_text(str(path))
    else:
        text, digest = _read_hf_split(source)
    if not text.strip():
        raise ValueError(f"perplexity source {source!r} has no text")
    return text, digest


def _read_hf_split(name: str) -> tuple[str, str]:
    """``NAME[:CONFIG[:SPLIT]]`` from the hub: every row of the ``text`` column joined with ``"\\n\\n"``."""
    ds_name, config, split = (name.removeprefix("hf:").split(":") + [None, None])[:3]
    if (reason := hub_unreachable()) is not None:
        raise ValueError(f"perplexity source {name!r} is not a local file and could not be loaded as a Hugging Face "
                         f"dataset: the hub cannot be asked ({reason}); pass a local .raw/.txt/.jsonl file")
    try:
        import datasets

        ds = datasets.load_dataset(ds_name, config or None, split=split or HF_DEFAULT_SPLIT)
        rows = ds["text"]
    except Exception as e:  # hub and dataset errors come in many classes; all mean "cannot use this"
        raise ValueError(
            f"perplexity source {name!r} is not a local file and could not be loaded as a Hugging Face dataset "
            f"NAME[:CONFIG[:SPLIT]] with a 'text' column ({type(e).__name__}); pass a local .raw/.txt/.jsonl file"
        ) from e
    text = "\n\n".join(rows)
    return text, sha256_hex(text.encode())


def model_max_length(model: nn.Module | Layers) -> int | None:
    """The longest sequence the model's positions allow (``max_position_embeddings`` and kin), if it says."""
    config = getattr(model, "config", None) if isinstance(model, nn.Module) else model.parts.base.config
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def tokenize_eval_windows(tokenizer: Any, text: str, seq_len: int) -> tuple[torch.Tensor, int]:
    """Tokenize ``text`` once; return ``(windows [W, seq_len] int64, total token count)``."""
    # verbose=False: the whole split is far longer than model_max_length, which is expected here.
    ids = tokenizer(text, return_attention_mask=False, verbose=False)["input_ids"]
    n_windows = len(ids) // seq_len
    windows = torch.tensor(ids[: n_windows * seq_len], dtype=torch.int64).view(n_windows, seq_len)
    return windows, len(ids)


def eval_windows(tokenizer: Any, source: str, seq_len: int) -> tuple[torch.Tensor, str, int]:
    """The windows a perplexity run scores: ``(windows [W, seq_len] int64, source_hash, text_tokens)``.

    ``ValueError`` when the source gives less than one window.
    """
    text, source_hash = read_eval_text(source)
    windows, text_tokens = tokenize_eval_windows(tokenizer, text, seq_len)
    if windows.shape[0] == 0:
        raise ValueError(
            f"perplexity source {source!r} has {text_tokens} tokens, fewer than one window of {seq_len}; "
            "use a shorter seq_len or a longer text"
        )
    return windows, source_hash, text_tokens


@torch.inference_mode()
def window_nll(model: nn.Module, windows: torch.Tensor) -> torch.Tensor:
    """Summed next-token NLL of each window: ``windows [B, L]`` -> ``[B]`` float64 (L-1 predictions each)."""
    device = _model_device(model)
    ids = windows.to(device)
    logits = model(input_ids=ids, use_cache=False).logits  # [B, L, V]
    out = torch.empty(ids.shape[0], dtype=torch.float64)
    for b in range(ids.shape[0]):
        # One row at a time: cross_entropy's log-softmax buffer is [L-1, V] instead of [B, L-1, V]. In fp32 at
        # least (a float64 model keeps float64).
        row = logits[b, :-1]
        nll = F.cross_entropy(row.to(torch.promote_types(row.dtype, torch.float32)), ids[b, 1:], reduction="sum")
        out[b] = nll.double().item()
    return out


def stream_window_nll(layers: Layers, windows: torch.Tensor, batch_size: int,
                      progress: Callable[[int], None] | None = None, *, chunk: int = CHUNK,
                      pass_bytes: int = PASS_BYTES) -> torch.Tensor:
    """:func:`window_nll` of a model walked one decoder layer at a time (:func:`lsaq.engine.logits.branch_logits`):
    ``windows [N, L]`` -> ``[N]`` float64, each position's NLL in at least fp32, summed in float64."""
    n, length = windows.shape
    sums = torch.zeros(n, dtype=torch.float64)
    for first, (logits,) in branch_logits([layers], windows, batch_size=batch_size, progress=progress, chunk=chunk,
                                          budget=pass_bytes):
        pos = torch.arange(first, first + logits.shape[0])  # flat positions of this chunk of [c, V] logits
        row, col = pos // length, pos % length
        scored = col < length - 1  # a window's last position has no target inside it
        targets = windows[row, (col + 1).clamp(max=length - 1)].to(logits.device)
        nll = F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), targets, reduction="none")
        sums.index_add_(0, row[scored], nll.cpu()[scored].double())
    return sums


def perplexity(
    model: nn.Module | Layers,
    tokenizer: Any,
    source: str,
    seq_len: int = DEFAULT_SEQ_LEN,
    max_windows: int | None = None,
    batch_size: int | None = None,
    progress: Callable[[int], None] | None = None,
    *,
    chunk: int = CHUNK,
    pass_bytes: int = PASS_BYTES,
) -> PerplexityResult:
    """Perplexity of ``model`` on ``source`` with non-overlapping windows of ``seq_len`` tokens: a model in memory,
    or :class:`~lsaq.engine.skeleton.Layers` walked one decoder layer at a time (never held whole).

    ``seq_len`` is capped at the model's maximum length. ``max_windows`` scores only the first N windows (quick
    runs). ``batch_size`` windows go through each forward pass (default: about 4096 tokens per batch).
    ``progress(n)`` is called after each batch (each pass of a walk) with the number of windows it scored.
    ``chunk`` and ``pass_bytes``: a walk's positions projected at once and hidden states per pass
    (:mod:`lsaq.eval.budget`).
    """
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2 (one context token and one predicted token), got {seq_len}")
    if max_windows is not None and max_windows < 1:
        raise ValueError(f"max_windows must be at least 1 when given, got {max_windows}")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be at least 1 when given, got {batch_size}")
    limit = model_max_length(model)
    if limit is not None:
        seq_len = min(seq_len, limit)
    windows, source_hash, text_tokens = eval_windows(tokenizer, source, seq_len)
    available = windows.shape[0]
    windows = windows[:max_windows] if max_windows is not None else windows
    batch_size = batch_size or max(1, AUTO_BATCH_TOKENS // seq_len)

    start = time.perf_counter()
    if not isinstance(model, nn.Module):
        total = float(stream_window_nll(model, windows, batch_size, progress, chunk=chunk,
                                        pass_bytes=pass_bytes).sum())
    else:
        was_training = model.training
        model.eval()
        total = 0.0
        try:
            for i in range(0, windows.shape[0], batch_size):
                batch = windows[i : i + batch_size]  # [b, L]
                total += float(window_nll(model, batch).sum())
                if progress is not None:
                    progress(batch.shape[0])
        finally:
            model.train(was_training)
    seconds = time.perf_counter() - start

    tokens = windows.shape[0] * (seq_len - 1)
    nll = total / tokens
    return PerplexityResult(
        ppl=math.exp(nll) if not nll > 709 else math.inf,  # a broken (badly quantized) model can overflow exp()
        nll=nll,
        tokens=tokens,
        windows=windows.shape[0],
        windows_available=available,
        seq_len=seq_len,
        source=source,
        source_hash=source_hash,
        text_tokens=text_tokens,
        seconds=seconds,
    )


def _model_device(model: nn.Module) -> torch.device:
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")
