"""A GGUF build: one ``.gguf`` file that llama.cpp runs, each tensor in the type its plan gives it.

The writer streams: the header (metadata and every tensor's name, shape, type and size, all known from the byte
model of :mod:`lsaq.planning.ggml`) is written first, then each tensor is read from the source, quantized by
llama.cpp's own quantizer (:mod:`lsaq.quantization.ggml_quant`) and appended; only one tensor is in memory at a
time (float32 plus its encoding: 0.5 GiB for a 32000 x 4096 embedding). A weight whose lsaq codes are given (GPTQ's,
read from a compressed-tensors build of the same precisions) is written from them instead, code for code
(:mod:`lsaq.quantization.ggml_codes`). Each tensor's bytes are checked against the byte model as it is written,
so the file's data section is exactly :func:`lsaq.planning.ggml.gguf_data_bytes` of the plan.

The source is a GGUF file (the default model, any llama.cpp model, or a safetensors checkpoint converted by
llama.cpp's own converter, :mod:`lsaq.models.hf_gguf`): its tensors are already in llama.cpp's names
and layouts (dequantized to float32 by the ``gguf`` package, the values every lsaq stage reads), and its
metadata (architecture, hyperparameters, tokenizer, chat template) is copied. Source tensors that no plan covers
(e.g. ``rope_freqs``) are copied as they are. lsaq adds ``general.quantized_by`` and ``lsaq.precisions`` (one per
decoder layer).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from lsaq.atomic import temp_file
from lsaq.models.gguf import dequantized
from lsaq.models.hf_gguf import converter
from lsaq.models.identity import ModelRef
from lsaq.models.shapes import ModelShape
from lsaq.planning.ggml import (CODE_GROUPS, UBATCH, GgufFormats, GgufTensor, Int4Format, Int8Format,
                                gguf_data_bytes, gguf_tensors, padded, type_counts)
from lsaq.planning.memory import WeightPolicy
from lsaq.planning.planner import Plan
from lsaq.precision import Precision, Quantizer
from lsaq.quantization.ggml_codes import encode_codes, permute_rope
from lsaq.quantization.ggml_quant import check_llama_cpp, quantize_rows
from lsaq.quantization.primitives import QuantizedWeight
from lsaq.quantization.record import GGUF, GGUF_WEIGHTS, LLAMA_CPP_RUNTIME, MANIFEST, MODELFILE, PLAN, Artifact
from lsaq.records import atomic_dir, atomic_write_bytes, atomic_write_json, file_sha256
from lsaq.version import __version__

Codes = Callable[[str], "QuantizedWeight | None"]  # transformers weight name -> its lsaq codes, None: quantize it
SKIPPED_KEYS = ("general.architecture", "general.file_type", "general.quantization_version", "general.alignment")


@dataclass(frozen=True)
class GgufFile:
    """What a GGUF build wrote: the file's size, its data section as predicted, the types of its tensors."""

    path: Path
    file_bytes: int
    data_bytes: int  # the data section as written: every tensor padded to the alignment
    types: dict[str, int] = field(default_factory=dict)  # ggml type name -> tensors
    copied: tuple[str, ...] = ()  # source tensors no plan covers, copied unchanged
    copied_bytes: int = 0  # their share of the data section

    @property
    def planned_bytes(self) -> int:
        """The data section's planned tensors: what the byte model predicts."""
        return self.data_bytes - self.copied_bytes

    @property
    def header_bytes(self) -> int:
        """Metadata and tensor infos: what the file holds besides the data section."""
        return self.file_bytes - self.data_bytes

    def to_json(self) -> dict[str, Any]:
        return {"file": self.path.name, "file_bytes": self.file_bytes, "data_bytes": self.data_bytes,
                "header_bytes": self.header_bytes, "types": dict(self.types), "copied": list(self.copied),
                "copied_bytes": self.copied_bytes}


def _text(field_: Any) -> str:
    return bytes(field_.parts[field_.data[0]]).decode()


def llama_names(shape: ModelShape, architecture: str) -> dict[str, str]:
    """transformers name -> llama.cpp name for every tensor of ``shape`` (gguf's tensor name map of
    ``architecture``); ``ValueError`` naming a tensor llama.cpp has no name for."""
    import gguf

    arch = next((a for a, name in gguf.MODEL_ARCH_NAMES.items() if name == architecture), None)
    if arch is None:
        raise ValueError(f"GGUF architecture {architecture!r} is unknown to the gguf package")
    names = gguf.get_tensor_name_map(arch, shape.num_layers)
    hf = [shape.embed.name, "lm_head.weight"] + [t.name for t in shape.final_norms]
    for i in range(shape.num_layers):
        for lin in shape.layer_linears:
            hf += [shape.layer_name(i, f"{lin.name}.weight"), shape.layer_name(i, f"{lin.name}.bias")]
        hf += [shape.layer_name(i, t.name) for t in shape.layer_norms]
    out = {}
    for name in hf:
        mapped = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if mapped is not None:
            out[name] = mapped
    return out


def _copy_metadata(reader: Any, writer: Any, precisions: Sequence[Precision]) -> None:
    import gguf

    for f in reader.fields.values():
        if f.name.startswith("GGUF.") or f.name in SKIPPED_KEYS:
            continue
        sub = f.types[-1] if f.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(f.name, f.contents(), f.types[0], sub_type=sub)
    writer.add_file_type(gguf.LlamaFileType.GUESSED)  # a per-tensor mix is none of llama.cpp's named file types
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_string("general.quantized_by", f"lsaq {__version__}")
    writer.add_array("lsaq.precisions", [p.value for p in precisions])


def rope_heads(reader: Any, architecture: str) -> dict[str, int]:
    """llama.cpp name part -> heads for the projections whose rows llama.cpp stores in its rotary order
    (``{"attn_q": heads, "attn_k": kv_heads}``): exactly those transformers' GGUF loader puts back in its own order
    when lsaq reads the source (its tensor processor for ``architecture``); empty for other architectures."""
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, LlamaTensorProcessor

    processor = TENSOR_PROCESSORS.get(architecture)
    if processor is None or not issubclass(processor, LlamaTensorProcessor):
        return {}
    heads = int(reader.fields[f"{architecture}.attention.head_count"].contents())
    kv = reader.fields.get(f"{architecture}.attention.head_count_kv")
    return {"attn_q": heads, "attn_k": int(kv.contents()) if kv is not None else heads}


def _encode(f: Any, source: Any, planned: GgufTensor, name: str, codes: Codes | None,
            rope: Mapping[str, int]) -> np.ndarray:
    """The bytes of ``planned`` (llama.cpp's ``name``): its lsaq codes as ggml blocks when ``codes`` holds them
    (rows moved to llama.cpp's rotary order where ``rope`` says), else ``source`` (a ``gguf.ReaderTensor``,
    float32 ``[rows, row]`` or ``[n]`` in llama.cpp's layout) quantized by llama.cpp in its planned type."""
    qw = codes(planned.name) if codes is not None else None
    if qw is not None:
        heads = rope.get(name.split(".")[2]) if name.startswith("blk.") else None
        kind, data = encode_codes(permute_rope(qw, heads) if heads else qw)
        if kind is not planned.type or qw.shape != tuple(planned.shape):
            raise ValueError(f"{planned.name}: its codes are {kind.name} {list(qw.shape)}, the plan stores "
                             f"{planned.type.name} {list(planned.shape)}")
        return data
    values = dequantized(f, source)
    if values.shape != planned.shape:
        raise ValueError(f"source tensor {source.name} has shape {list(values.shape)}, the plan expects "
                         f"{list(planned.shape)}")
    return quantize_rows(values, planned.type)


def write_gguf(source: str | os.PathLike, shape: ModelShape, precisions: Sequence[Precision], policy: WeightPolicy,
               formats: GgufFormats, out: str | os.PathLike, codes: Codes | None = None) -> GgufFile:
    """Write the GGUF build of ``source`` (a ``.gguf`` file) with decoder layer ``i`` at ``precisions[i]`` to the
    file ``out`` (through a temporary beside it: nothing half-written is left under that name). ``codes``: lsaq's
    codes by transformers weight name (:class:`~lsaq.quantization.reader.ArtifactCodes`, e.g. GPTQ's), kept code
    for code (:mod:`lsaq.quantization.ggml_codes`); weights it does not hold are quantized by llama.cpp.

    ``ValueError`` when the source lacks a planned tensor or holds it in another shape; ``LlamaCppMissing`` when
    llama.cpp's quantizer is not installed (checked before anything is read)."""
    import gguf

    check_llama_cpp()
    source, out = Path(source), Path(out)
    planned = gguf_tensors(shape, precisions, policy, formats)
    reader = gguf.GGUFReader(source)
    architecture = _text(reader.fields["general.architecture"])
    names = llama_names(shape, architecture)
    rope = rope_heads(reader, architecture) if codes is not None else {}
    by_name = {t.name: t for t in reader.tensors}
    rows: list[tuple[str, GgufTensor, Any]] = []  # (llama.cpp name, planned tensor, source tensor)
    for t in planned:
        name = names.get(t.name)
        if name is None:
            raise ValueError(f"{source}: llama.cpp ({architecture}) has no tensor name for {t.name}")
        src = by_name.get(name)
        if src is None and name == "output.weight":  # a tied model's head, stored on its own by the policy
            src = by_name.get(names[shape.embed.name])
        if src is None:
            raise ValueError(f"{source}: no tensor {name} (for {t.name})")
        rows.append((name, t, src))
    covered = {name for name, _, _ in rows}
    copied = [t for t in reader.tensors if t.name not in covered]

    tmp = temp_file(out)
    try:
        writer = gguf.GGUFWriter(tmp, architecture)
        _copy_metadata(reader, writer, precisions)
        for name, t, _ in rows:
            writer.add_tensor_info(name, t.shape, np.dtype(np.float32), t.nbytes,
                                   raw_dtype=gguf.GGMLQuantizationType(int(t.type)))
        for src in copied:
            data = np.asarray(src.data)
            writer.add_tensor_info(src.name, data.shape, data.dtype, int(src.n_bytes), raw_dtype=src.tensor_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        written = copied_bytes = 0
        with open(source, "rb") as f:
            for name, t, src in rows:
                data = _encode(f, src, t, name, codes, rope)
                if data.nbytes != t.nbytes:  # the byte model and llama.cpp's quantizer disagree: a bug
                    raise RuntimeError(f"{name}: {data.nbytes} bytes of {t.type.name}, the byte model says {t.nbytes}")
                writer.write_tensor_data(data)
                written += padded(data.nbytes)
        for src in copied:
            data = np.asarray(src.data)
            writer.write_tensor_data(data)
            copied_bytes += padded(data.nbytes)
        writer.close()
        os.replace(tmp, out)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    counts = type_counts([t.type.name for _, t, _ in rows] + [s.tensor_type.name for s in copied])
    return GgufFile(out, out.stat().st_size, written + copied_bytes, counts, tuple(s.name for s in copied),
                    copied_bytes)


def check_gguf_source(path: Path, quantizer: Quantizer | str, int4: Int4Format | str = Int4Format.Q4_K,
                      int8: Int8Format | str = Int8Format.Q8_0) -> None:
    """``ValueError`` (before any weight is read) unless a GGUF build with INT4 as ``int4`` and INT8 as ``int8`` can
    be made from ``path`` with ``quantizer``: a safetensors checkpoint needs llama.cpp's converter
    (:func:`lsaq.models.hf_gguf.converter`); GPTQ's codes are kept in Q8_0, Q4_0 and Q4_1, not in K-quants (whose
    scales llama.cpp's quantizer searches itself)."""
    quantizer, formats = Quantizer.parse(quantizer), GgufFormats(int4=int4, int8=int8)
    if quantizer is not Quantizer.RTN and not formats.holds_codes:
        if formats.int4 not in CODE_GROUPS:
            raise ValueError(f"quantizer {quantizer.value!r} cannot make a GGUF build with INT4 as "
                             f"{formats.int4.value} (llama.cpp's K-quants choose their own scales): use --gguf-int4 "
                             "q4_0 (per-channel INT4 codes) or q4_1 (groups of 32), or quantizer rtn")
        raise ValueError(f"quantizer {quantizer.value!r} cannot make a GGUF build with INT8 as {formats.int8.value} "
                         "(llama.cpp's K-quants choose their own scales): use --gguf-int8 q8_0, or quantizer rtn")
    if path.suffix != ".gguf":
        converter()


def modelfile(plan: Plan) -> str:
    """ollama's recipe for the build: the file, and the context and batch the plan's memory was counted at (the
    chat template and stop tokens are in the GGUF's metadata)."""
    o = plan.options
    return (f"# {plan.model.name} for {plan.device.name}: {plan.mix} (lsaq plan {plan.id[:12]})\n"
            f"FROM ./{GGUF_WEIGHTS}\nPARAMETER num_ctx {o.context}\nPARAMETER num_batch {min(UBATCH, o.context)}\n")


def write_gguf_artifact(source: Path, declared_dtype: str | None, plan: Plan, model: ModelRef,
                        out_dir: str | os.PathLike, codes: Codes | None = None,
                        quantizer: Quantizer = Quantizer.RTN, calibration: str | None = None) -> Path:
    """The build directory of a llama.cpp ``plan``: ``model.gguf``, ``Modelfile``, the plan and the manifest,
    written atomically (:func:`lsaq.records.atomic_dir`). ``codes``, ``quantizer``, ``calibration``: the decoder
    layers' codes when another quantizer chose them (:func:`write_gguf`), its name and its calibration's hash for
    the manifest."""
    formats = GgufFormats.for_source(declared_dtype, plan.options.gguf_int4, plan.options.gguf_int8)
    predicted = gguf_data_bytes(gguf_tensors(plan.shape, plan.precisions, plan.options.policy, formats))
    with atomic_dir(out_dir) as tmp:
        built = write_gguf(source, plan.shape, plan.precisions, plan.options.policy, formats, tmp / GGUF_WEIGHTS,
                           codes)
        if built.planned_bytes != predicted:  # the byte model promised these bytes: a difference is a bug
            raise AssertionError(f"GGUF tensors take {built.planned_bytes} bytes, the byte model says {predicted}")
        atomic_write_bytes(tmp / MODELFILE, modelfile(plan).encode())
        plan.save(tmp / PLAN)
        files = sorted(p.name for p in tmp.iterdir() if p.is_file())
        record = Artifact(
            path=Path(out_dir), plan_id=plan.id, model=model,
            dtype="bfloat16" if formats.float_type == "bf16" else "float16",
            files={f: ((tmp / f).stat().st_size, file_sha256(tmp / f)) for f in files},
            tensor_bytes=built.planned_bytes, predicted_tensor_bytes=predicted, runtimes=(LLAMA_CPP_RUNTIME,),
            lsaq_version=__version__, quantizer=quantizer.value, calibration=calibration,
            format=GGUF,
        )
        atomic_write_json(tmp / MANIFEST, record.manifest_json())
    return Path(out_dir)


def read_gguf_types(path: str | os.PathLike) -> dict[str, str]:
    """llama.cpp tensor name -> ggml type name of every tensor in the GGUF file ``path`` (tests, verification)."""
    import gguf

    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}


def gguf_metadata(path: str | os.PathLike, keys: Sequence[str]) -> Mapping[str, Any]:
    """The values of metadata ``keys`` present in the GGUF file ``path``."""
    import gguf

    fields = gguf.GGUFReader(path).fields
    return {k: fields[k].contents() for k in keys if k in fields}


__all__ = ["Codes", "GgufFile", "check_gguf_source", "gguf_metadata", "llama_names", "modelfile",
           "read_gguf_types", "rope_heads", "write_gguf", "write_gguf_artifact"]
