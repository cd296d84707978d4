"""A GGUF file as a float safetensors checkpoint, converted one tensor at a time.

lsaq reads a model's weights from safetensors; a ``.gguf`` source is converted once into a float HF directory
(config, tokenizer, safetensors shards with an index) and cached. The conversion never holds a whole float model:
each GGUF tensor is read from the file (plain reads, not the memory map, so the source's pages do not pile up in
the process's resident memory), dequantized by the ``gguf`` package in blocks of rows, given its transformers name
and layout (transformers' own name map and tensor processors: Llama's q/k row order, Gemma's norm offset) and
written to the current shard. Peak memory is the parsed metadata (vocabulary-sized) and about three copies of the
largest tensor in float32, whatever the depth.

Every tensor holds exactly the values that transformers' ``from_pretrained(gguf_file=...)`` produces in float32:
stored in bfloat16 when bfloat16 holds all of them (tensors that were BF16 in the GGUF), else in float32 (a
dequantized block's ``scale * q + min`` rarely fits bfloat16's 8 mantissa bits).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from lsaq.engine.writer import DEFAULT_MAX_SHARD_BYTES, ShardWriter

DEQUANT_BLOCK_BYTES = 64 * 2**20  # float32 output per dequantize call: bounds the gguf package's temporaries


def gguf_config(gguf: Path) -> Any:
    """transformers' config of ``gguf`` from its metadata (no tensor is read), in float32."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if hasattr(config, "quantization_config"):  # a plain float checkpoint must not name GGUF's dequantizer
        del config.quantization_config
    config.dtype = torch.float32
    return config


def _empty(config: Any) -> torch.nn.Module:
    """The model of ``config`` with its parameters on the meta device: its transformers tensor names."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.tie_weights()  # a tied head shares the embedding's tensor (from_config leaves meta parameters apart)
    return model


def dequantized(file, tensor: Any) -> np.ndarray:
    """GGUF ``tensor`` (a ``gguf.ReaderTensor``) as float32, shaped as ``gguf.dequantize(tensor.data, ...)``
    shapes it: read from the open binary ``file`` and dequantized in blocks of whole rows (a quantization block
    never spans two rows)."""
    from gguf import dequantize

    raw = tensor.data  # a memory-mapped view: only its dtype and shape are used here
    rows = int(np.prod(raw.shape[:-1], dtype=np.int64))
    per_row = raw.shape[-1]
    row_bytes = per_row * raw.dtype.itemsize
    out: np.ndarray | None = None
    start = 0
    while start < rows:
        if out is None:  # the first block tells the elements per row; the rest are sized from it
            count = 1
        else:
            count = max(1, min(rows - start, DEQUANT_BLOCK_BYTES // (4 * out.shape[1])))
        file.seek(int(tensor.data_offset) + start * row_bytes)
        block = np.fromfile(file, dtype=raw.dtype, count=count * per_row)
        if block.size != count * per_row:
            raise ValueError(f"{file.name}: tensor {tensor.name} ends early (file truncated?)")
        values = dequantize(block.reshape(count, per_row), tensor.tensor_type)
        if out is None:
            out = np.empty((rows, values.shape[1]), dtype=np.float32)
        out[start:start + count] = values
        start += count
    if out is None:  # a tensor without elements
        out = dequantize(np.empty(raw.shape, raw.dtype), tensor.tensor_type).astype(np.float32)
    return out.reshape(*raw.shape[:-1], out.shape[-1])


def exact_dtype(t: torch.Tensor, block: int = 2**22) -> torch.dtype:
    """bfloat16 when every value of float32 ``t`` survives bfloat16 unchanged, else float32 (in blocks of
    ``block`` elements, so the check costs a block's memory)."""
    flat = t.reshape(-1)
    for i in range(0, flat.numel(), block):
        part = flat[i:i + block]
        if not torch.equal(part.to(torch.bfloat16).float(), part):
            return torch.float32
    return torch.bfloat16


def convert_gguf(gguf: Path, directory: Path, *, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> list[str]:
    """Write ``gguf`` into the existing, empty ``directory`` as a float checkpoint: config, generation config,
    tokenizer and safetensors shards with an index (tensor by tensor). Returns the weight files' names.
    ``ValueError`` when the file holds an architecture transformers cannot read or misses a weight."""
    from gguf import GGUFReader
    from transformers import AutoTokenizer, GenerationConfig
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor, get_gguf_hf_weights_map

    config = gguf_config(gguf)
    model = _empty(config)
    config.architectures = [type(model).__name__]  # as save_pretrained names it
    reader = GGUFReader(gguf)
    arch_field = reader.fields["general.architecture"]
    architecture = bytes(arch_field.parts[arch_field.data[0]]).decode()
    reader.fields.clear()  # the parsed metadata (the vocabulary: ~165 MB for 49k tokens) is in config already
    processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=config.to_dict())
    names = get_gguf_hf_weights_map(model, processor)
    parsed: dict[str, Any] = {"config": config.to_dict(), "tensors": {}}  # where MoE processors stack experts

    writer = ShardWriter(directory, max_shard_bytes)
    with open(gguf, "rb") as f:
        for tensor in reader.tensors:
            result = processor.process(weights=dequantized(f, tensor), name=tensor.name,
                                       tensor_key_mapping=names, parsed_parameters=parsed)
            if result.name in names:
                t = torch.from_numpy(np.ascontiguousarray(result.weights, dtype=np.float32))
                writer.add(names[result.name], t.to(exact_dtype(t)))
            for name in list(parsed["tensors"]):
                t = parsed["tensors"].pop(name).float().contiguous()
                writer.add(name, t.to(exact_dtype(t)))
    missing = sorted(set(model.state_dict()) - writer.written - _tied(model))
    if missing:
        raise ValueError(f"{gguf}: no tensor for {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''} "
                         f"({architecture} as {type(model).__name__})")
    files = writer.finish()

    config.save_pretrained(directory)
    try:  # the generation settings beside the GGUF, as from_pretrained finds them, else the config's
        generation = GenerationConfig.from_pretrained(gguf.parent)
    except OSError:
        generation = GenerationConfig.from_model_config(config)
    generation.save_pretrained(directory)
    # The tokenizer: HF tokenizer files beside the GGUF, else the GGUF's own vocabulary.
    beside = (gguf.parent / "tokenizer.json").is_file() or (gguf.parent / "tokenizer_config.json").is_file()
    tokenizer = (AutoTokenizer.from_pretrained(gguf.parent) if beside
                 else AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name))
    tokenizer.save_pretrained(directory)
    return files


def _tied(model: torch.nn.Module) -> set[str]:
    """Names of parameters that share another parameter's tensor (a tied LM head): not stored."""
    seen: dict[int, str] = {}
    tied = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            tied.add(name)
        seen.setdefault(id(p), name)
    return tied


__all__ = ["DEQUANT_BLOCK_BYTES", "convert_gguf", "dequantized", "exact_dtype", "gguf_config"]
