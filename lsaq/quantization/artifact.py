"""The per-device artifact: a Hugging Face directory in the compressed-tensors format, and lsaq's loader for it.

Layout of an artifact directory::

    config.json             model config + quantization_config (compressed-tensors, one group per format)
    model.safetensors       int8 codes / packed int4 words + 16-bit scales (compressed-tensors names), 16-bit rest;
                            or, past the shard size, model-0000i-of-0000N.safetensors + model.safetensors.index.json
    generation_config.json  tokenizer files
    lsaq_plan.json          the plan it was built from
    lsaq_artifact.json      manifest (:class:`~lsaq.quantization.record.Artifact`): size and sha256 of every
                            file, predicted vs stored tensor bytes, dtype, runtimes that load it

The 16-bit float (every float tensor and every scale) is :func:`lsaq.models.loading.storage_dtype` of the source's
declared dtype, and ``config.json`` declares it, so a default ``from_pretrained(dir)`` runs in it.

Stock ``transformers`` (with ``compressed-tensors`` installed) loads it with ``from_pretrained(dir)`` unless it
holds a form they cannot load (:func:`runtimes_for_plan`: an INT4 embedding, group-wise INT4); vLLM serves it
(every quantized linear weight-only "pack-quantized", :mod:`lsaq.planning.vllm`) unless it holds an INT8
embedding or INT4 groups its kernels do not take;
:func:`lsaq.quantization.reader.load_quantized` loads every artifact onto lsaq's packed kernels. The directory is
written atomically.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator

import torch

from lsaq.version import __version__
from lsaq.engine.writer import DEFAULT_MAX_SHARD_BYTES, ShardWriter
from lsaq.models.identity import ModelInfo, ModelRef
from lsaq.models.loading import LoadedModel, storage_dtype
from lsaq.planning.memory import head_tensor, weight_tensor_bytes
from lsaq.planning.planner import Plan
from lsaq.planning.vllm import vllm_refusal
from lsaq.precision import Precision
from lsaq.quantization.apply import (
    artifact_state_dict,
    check_plan,
    quantize_embeddings,
    quantize_layers,
    quantize_model,
)
from lsaq.quantization.record import (
    LSAQ_RUNTIME,
    MANIFEST,
    PLAN,
    REQUIRED,
    STOCK_RUNTIME,
    VLLM_RUNTIME,
    WEIGHTS,
    WEIGHTS_INDEX,
    Artifact,
)
from lsaq.precision import Quantizer
from lsaq.quantization.sequential import check_quantizer
from lsaq.quantization.verify import ArtifactError, verify_artifact
from lsaq.records import atomic_dir, atomic_write_json, file_sha256

if TYPE_CHECKING:
    from lsaq.engine.skeleton import Skeleton
    from lsaq.calibration.sets import CalibrationSet

__all__ = ["MANIFEST", "PLAN", "WEIGHTS", "WEIGHTS_INDEX", "REQUIRED", "ArtifactError", "quantization_config",
           "runtimes_for_plan", "write_artifact", "write_streamed_artifact", "verify_artifact",
           "resident_bytes"]


def _weight_args(precision: Precision, group_size: int | None) -> dict[str, Any]:
    grouped = precision is Precision.INT4 and group_size is not None
    return {
        "num_bits": precision.bits, "type": "int", "symmetric": not grouped, "dynamic": False,
        "strategy": "group" if grouped else "channel", "group_size": group_size if grouped else None,
        "observer": "minmax",
    }


PACKED_FORMAT, INT8_EMBEDDING_FORMAT = "pack-quantized", "int-quantized"


def _module(tensor_name: str) -> str:
    return tensor_name.removesuffix(".weight")


def quantization_config(plan: Plan) -> dict[str, Any]:
    """compressed-tensors ``quantization_config``: one config group per quantized precision and format, targets by
    regex (decoder linears of the layers at that precision, and the embedding / LM head when the policy quantizes
    them: compressed-tensors accepts ``nn.Embedding`` targets, one scale per token row for the "channel" strategy).

    Every linear is weight-only "pack-quantized" (INT8 at 8 bits, INT4 at 4), the form vLLM's WNA16 kernels
    serve; an INT8 embedding is "int-quantized", the form stock transformers loads for an embedding."""
    shape, policy = plan.shape, plan.options.policy
    linear_names = "|".join(re.escape(lin.name) for lin in shape.layer_linears)
    prefix = re.escape(shape.layer_prefix)
    head = head_tensor(shape, policy)
    extra: dict[tuple[Precision, str], list[str]] = {}
    if policy.embed is not Precision.FP16:
        fmt = INT8_EMBEDDING_FORMAT if policy.embed is Precision.INT8 else PACKED_FORMAT
        extra.setdefault((policy.embed, fmt), []).append(_module(shape.embed.name))
    if head is not None and policy.head_precision is not Precision.FP16:
        extra.setdefault((policy.head_precision, PACKED_FORMAT), []).append(_module(head.name))
    groups, formats = {}, set()
    for precision in (Precision.INT8, Precision.INT4):
        for fmt in (PACKED_FORMAT, INT8_EMBEDDING_FORMAT):
            layers = [i for i, p in enumerate(plan.precisions) if p is precision] if fmt == PACKED_FORMAT else []
            targets = [f"re:^{prefix}\\.({'|'.join(map(str, layers))})\\.({linear_names})$"] if layers else []
            targets += [f"re:^{re.escape(name)}$" for name in extra.get((precision, fmt), [])]
            if not targets:
                continue
            formats.add(fmt)
            group_size = policy.group_size if precision is Precision.INT4 else None
            groups[f"group_{len(groups)}"] = {
                "targets": targets,
                "weights": _weight_args(precision, group_size),
                "input_activations": None,
                "output_activations": None,
                "format": fmt,
            }
    quantized_head = head is not None and policy.head_precision is not Precision.FP16
    return {
        "quant_method": "compressed-tensors",
        "format": formats.pop() if len(formats) == 1 else "mixed-precision",
        "quantization_status": "compressed",
        "config_groups": groups,
        "ignore": [] if quantized_head else ["lm_head"],
    }


def runtimes_for_plan(plan: Plan) -> tuple[str, ...]:
    """The runtimes that load an artifact of ``plan``: lsaq's always; stock transformers 5.23 + compressed-tensors
    0.20 unless the artifact holds an INT4 embedding (its weight initialisation looks for the ``weight`` a
    pack-quantized embedding does not have) or group-wise INT4 anywhere (it mis-sizes the packed zero points);
    vLLM unless :func:`~lsaq.planning.vllm.vllm_refusal` names what it cannot serve."""
    policy = plan.options.policy
    int4 = Precision.INT4 in plan.precisions or Precision.INT4 in (policy.embed, policy.head_precision)
    runtimes = [LSAQ_RUNTIME]
    if not (policy.embed is Precision.INT4 or (int4 and policy.group_size is not None)):
        runtimes.append(STOCK_RUNTIME)
    if vllm_refusal(policy, int4) is None:
        runtimes.append(VLLM_RUNTIME)
    return tuple(runtimes)


def write_artifact(
    loaded: LoadedModel, plan: Plan, out_dir: str | Path, *, progress: Callable[[int], None] | None = None,
    quantizer: Quantizer | str = Quantizer.RTN, calibration: CalibrationSet | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> Path:
    """Quantize ``loaded`` (in place) following ``plan`` and write the artifact directory atomically.

    ``quantizer``/``calibration``: how codes are chosen (:func:`lsaq.quantization.apply.quantize_model`); the
    manifest records both. ``max_shard_bytes``: tensor bytes per weights file
    (:class:`~lsaq.engine.writer.ShardWriter`).

    Every tensor's bytes must equal the plan's byte model (:func:`lsaq.planning.memory.weight_tensor_bytes`):
    a difference is a bug and nothing is written.
    """
    dtype = storage_dtype(loaded.info.dtype)
    quantizer = Quantizer.parse(quantizer)
    model = quantize_model(loaded.model, loaded.info, plan, progress=progress, quantizer=quantizer,
                           calibration=calibration.tokens if calibration is not None else None)
    tensors = artifact_state_dict(model, dtype)
    return _write(out_dir, tensors.items(), loaded.info, plan, loaded.tokenizer,
                  getattr(model, "generation_config", None), quantizer, calibration, max_shard_bytes)


def write_streamed_artifact(skeleton: Skeleton, info: ModelInfo, tokenizer: Any, plan: Plan, out_dir: str | Path, *,
                            quantizer: Quantizer | str = Quantizer.RTN, calibration: CalibrationSet | None = None,
                            generation_config: Any = None, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                            progress: Callable[[int], None] | None = None) -> Path:
    """Quantize ``skeleton``'s model following ``plan`` one decoder layer at a time (each read from the checkpoint,
    quantized, its artifact tensors written to the current weights shard, released) and write the artifact
    directory atomically: the same files, byte for byte, as :func:`write_artifact`. GPTQ carries the calibration
    tokens' hidden states through the quantized layers, each layer called with its own arguments. Memory: the
    skeleton, one float layer and its quantized tensors, and the hidden states."""
    dtype = storage_dtype(info.dtype)
    quantizer = Quantizer.parse(quantizer)
    parts = skeleton.parts
    check_plan(plan, info, parts)
    check_quantizer(quantizer, calibration, what="a calibration set")

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        tokens = calibration.tokens if calibration is not None else None
        for i, layer in quantize_layers(skeleton, plan, dtype, tokens, progress):
            prefix = f"{skeleton.layer_prefix}.{i}."
            yield from ((prefix + n, t) for n, t in artifact_state_dict(layer, dtype).items())
        with torch.inference_mode():
            quantize_embeddings(skeleton.model, plan, dtype)
        yield from artifact_state_dict(skeleton.model, dtype, skip=skeleton.layer_prefix + ".").items()

    return _write(out_dir, tensors(), info, plan, tokenizer, generation_config, quantizer, calibration,
                  max_shard_bytes)


def _write(out_dir: str | Path, tensors: Iterable[tuple[str, torch.Tensor]], info: ModelInfo,
           plan: Plan, tokenizer: Any, generation_config: Any, quantizer: Quantizer,
           calibration: CalibrationSet | None, max_shard_bytes: int) -> Path:
    """Write the artifact directory atomically: the weights shard by shard as ``tensors`` yields them, each
    checked against the plan's byte model on arrival (all of them at the end), then config, plan, tokenizer and
    manifest."""
    dtype_name = str(storage_dtype(info.dtype)).removeprefix("torch.")
    predicted = weight_tensor_bytes(plan.shape, plan.precisions, plan.options.policy)
    config = info.config | {"dtype": dtype_name, "torch_dtype": dtype_name,
                            "quantization_config": quantization_config(plan)}
    config.pop("_name_or_path", None)
    if plan.options.policy.unties(plan.shape):  # the head is stored on its own (see quantize_embeddings)
        config["tie_word_embeddings"] = False
    with atomic_dir(out_dir) as tmp:
        # One metadata key: safetensors writes metadata from a hash map whose order varies between calls, so two
        # keys would make the same artifact's bytes differ (the plan id is in lsaq_plan.json and the manifest).
        writer = ShardWriter(tmp, max_shard_bytes, metadata={"format": "pt"})
        stored: dict[str, int] = {}
        for name, t in tensors:
            stored[name] = t.numel() * t.element_size()
            if predicted.get(name) != stored[name]:
                _differs(stored, predicted, name)
            writer.add(name, t)
            del t
        if stored != predicted:
            _differs(stored, predicted, None)
        writer.finish()
        atomic_write_json(tmp / "config.json", config)
        plan.save(tmp / PLAN)
        tokenizer.save_pretrained(tmp)
        if generation_config is not None:
            generation_config.save_pretrained(tmp)
        files = sorted(p.name for p in tmp.iterdir() if p.is_file())
        record = Artifact(
            path=Path(out_dir), plan_id=plan.id, model=ModelRef.from_info(info), dtype=dtype_name,
            files={f: ((tmp / f).stat().st_size, file_sha256(tmp / f)) for f in files},
            tensor_bytes=sum(stored.values()), predicted_tensor_bytes=sum(predicted.values()),
            runtimes=runtimes_for_plan(plan), lsaq_version=__version__, quantizer=quantizer.value,
            calibration=calibration.hash if calibration is not None else None,
        )
        atomic_write_json(tmp / MANIFEST, record.manifest_json())
    return Path(out_dir)


def _differs(stored: dict[str, int], predicted: dict[str, int], name: str | None) -> None:
    """The memory model promised the predicted bytes; a difference is a bug, never shipped."""
    if name is not None:
        diff = [(name, stored[name]), (name, predicted.get(name))]
    else:
        diff = sorted(set(stored.items()) ^ set(predicted.items()))[:6]
    raise AssertionError(f"artifact tensors differ from the memory model's prediction: {diff}")


# ------------------------------------------------------------------------------------------------ loading


def resident_bytes(model: torch.nn.Module) -> int:
    """Bytes of every distinct tensor storage the model holds (parameters and buffers)."""
    seen: dict[int, int] = {}
    for t in list(model.parameters()) + list(model.buffers()):
        if t.device.type != "meta":
            s = t.untyped_storage()
            seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())
