"""Loading causal LMs (local directory, hub id, GGUF file) with the identity record every result carries.

``load_model`` returns the model, its tokenizer and a :class:`ModelInfo` identity record (id, revision, content
hash, architecture, config) that every downstream result carries.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lsaq.models.families import family
from lsaq.models.identity import ModelInfo
from lsaq.models.parts import decoder_parts
from lsaq.models.weights import (
    WEIGHT_SUFFIXES,
    check_model_spec,
    check_weights_file,
    content_hash,
    is_hub_id,
    weight_files,
)
from lsaq.paths import cache_dir
from lsaq.records import atomic_dir, atomic_write_json

log = logging.getLogger(__name__)

FLOAT_DTYPES = ("bfloat16", "float16", "float32")


def storage_dtype(declared: str | None) -> torch.dtype:
    """The 16-bit dtype an artifact stores float tensors in: float16 only when the source says float16.

    bfloat16 otherwise (source bfloat16, float32, or unknown as for a GGUF): most current checkpoints are
    bf16-native, and a bf16-trained model's activations can overflow float16's range (65504).
    """
    return torch.float16 if declared == "float16" else torch.bfloat16


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: Any
    info: ModelInfo


# ----------------------------------------------------------------------------------------------- loading


def _resolve_hub(model_id: str, revision: str | None) -> tuple[Path, str]:
    """Download (or find in the HF cache) a hub snapshot; clear error when offline or unknown."""
    from huggingface_hub import snapshot_download

    try:
        path = snapshot_download(
            model_id,
            revision=revision,
            allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja"],
        )
    except Exception as e:  # hub errors come in many classes; all mean "cannot resolve"
        raise ValueError(
            f"model {model_id!r} is not a local path and could not be resolved on the Hugging Face hub "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'no detail'}); "
            "pass a local directory or .gguf file, or check the id and your network"
        ) from e
    return Path(path), Path(path).name  # snapshot folder name is the commit hash


def _gguf_to_float_dir(gguf: Path, digest: str) -> Path:
    """Convert a GGUF file once, tensor by tensor, to a float HF directory (safetensors) in the cache; its path."""
    from lsaq.models.gguf import convert_gguf

    target = cache_dir() / "gguf" / digest[:24]
    if (target / "lsaq_source.json").is_file():
        return target
    log.info("converting %s to a float checkpoint in %s (once, tensor by tensor)", gguf, target)
    with atomic_dir(target) as tmp:
        convert_gguf(gguf, tmp)
        atomic_write_json(tmp / "lsaq_source.json", {"gguf": str(gguf), "sha256": digest})
    return target


@dataclass(frozen=True)
class LocatedModel:
    """Where a model's weights are and who they are, found without loading them (only a GGUF is converted, once).

    ``path``: what was named, resolved (a ``.gguf`` file, an HF directory, or a hub snapshot directory);
    ``load_dir``: the HF directory to load (a GGUF's float copy in the cache); ``declared_dtype``: the float dtype
    the checkpoint declares (None for a GGUF, whose float copy declares the conversion's dtype).
    """

    id: str
    path: Path
    load_dir: Path
    revision: str | None
    content_hash: str
    config: dict[str, Any]
    declared_dtype: str | None

    @property
    def model_type(self) -> str:
        return str(self.config.get("model_type", "?"))


def locate_model(source: str | os.PathLike | None = None, *, revision: str | None = None) -> LocatedModel:
    """Resolve ``source`` (as for :func:`load_model`) to its files, content hash and config without loading the
    model: the identity every cache key and store key of the pipeline starts from. ``ValueError`` names what is
    wrong (a missing path, no safetensors, an unsupported family)."""
    model_id = "default" if source is None else str(source)
    if source is None:
        from lsaq.models.default import default_model_path

        source = default_model_path()
    path = Path(source).expanduser()
    hub_revision = None
    if path.exists() or not is_hub_id(str(source)):
        check_model_spec(str(source))  # a damaged file is named here, not by the converter or the loader
        path, files = weight_files(path)
        digest = content_hash(files)
        load_dir = _gguf_to_float_dir(path, digest) if path.suffix == ".gguf" else path
    else:
        load_dir, hub_revision = _resolve_hub(str(source), revision)
        files = [p for p in load_dir.iterdir() if p.suffix in WEIGHT_SUFFIXES]
        digest = content_hash(files)
    config_file = load_dir / "config.json"
    if not config_file.is_file():
        raise ValueError(f"model directory {load_dir} has no config.json")
    raw_config = json.loads(config_file.read_text())
    family(raw_config.get("model_type", "?"), f" in {config_file}")
    if hub_revision is not None:
        for f in files:
            check_weights_file(f)  # the hub's files, which check_model_spec does not see
    # A GGUF's converted float copy declares the conversion dtype, not the source's: no usable dtype there.
    declared = None if path.suffix == ".gguf" else raw_config.get("dtype") or raw_config.get("torch_dtype")
    return LocatedModel(id=model_id, path=path if hub_revision is None else load_dir, load_dir=load_dir,
                        revision=hub_revision, content_hash=digest, config=raw_config,
                        declared_dtype=declared if declared in FLOAT_DTYPES else None)


def load_model(
    source: str | os.PathLike | None = None,
    *,
    revision: str | None = None,
    dtype: torch.dtype = torch.float32,
    trust_remote_code: bool = False,
) -> LoadedModel:
    """Load a causal LM and its tokenizer from a local HF directory, a ``.gguf`` file or a hub id.

    ``source=None`` loads the embedded default model (see :mod:`lsaq.models.default`). GGUF files are
    dequantized once and cached as a float safetensors checkpoint, so later loads are fast. Only safetensors
    weights are read; ``trust_remote_code`` is off unless asked for.
    """
    from transformers import AutoModelForCausalLM

    located = locate_model(source, revision=revision)
    model = AutoModelForCausalLM.from_pretrained(
        located.load_dir, dtype=dtype, use_safetensors=True, trust_remote_code=trust_remote_code
    )
    model.eval()
    tokenizer = load_tokenizer(located, trust_remote_code)
    return LoadedModel(model=model, tokenizer=tokenizer, info=model_info(located, model))


def empty_model(load_dir: Path, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False) -> nn.Module:
    """The model of ``load_dir``'s config with every parameter on the meta device and every buffer real (rotary
    frequencies, embedding scales), in eval mode: its structure and identity without its weights' memory."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(load_dir, trust_remote_code=trust_remote_code)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    return model.eval()


def load_tokenizer(located: LocatedModel, trust_remote_code: bool = False) -> Any:
    """The tokenizer beside ``located``'s weights."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(located.load_dir, trust_remote_code=trust_remote_code)


def generation_config(load_dir: Path, model: nn.Module) -> Any:
    """The generation config ``from_pretrained`` gives ``model``: the directory's ``generation_config.json`` when it
    has one, else the one derived from the model's config."""
    from transformers import GenerationConfig

    if (Path(load_dir) / "generation_config.json").is_file():
        return GenerationConfig.from_pretrained(load_dir)
    return getattr(model, "generation_config", None)


def model_info(located: LocatedModel, model: nn.Module) -> ModelInfo:
    """The identity record of ``located``'s model, built (weights loaded, or a layer-streaming skeleton)."""
    config = model.config.to_dict()
    return ModelInfo(
        id=located.id,
        source=str(located.path),
        revision=located.revision,
        content_hash=located.content_hash,
        architecture=(config.get("architectures") or [type(model).__name__])[0],
        model_type=located.model_type,
        num_layers=len(decoder_parts(model).layers),
        config=json.loads(json.dumps(config, default=str)),
        dtype=located.declared_dtype,
    )
