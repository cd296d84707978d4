"""Random-weight checkpoints of real shapes, written shard by shard: how the scale tests and benchmarks get a 7B
(or a 70B-width layer) on a machine that could never hold it, without downloading one.

:func:`write_random_checkpoint` takes a model config (a shipped name such as ``llama-2-7b``, or a dict), writes
``config.json``, one safetensors shard per ``layers_per_shard`` decoder layers plus one for the embedding, final
norm and head, ``model.safetensors.index.json`` (transformers' names), and a character-level tokenizer (ids below
100, so any vocabulary holds them). Memory: one shard's tensors at a time. Weights are N(0, 0.02) (norms 1), so
hidden states stay in a realistic range; the values mean nothing.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping

import torch

from lsaq.models.families import family
from lsaq.models.loading import empty_model

STD = 0.02


def char_tokenizer() -> Any:
    """A character-level tokenizer: 4 specials, then printable ASCII (ids 4-98), built offline."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<s>", "</s>"]
    vocab = {t: i for i, t in enumerate(specials + [chr(c) for c in range(32, 127)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>")


def write_random_checkpoint(config: Mapping[str, Any], path: str | Path, *, layers: int | None = None,
                            dtype: torch.dtype = torch.bfloat16, layers_per_shard: int = 1, seed: int = 0) -> Path:
    """Write a random checkpoint of ``config``'s shapes (``layers``: override ``num_hidden_layers``) into the new
    directory ``path``, in ``dtype``, one shard at a time; returns ``path``."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True)
    config = {k: v for k, v in config.items() if not k.startswith("_lsaq")}
    if layers is not None:
        config["num_hidden_layers"] = layers
    config["dtype"] = str(dtype).removeprefix("torch.")
    config.pop("torch_dtype", None)
    (path / "config.json").write_text(json.dumps(config, indent=2))
    prefix = family(config.get("model_type")).layer_prefix + "."
    model = empty_model(path, dtype)
    tied = getattr(model.config.get_text_config(), "tie_word_embeddings", False)
    head = model.get_output_embeddings().weight
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters(remove_duplicate=False)
              if not (tied and p is head and n.startswith("lm_head"))}
    groups: dict[int, list[str]] = {}
    for name in shapes:
        index = int(name[len(prefix):].split(".")[0]) // layers_per_shard if name.startswith(prefix) else -1
        groups.setdefault(index, []).append(name)
    order = sorted(groups, key=lambda g: (g < 0, g))  # layer shards first, then the rest
    gen = torch.Generator().manual_seed(seed)
    weight_map: dict[str, str] = {}
    for i, group in enumerate(order):
        file = f"model-{i + 1:05d}-of-{len(order):05d}.safetensors"
        tensors = {n: random_tensor(n, shapes[n], dtype, gen) for n in groups[group]}
        save_file(tensors, str(path / file), metadata={"format": "pt"})
        weight_map.update({n: file for n in tensors})
        del tensors
    index = {"metadata": {"total_size": sum(math.prod(s) for s in shapes.values()) * dtype.itemsize},
             "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    char_tokenizer().save_pretrained(path)
    return path


def random_tensor(name: str, shape: tuple[int, ...], dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """Norm weights 1, biases 0, everything else N(0, STD), in ``dtype``."""
    if name.endswith("bias"):
        return torch.zeros(shape, dtype=dtype)
    if len(shape) == 1:
        return torch.ones(shape, dtype=dtype)
    return (torch.randn(shape, generator=gen) * STD).to(dtype)

