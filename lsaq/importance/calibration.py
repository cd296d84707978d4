"""Calibration data: seeded samples of N sequences of L tokens from a text source, with a content hash.

The text is tokenized once (no special tokens), cut into non-overlapping windows of L tokens, and N distinct
windows are drawn with a seeded generator. Distinct windows make any split of the set (e.g. two halves)
disjoint in text, which is what a stability check of the importance ranking needs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lsaq.paths import shared_dir
from lsaq.records import canonical_json, file_sha256, read_jsonl, sha256_hex

WIKITEXT_VALID = "data/wikitext-2-raw/wiki.valid.raw"
HF_DEFAULT = "wikitext:wikitext-2-raw-v1:validation"


@dataclass(frozen=True)
class CalibrationSet:
    """``tokens``: ``[N, L]`` int64 token ids. ``hash`` covers tokenizer output, source, N, L and seed."""

    tokens: torch.Tensor
    source: str
    source_hash: str
    seed: int
    hash: str

    @property
    def samples(self) -> int:
        return self.tokens.shape[0]

    @property
    def seq_len(self) -> int:
        return self.tokens.shape[1]

    def info(self) -> dict[str, Any]:
        """The small record stored in every result derived from this set."""
        return {
            "hash": self.hash,
            "source": self.source,
            "source_hash": self.source_hash,
            "samples": self.samples,
            "seq_len": self.seq_len,
            "seed": self.seed,
            "tokens": self.samples * self.seq_len,
        }

    @classmethod
    def from_tokens(cls, tokens: torch.Tensor, source: str = "tokens", seed: int = 0) -> "CalibrationSet":
        """Wrap ready token ids ``[N, L]`` (e.g. synthetic ones for tests) as a hashed calibration set."""
        if tokens.ndim != 2 or tokens.shape[0] < 1 or tokens.shape[1] < 2:
            raise ValueError(f"calibration tokens must have shape [N>=1, L>=2], got {tuple(tokens.shape)}")
        return _make(tokens.to(torch.int64), source, sha256_hex(tokens.to(torch.int64).numpy().tobytes()), seed)

    def split(self, parts: int) -> list["CalibrationSet"]:
        """Split into ``parts`` disjoint subsets (their windows never overlap), each with its own hash."""
        return [_make(chunk, self.source, self.source_hash, self.seed) for chunk in self.tokens.chunk(parts)]


def default_source() -> str:
    """WikiText-2 raw validation: the shared local copy when present, else the hub dataset (needs network)."""
    shared = shared_dir()
    if shared is not None and (shared / WIKITEXT_VALID).is_file():
        return str(shared / WIKITEXT_VALID)
    return HF_DEFAULT


def read_text(source: str) -> tuple[str, str]:
    """Return ``(text, content_hash)`` for a ``.txt``/``.raw``/``.jsonl`` file or ``hf:``-style dataset name.

    Dataset names are ``NAME[:CONFIG[:SPLIT]]`` (split defaults to ``validation``); they need the hub.
    """
    path = Path(source).expanduser()
    if path.is_file():
        if path.suffix == ".jsonl":
            texts = []
            for n, row in read_jsonl(path):
                if not isinstance(row.get("text"), str):
                    raise ValueError(f"{path}:{n}: each .jsonl line needs a string field 'text'")
                texts.append(row["text"])
            return "\n\n".join(texts), file_sha256(path)
        return path.read_text(encoding="utf-8"), file_sha256(path)
    if path.suffix in {".txt", ".raw", ".jsonl"} or source.startswith((".", "/", "~")):
        raise ValueError(f"calibration file {path} does not exist")
    return _read_hf_dataset(source)


def _read_hf_dataset(name: str) -> tuple[str, str]:
    ds_name, config, split = (name.removeprefix("hf:").split(":") + [None, None])[:3]
    try:
        import datasets

        ds = datasets.load_dataset(ds_name, config, split=split or "validation")
    except Exception as e:
        raise ValueError(
            f"calibration source {name!r} is not a local file and could not be loaded as a Hugging Face "
            f"dataset ({type(e).__name__}); pass a local .txt or .jsonl file"
        ) from e
    text = "\n\n".join(t for t in ds["text"] if t)
    return text, sha256_hex(text.encode())


def tokenize_windows(tokenizer: Any, text: str, seq_len: int) -> torch.Tensor:
    """Tokenize ``text`` once without special tokens; return all non-overlapping windows ``[W, seq_len]``."""
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2, got {seq_len}")
    if not text.strip():
        raise ValueError("calibration text is empty")
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    n_windows = len(ids) // seq_len
    return torch.tensor(ids[: n_windows * seq_len], dtype=torch.int64).view(n_windows, seq_len)


def load_calibration(
    tokenizer: Any,
    source: str | None = None,
    *,
    samples: int = 32,
    seq_len: int = 512,
    seed: int = 0,
) -> CalibrationSet:
    """Draw ``samples`` distinct windows of ``seq_len`` tokens from ``source`` with a seeded generator."""
    if samples < 1:
        raise ValueError(f"samples must be at least 1, got {samples}")
    source = source or default_source()
    text, source_hash = read_text(source)
    windows = tokenize_windows(tokenizer, text, seq_len)
    if windows.shape[0] < samples:
        raise ValueError(
            f"calibration text {source!r} is too short: it gives {windows.shape[0]} windows of {seq_len} tokens, "
            f"{samples} samples are needed (use fewer --samples, a shorter --seq-len or more text)"
        )
    gen = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(windows.shape[0], generator=gen)[:samples]
    return _make(windows[chosen], source, source_hash, seed)


def _make(tokens: torch.Tensor, source: str, source_hash: str, seed: int) -> CalibrationSet:
    # Hashing the token ids themselves captures the tokenizer's effect exactly, whatever its name.
    meta = canonical_json({"source_hash": source_hash, "shape": list(tokens.shape), "seed": seed})
    digest = sha256_hex(meta + tokens.to(torch.int64).numpy().tobytes())
    return CalibrationSet(tokens=tokens, source=source, source_hash=source_hash, seed=seed, hash=digest)
