"""Calibration data: N sequences of L tokens, from text or sampled from the model itself, with a content hash.

Text sources (a ``.txt``/``.raw``/``.jsonl`` file or a hub dataset ``NAME[:CONFIG[:SPLIT]]``) are tokenized once
(no special tokens), cut into non-overlapping windows of L tokens, and N distinct windows are drawn with a seeded
generator. Distinct windows make any split of the set (e.g. two halves) disjoint in text, which is what a
stability check of the importance ranking needs.

``source="generated"`` samples the sequences from the model (see :func:`sample_sequences`): no download, and the
text is what the model itself finds likely. With no source given, :func:`load_calibration` takes the first of:
``$LSAQ_CALIB`` (a local file), WikiText-2 raw validation under :func:`lsaq.paths.shared_dir`, the hub dataset
(skipped at once when the hub host does not answer), generated text; one INFO line says which and why.

:func:`calibrate` is the stage function: it draws a set for a model and writes it to a directory that
:func:`load_calibration_dir` reads back. Torch is imported only where tokens are made or read, so the
:class:`CalibrationInfo` record (carried by importance records) loads without it.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping
from urllib.parse import urlparse

from lsaq.calibration.generated import SAMPLE_BATCH, SAMPLER, sample_sequences, start_token
from lsaq.models.weights import check_weights_file
from lsaq.paths import cache_dir, shared_dir
from lsaq.records import (
    RecordError,
    atomic_dir,
    atomic_write_bytes,
    atomic_write_json,
    canonical_json,
    decode_record,
    file_sha256,
    read_jsonl,
    read_record,
    sha256_hex,
)

if TYPE_CHECKING:
    import torch
    from torch import nn

    from lsaq.models.identity import ModelInfo, ModelRef
    from lsaq.models.loading import LoadedModel
    from lsaq.resources import RunMemory

log = logging.getLogger(__name__)

WIKITEXT_VALID = "data/wikitext-2-raw/wiki.valid.raw"
HF_DEFAULT = "wikitext:wikitext-2-raw-v1:validation"
GENERATED = "generated"  # the source name that means "sample the text from the model"
KINDS = ("file", "dataset", "generated", "tokens")
HUB_PROBE_TIMEOUT_S = 3.0
# Sequences sampled side by side. Decoding one token at a time is bound by reading the weights, so a step for 16
# rows costs little more than for 8 (SmolLM2-135M on 2 CPU cores: 0.14 s vs 0.11 s); the KV cache grows with it
# (16 x 512 tokens: 380 MB in fp32 for SmolLM2).
SCHEMA, VERSION = "lsaq.calibration", 1
RECORD_FILE, TOKENS_FILE = "calibration.json", "tokens.safetensors"


@dataclass(frozen=True)
class CalibrationInfo:
    """The small record of a calibration set stored in every result derived from it.

    ``hash`` covers the token ids, shape, seed and ``source_hash``; ``source_hash`` identifies the source: a
    file's sha256, a hub dataset's joined text, or for ``kind="generated"`` the model's content hash, the seed
    and the sampler settings.
    """

    hash: str
    source: str
    kind: str  # one of KINDS
    source_hash: str
    samples: int
    seq_len: int
    seed: int
    tokens: int  # samples * seq_len

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown calibration kind {self.kind!r}; valid: {', '.join(KINDS)}")

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> "CalibrationInfo":
        """Read a record; one without ``kind`` (written before kinds existed) gets it inferred from its source."""
        return cls(hash=obj["hash"], source=obj["source"], kind=obj.get("kind") or infer_kind(obj["source"]),
                   source_hash=obj["source_hash"], samples=int(obj["samples"]), seq_len=int(obj["seq_len"]),
                   seed=int(obj["seed"]), tokens=int(obj.get("tokens", obj["samples"] * obj["seq_len"])))


def infer_kind(source: str) -> str:
    """The kind of an old record's source: ``tokens``, a file (path-like), else a hub dataset name."""
    if source in ("tokens", GENERATED):
        return source
    looks_like_path = Path(source).suffix in {".txt", ".raw", ".jsonl"} or source.startswith((".", "/", "~"))
    return "file" if looks_like_path or Path(source).is_file() else "dataset"


@dataclass(frozen=True)
class CalibrationSet:
    """``tokens``: ``[N, L]`` int64 token ids. ``hash`` covers the token ids, source hash, N, L and seed."""

    tokens: torch.Tensor
    source: str
    source_hash: str
    seed: int
    hash: str
    kind: str = "file"  # one of KINDS

    @property
    def samples(self) -> int:
        return self.tokens.shape[0]

    @property
    def seq_len(self) -> int:
        return self.tokens.shape[1]

    def info(self) -> CalibrationInfo:
        """The small record stored in every result derived from this set."""
        return CalibrationInfo(hash=self.hash, source=self.source, kind=self.kind, source_hash=self.source_hash,
                               samples=self.samples, seq_len=self.seq_len, seed=self.seed,
                               tokens=self.samples * self.seq_len)

    @classmethod
    def from_tokens(cls, tokens: torch.Tensor, source: str = "tokens", seed: int = 0) -> "CalibrationSet":
        """Wrap ready token ids ``[N, L]`` (e.g. synthetic ones for tests) as a hashed calibration set."""
        import torch

        if tokens.ndim != 2 or tokens.shape[0] < 1 or tokens.shape[1] < 2:
            raise ValueError(f"calibration tokens must have shape [N>=1, L>=2], got {tuple(tokens.shape)}")
        tokens = tokens.to(torch.int64)
        return _make(tokens, source, sha256_hex(tokens.numpy().tobytes()), seed, "tokens")

    def split(self, parts: int) -> list["CalibrationSet"]:
        """Split into ``parts`` disjoint subsets (their windows never overlap), each with its own hash."""
        return [_make(c, self.source, self.source_hash, self.seed, self.kind) for c in self.tokens.chunk(parts)]


def _make(tokens: torch.Tensor, source: str, source_hash: str, seed: int, kind: str) -> CalibrationSet:
    import torch

    # Hashing the token ids themselves captures the tokenizer's (or sampler's) effect exactly. The kind is not
    # hashed: it is implied by the source hash, and text sets keep the hashes they had before kinds existed.
    meta = canonical_json({"source_hash": source_hash, "shape": list(tokens.shape), "seed": seed})
    digest = sha256_hex(meta + tokens.to(torch.int64).numpy().tobytes())
    return CalibrationSet(tokens=tokens, source=source, source_hash=source_hash, seed=seed, hash=digest, kind=kind)


# ------------------------------------------------------------------------------------------ text sources


def read_text(source: str) -> tuple[str, str]:
    """Return ``(text, content_hash)`` for a ``.txt``/``.raw``/``.jsonl`` file or a hub dataset name.

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


def hub_unreachable(timeout: float = HUB_PROBE_TIMEOUT_S) -> str | None:
    """Why the hub should not be asked at all (its host does not answer within ``timeout``), else None.

    With ``HF_HUB_OFFLINE``/``HF_DATASETS_OFFLINE`` set this returns None: the datasets library then answers
    from its local cache only, and fails at once when the data is not there. The probe exists because, without
    those variables, a machine with no network spends about half a minute in retries before giving up.
    """
    offline = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    if any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on") for v in offline):
        return None
    host = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co").hostname or "huggingface.co"
    failure: list[str] = ["no answer"]

    def probe() -> None:  # in a thread: name resolution has no timeout of its own
        try:
            socket.create_connection((host, 443), timeout=timeout).close()
            failure.clear()
        except OSError as e:
            failure[0] = f"{type(e).__name__}: {e}"

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    return f"{host} unreachable ({failure[0]})" if failure else None


def hf_dataset_text(name: str, default_split: str = "validation") -> tuple[str, str] | str:
    """``(text, sha256 of text)`` of a hub dataset ``NAME[:CONFIG[:SPLIT]]`` (non-empty rows of its ``text``
    column joined with ``"\\n\\n"``), or a short reason why it could not be loaded."""
    ds_name, config, split = (name.removeprefix("hf:").split(":") + [None, None])[:3]
    if (reason := hub_unreachable()) is not None:
        return reason
    try:
        import datasets

        ds = datasets.load_dataset(ds_name, config or None, split=split or default_split)
        text = "\n\n".join(t for t in ds["text"] if t)
    except Exception as e:  # hub and dataset errors come in many classes; all mean "cannot use this"
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'no detail'}"
    return text, sha256_hex(text.encode())


def _read_hf_dataset(name: str) -> tuple[str, str]:
    got = hf_dataset_text(name)
    if isinstance(got, str):
        raise ValueError(f"calibration source {name!r} is not a local file and could not be loaded as a Hugging "
                         f"Face dataset ({got}); pass a local .txt or .jsonl file")
    return got


def tokenize_windows(tokenizer: Any, text: str, seq_len: int) -> torch.Tensor:
    """Tokenize ``text`` once without special tokens; return all non-overlapping windows ``[W, seq_len]``."""
    import torch

    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2, got {seq_len}")
    if not text.strip():
        raise ValueError("calibration text is empty")
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    n_windows = len(ids) // seq_len
    return torch.tensor(ids[: n_windows * seq_len], dtype=torch.int64).view(n_windows, seq_len)


def default_source() -> tuple[str, str, tuple[str, str] | None]:
    """The source to use when none is given: ``(source, why, (text, hash) already read or None)``.

    ``$LSAQ_CALIB`` (must name a file), else the shared WikiText-2 validation copy, else the hub dataset
    ``HF_DEFAULT`` (read here, so it is read once), else ``GENERATED``.
    """
    if env := os.environ.get("LSAQ_CALIB"):
        if not Path(env).expanduser().is_file():
            raise ValueError(f"LSAQ_CALIB={env!r} is not a file; point it at a .txt/.raw/.jsonl corpus or unset it")
        return env, "LSAQ_CALIB is set", None
    shared = shared_dir()
    if shared is not None and (shared / WIKITEXT_VALID).is_file():
        return str(shared / WIKITEXT_VALID), f"the local WikiText-2 copy under {shared}", None
    got = hf_dataset_text(HF_DEFAULT)
    if isinstance(got, str):
        return GENERATED, f"no local corpus ($LSAQ_CALIB, {WIKITEXT_VALID} under $LSAQ_SHARED) and no hub: {got}", None
    return HF_DEFAULT, "no local corpus ($LSAQ_CALIB, or WikiText-2 under $LSAQ_SHARED); read from the hub", got


# ------------------------------------------------------------------------------------------ generated text


def generate_calibration(
    model: nn.Module, tokenizer: Any, model_hash: str, *, samples: int, seq_len: int, seed: int,
    batch_size: int = SAMPLE_BATCH, progress: bool = True,
) -> CalibrationSet:
    """A ``kind="generated"`` set sampled from ``model`` (:func:`sample_sequences`), with a progress bar.

    Its source hash covers ``model_hash`` (the weights' content hash), the seed, the sampler and the start token.
    """
    import sys

    from tqdm import tqdm

    start = start_token(tokenizer, model)
    settings = dict(SAMPLER, start_token=start)
    source_hash = sha256_hex(canonical_json({"model": model_hash, "seed": seed, "sampler": settings}))
    cached = generated_cache_path(model, source_hash, samples=samples, seq_len=seq_len, batch_size=batch_size)
    tokens = read_generated(cached, samples, seq_len)
    if tokens is None:
        with tqdm(total=samples * (seq_len - 1), desc="generating text", unit="tok", file=sys.stderr,
                  disable=not progress) as bar:
            tokens = sample_sequences(model, start, samples, seq_len, seed, batch_size=batch_size,
                                      progress=bar.update)
        write_generated(cached, tokens)
    return _make(tokens, GENERATED, source_hash, seed, GENERATED)


def generated_cache_path(model: nn.Module, source_hash: str, *, samples: int, seq_len: int, batch_size: int) -> Path:
    """Where this machine keeps a generated set: sampling is the slow part of an evaluation or calibration without
    a corpus, and its result is a function of the weights (``source_hash``), the sizes, the batch size (batched
    matmuls round differently), the compute dtype and device, and the torch and lsaq versions."""
    import torch

    from lsaq.version import __version__

    param = next(model.parameters(), None)
    key = canonical_json({"source": source_hash, "samples": samples, "seq_len": seq_len, "batch": batch_size,
                          "dtype": str(param.dtype if param is not None else None),
                          "device": param.device.type if param is not None else "cpu",
                          "torch": torch.__version__, "lsaq": __version__})
    return cache_dir() / "generated" / f"{sha256_hex(key)[:32]}.safetensors"


def read_generated(path: Path, samples: int, seq_len: int) -> "torch.Tensor | None":
    """The cached token ids at ``path`` when they are there and whole (``[samples, seq_len]`` int64), else None."""
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tokens = load_file(str(path))["tokens"]
    except (OSError, KeyError, SafetensorError):
        return None
    return tokens if tokens.dtype == torch.int64 and tuple(tokens.shape) == (samples, seq_len) else None


def write_generated(path: Path, tokens: "torch.Tensor") -> None:
    """Keep generated token ids for :func:`read_generated` (atomically; a read-only cache only costs time)."""
    from safetensors.torch import save

    try:
        atomic_write_bytes(path, save({"tokens": tokens.contiguous()}))
    except OSError as e:
        log.warning("could not cache generated text in %s: %s", path, e)


# ------------------------------------------------------------------------------------------ loading a set


def check_calibration_source(source: str | None) -> None:
    """Refuse a local text file that cannot give a window (missing text), before a model is loaded."""
    path = Path(source).expanduser() if source not in (None, GENERATED) else None
    if path is not None and path.is_file() and not path.read_bytes()[:1 << 20].strip():
        raise ValueError(f"calibration text {source!r} is empty")


def load_calibration(
    tokenizer: Any,
    source: str | None = None,
    *,
    samples: int = 32,
    seq_len: int = 512,
    seed: int = 0,
    model: "LoadedModel | Callable[[], LoadedModel] | None" = None,
) -> CalibrationSet:
    """Draw ``samples`` sequences of ``seq_len`` tokens from ``source``, seeded.

    ``source``: a file, a dataset name, ``"generated"`` (needs ``model``), or None for the default order of
    :func:`default_source` (its last resort, generated text, also needs ``model``). ``model``: the loaded model,
    or a function that loads it, called only when the text is generated. Logs one INFO line naming the source
    used and why.
    """
    if samples < 1:
        raise ValueError(f"samples must be at least 1, got {samples}")
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2, got {seq_len}")
    read = None
    if source is None:
        source, why, read = default_source()
    else:
        why = "given"
    log.info("calibration text: %s (%s)", "generated by the model" if source == GENERATED else source, why)
    if source == GENERATED:
        if model is None:
            raise ValueError("generated calibration text needs the model (pass model=...), or give a text source")
        model = model() if callable(model) else model
        return generate_calibration(model.model, tokenizer, model.info.content_hash, samples=samples,
                                    seq_len=seq_len, seed=seed)
    text, source_hash = read or read_text(source)
    windows = tokenize_windows(tokenizer, text, seq_len)
    if windows.shape[0] < samples:
        raise ValueError(
            f"calibration text {source!r} is too short: it gives {windows.shape[0]} windows of {seq_len} tokens, "
            f"{samples} samples are needed (use fewer --samples, a shorter --seq-len or more text)"
        )
    import torch

    gen = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(windows.shape[0], generator=gen)[:samples]
    kind = "file" if Path(source).expanduser().is_file() else "dataset"
    return _make(windows[chosen], source, source_hash, seed, kind)


# ------------------------------------------------------------------------------------------ the stage


def calibrate(
    model: str | None,
    out: str | Path,
    *,
    source: str | None = None,
    samples: int = 32,
    seq_len: int = 512,
    seed: int = 0,
    revision: str | None = None,
) -> CalibrationInfo:
    """Draw a calibration set for ``model`` and write it to the directory ``out``; return its record.

    ``out`` gets ``calibration.json`` (schema ``lsaq.calibration``: the model's identity and the set's
    :class:`CalibrationInfo`, and ``memory``: the run's peak host memory, :func:`calibration_memory`) and
    ``tokens.safetensors`` (``tokens``: ``[samples, seq_len]`` int64), both in one atomic directory write: ``out``
    is replaced as a whole, so it must be new, empty or a calibration directory. ``model`` None is the default model; ``source`` as for :func:`load_calibration`.
    """
    from safetensors.torch import save_file

    from lsaq.version import __version__
    from lsaq.models.identity import ModelRef
    from lsaq.models.loading import empty_model, load_tokenizer, locate_model, model_info
    from lsaq.resources import PeakMemory

    out = Path(out)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / RECORD_FILE).is_file())):
        raise ValueError(f"{out} exists and is not a calibration directory; it would be replaced, give a new path")
    check_calibration_source(source)
    with PeakMemory() as peak:
        located = locate_model(model, revision=revision)  # text needs only the tokenizer; generated text the model
        calib = load_calibration(load_tokenizer(located), source, samples=samples, seq_len=seq_len, seed=seed,
                                 model=whole_model_loader(model, revision=revision))
        info = calib.info()
        ref = ModelRef.from_info(model_info(located, empty_model(located.load_dir)))
    # generated text runs the whole model on the CPU in float32; text needs the tokenizer alone
    memory = peak.record("cpu", "float32" if info.kind == "generated" else "tokenizer only")
    record = {"schema": SCHEMA, "version": VERSION, "lsaq_version": __version__,
              "model": ref.to_json(), "calibration": info.to_json(), "memory": memory.to_json()}
    with atomic_dir(out) as tmp:
        save_file({"tokens": calib.tokens.contiguous()}, str(tmp / TOKENS_FILE))
        atomic_write_json(tmp / RECORD_FILE, record)
    return info


def load_calibration_dir(path: str | Path) -> CalibrationSet:
    """Read a set written by :func:`calibrate`; :class:`RecordError` when the tokens do not match its hash."""
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    obj = read_record(path / RECORD_FILE, SCHEMA, VERSION)
    try:
        info = CalibrationInfo.from_json(obj["calibration"])
        tokens = load_file(str(check_weights_file(path / TOKENS_FILE)))["tokens"]
    except (KeyError, TypeError, SafetensorError, OSError) as e:
        raise RecordError(f"{path}: malformed calibration directory ({type(e).__name__}: {e})") from e
    if tokens.dtype != torch.int64 or tuple(tokens.shape) != (info.samples, info.seq_len):
        raise RecordError(f"{path}: tokens are {tokens.dtype} {tuple(tokens.shape)}, the record says int64 "
                          f"({info.samples}, {info.seq_len})")
    calib = _make(tokens, info.source, info.source_hash, info.seed, info.kind)
    if calib.hash != info.hash:
        raise RecordError(f"{path}: the tokens do not match the recorded hash {info.hash[:12]} (edited or corrupted)")
    return calib


def calibration_memory(path: str | Path) -> "RunMemory | None":
    """What drawing the set in the directory ``path`` took (:class:`~lsaq.resources.RunMemory`), None where its
    record does not say."""
    from lsaq.resources import RunMemory

    obj = read_record(Path(path) / RECORD_FILE, SCHEMA, VERSION)
    return decode_record(obj, lambda o: RunMemory.from_json(o.get("memory")), str(path), "calibration record")


def calibration_model(path: str | Path) -> "ModelRef":
    """The model a calibration directory was drawn for (its token ids are only meaningful to that tokenizer)."""
    from lsaq.models.identity import ModelRef

    obj = read_record(Path(path) / RECORD_FILE, SCHEMA, VERSION)
    return decode_record(obj, lambda o: ModelRef.from_json(o["model"]), str(path), "calibration record")


def check_calibration_dir(path: str | Path) -> "ModelRef":
    """The model a calibration directory was drawn for, after checking its record and its tokens file's header
    (``ValueError`` naming the file): the cheap checks, made before a model is loaded."""
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"calibration directory {path} {'is not a directory' if path.exists() else 'does not exist'}"
                         " (write one with `lsaq calibrate`)")
    made_for = calibration_model(path)
    if not (path / TOKENS_FILE).is_file():
        raise ValueError(f"{path}: incomplete calibration directory, missing {TOKENS_FILE}")
    check_weights_file(path / TOKENS_FILE)
    return made_for


def calibration_shape(path: str | Path) -> tuple[int, int]:
    """``(samples, seq_len)`` of a calibration directory's tokens, from its file's header (no token is read)."""
    from safetensors import safe_open

    with safe_open(str(Path(path) / TOKENS_FILE), framework="pt") as f:
        samples, seq_len = f.get_slice("tokens").get_shape()
    return int(samples), int(seq_len)


def load_calibration_for(path: str | Path, info: "ModelInfo") -> CalibrationSet:
    """The calibration set in directory ``path``, after checking it was drawn for the model ``info`` describes
    (``ValueError`` otherwise: its token ids would mean nothing to this model's tokenizer)."""
    made_for = calibration_model(path)
    if made_for.content_hash != info.content_hash:
        raise ValueError(f"calibration set {path} was drawn for model {made_for.name!r} "
                         f"({str(made_for.content_hash)[:12]}), not for {info.id!r} "
                         f"({info.content_hash[:12]}); its token ids mean nothing to this tokenizer")
    return load_calibration_dir(path)


def whole_model_loader(model: str | None, *, revision: str | None = None,
                       trust_remote_code: bool = False) -> "Callable[[], LoadedModel]":
    """A function that loads ``model`` whole, in float32, for text generated by it (the one calibration step that
    cannot stream), after checking it fits in the memory available then: else ``ValueError`` saying what to give
    instead, before anything is loaded."""
    from lsaq.models.loading import empty_model, load_model, locate_model
    from lsaq.resources import memory_shortfall
    from lsaq.units import format_bytes

    def load() -> "LoadedModel":
        located = locate_model(model, revision=revision)
        params = sum(p.numel() for p in empty_model(located.load_dir, trust_remote_code=trust_remote_code).parameters())
        if (available := memory_shortfall(params * 4)) is not None:
            raise ValueError(f"calibration text generated by the model needs the whole model in memory: {located.id} "
                             f"takes about {format_bytes(params * 4)}, {format_bytes(available)} is available here; "
                             "give a calibration text file or a calibration directory (lsaq calibrate) instead")
        return load_model(model, revision=revision, trust_remote_code=trust_remote_code)

    return load
