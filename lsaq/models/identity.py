"""Model identity records: :class:`ModelInfo` (a loaded model) and :class:`ModelRef` (what a plan was made for).

Torch-free, so that planning (which needs no weights) and the pipeline can carry and compare identities without
loading the numeric stack.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

from lsaq.records import canonical_json, sha256_hex


@dataclass(frozen=True)
class ModelInfo:
    """Identity of a loaded model, recorded in every result derived from it."""

    id: str  # what the user named: a path, a hub id, or "default"
    source: str  # resolved local path the weights were read from (a GGUF file or an HF directory)
    revision: str | None  # hub commit, or None for local files
    content_hash: str  # sha256 over the weight files (GGUF file, or safetensors files in name order)
    architecture: str  # e.g. "LlamaForCausalLM"
    model_type: str  # e.g. "llama"
    num_layers: int
    config: dict[str, Any]  # the HF config as a dict: enough to plan without weights
    # The float dtype the checkpoint declares for its weights ("bfloat16", "float16", "float32"), or None when it
    # says nothing usable (a GGUF file). Artifacts store their 16-bit tensors in a dtype derived from it.
    dtype: str | None = None

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> "ModelInfo":
        return cls(**known_fields(cls, obj))


@dataclass(frozen=True)
class ModelRef:
    """The model a plan (and so an artifact) was made for: weights when known, else only a config.

    ``content_hash`` is None for a plan made from a bare config (``lsaq plan --config llama-2-7b``): such a plan
    can be quantized only with an explicitly given model.
    """

    id: str | None
    model_type: str
    num_layers: int
    source: str | None = None
    revision: str | None = None
    content_hash: str | None = None
    config_hash: str | None = None
    architecture: str | None = None
    dtype: str | None = None

    @classmethod
    def from_info(cls, info: ModelInfo) -> "ModelRef":
        """The reference of a loaded (or scored) model."""
        return cls(id=info.id, model_type=info.model_type, num_layers=info.num_layers, source=info.source,
                   revision=info.revision, content_hash=info.content_hash, config_hash=config_hash(info.config),
                   architecture=info.architecture, dtype=info.dtype)

    @classmethod
    def from_config(cls, config: Mapping[str, Any], model_id: str, source: str | None, num_layers: int) -> "ModelRef":
        """The reference of a model known only by its config (no weights at hand)."""
        declared = config.get("dtype") or config.get("torch_dtype")
        return cls(id=model_id, model_type=str(config.get("model_type")), num_layers=num_layers, source=source,
                   config_hash=config_hash(config), architecture=(config.get("architectures") or [None])[0],
                   dtype=declared if isinstance(declared, str) else None)

    @property
    def name(self) -> str:
        return self.id or self.model_type

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> "ModelRef":
        return cls(**known_fields(cls, obj))


def known_fields(cls: type, obj: Mapping[str, Any]) -> dict[str, Any]:
    """The entries of ``obj`` that are fields of the dataclass ``cls``: records written with more (or, where fields
    have defaults, fewer) keys still read."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in obj.items() if k in names}


def config_hash(config: Mapping[str, Any]) -> str:
    """sha256 of a config's canonical JSON."""
    return sha256_hex(canonical_json(dict(config)))
