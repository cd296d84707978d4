"""The quantize stage: a plan (and the model it was made for) in, an artifact directory and its record out.

:func:`quantize` quantizes the model following the plan (:mod:`lsaq.quantization.apply`) one decoder layer at a
time from the checkpoint (:mod:`lsaq.engine`; GPTQ carries the calibration activations through the quantized layers),
checks every tensor against the plan's byte model and writes the compressed-tensors directory atomically
(:mod:`lsaq.quantization.artifact`). It returns the :class:`~lsaq.quantization.record.Artifact` record: paths and
identities only, no model or tensor crosses the stage boundary.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

import torch

from lsaq.atomic import temp_dir
from lsaq.calibration.sets import calibration_shape, check_calibration_dir, load_calibration_for
from lsaq.compute import AUTO, check_compute_device, check_max_memory, compute_for, host_need, within_max_memory
from lsaq.models.families import model_shape
from lsaq.models.identity import ModelRef
from lsaq.engine.checkpoint import Checkpoint
from lsaq.engine.skeleton import Skeleton
from lsaq.engine.writer import DEFAULT_MAX_SHARD_BYTES
from lsaq.models.loading import empty_model, generation_config, load_tokenizer, locate_model, model_info
from lsaq.models.parts import decoder_parts
from lsaq.planning.memory import WeightPolicy
from lsaq.planning.planner import Plan
from lsaq.quantization.apply import check_plan
from lsaq.quantization.artifact import write_streamed_artifact
from lsaq.quantization.record import Artifact
from lsaq.precision import Quantizer
from lsaq.quantization.sequential import CALIBRATION_BATCH, check_quantizer
from lsaq.resources import PeakMemory
from lsaq.runtime import Runtime
from lsaq.units import format_bytes, parse_bytes

__all__ = ["Artifact", "Quantizer", "quantize", "plan_model_source", "check_shard_size"]

log = logging.getLogger(__name__)

DEFAULT_MODEL_IDS = (None, "default")  # ids load_model gives the embedded default model
MIN_SHARD_BYTES = 10**6  # "1 MB"; below it nearly every tensor gets a shard: refused as a mistake


def plan_model_source(model: ModelRef) -> str | None:
    """What to load for the model a plan was made for: its recorded source (a local path), else its id; None (the
    embedded default model) for the default's ids. ``ValueError`` for a plan made from a bare config, which names
    no weights."""
    if model.content_hash is None:
        raise ValueError(f"the plan was made from a bare config ({model.name}), which names no weights; "
                         "give the model to quantize (model=..., or --model)")
    if model.id in DEFAULT_MODEL_IDS:
        return None
    return model.source or model.id


def quantize(
    plan: Plan | str | Path,
    out: str | Path,
    *,
    model: str | None = None,
    quantizer: Quantizer | str = Quantizer.RTN,
    calibration: str | Path | None = None,
    max_shard_size: int | str | None = None,
    compute_device: str = AUTO,
    max_memory: int | str | None = None,
    progress: Callable[[int], None] | None = None,
) -> Artifact:
    """Quantize a model following ``plan`` (a :class:`Plan` or its JSON file) into the artifact directory ``out``.

    The model is ``model`` when given (a local directory, ``.gguf`` or hub id), else the one the plan was made for
    (:func:`plan_model_source`); a plan made for other weights is refused (content hash, shapes). ``out`` is
    replaced atomically: an interrupted or refused run leaves no partial directory. ``quantizer``: ``rtn``
    (round-to-nearest) or ``gptq`` (error feedback on the activations of ``calibration``, a calibration directory
    drawn for this model by :func:`lsaq.calibrate`; same files and bytes). ``progress`` is called with the index of
    each decoder layer once it is quantized.

    ``max_shard_size`` (bytes, or a size such as ``"5GB"``): the weights go into ``model.safetensors`` up to that
    many tensor bytes, else into shards with ``model.safetensors.index.json`` (default: transformers' 50 GB). The
    returned record carries where it computed and the run's peak host and device memory (``memory``).

    ``compute_device``: ``auto``, ``cpu`` or ``cuda:N`` (:mod:`lsaq.compute`); weights are read in float32 on any
    device, so round-to-nearest codes are the same bytes wherever they are computed. ``max_memory`` (bytes or a
    size): the host memory the run may use; refused before any layer is read when one layer's step needs more.
    """
    plan = plan if isinstance(plan, Plan) else Plan.load(plan)
    if plan.options.gguf:
        return quantize_gguf(plan, out, model=model, quantizer=quantizer, calibration=calibration,
                             compute_device=compute_device, max_memory=max_memory, progress=progress)
    quantizer = check_quantizer(quantizer, calibration)  # before the model loads
    shard_bytes = check_shard_size(max_shard_size)
    check_compute_device(compute_device)
    limit = check_max_memory(max_memory)
    if calibration is not None:
        check_calibration_dir(calibration)
    source = model if model is not None else plan_model_source(plan.model)
    start = time.perf_counter()
    with PeakMemory() as peak:
        located = locate_model(source)
        extra = gptq_bytes(located.config) if calibration else 0
        # GPTQ's walk: its calibration tokens, CALIBRATION_BATCH sequences per layer call (none for round to nearest)
        samples, seq_len = calibration_shape(calibration) if calibration is not None else (0, 0)
        positions, tokens = min(samples, CALIBRATION_BATCH) * seq_len, samples * seq_len
        compute = compute_for(compute_device, located.config, positions, dtype=torch.float32, extra=extra)
        peak.watch(compute.device)
        within_max_memory(limit, host_need(model_shape(located.config), positions, tokens, compute, extra))
        skeleton = Skeleton.build(Checkpoint.open(located.load_dir), device=compute.device)  # a layer at a time
        info = model_info(located, skeleton.model)
        calib = load_calibration_for(calibration, info) if calibration is not None else None
        path = write_streamed_artifact(skeleton, info, load_tokenizer(located), plan, out, quantizer=quantizer,
                                       calibration=calib, progress=progress, max_shard_bytes=shard_bytes,
                                       generation_config=generation_config(located.load_dir, skeleton.model))
    artifact = replace(Artifact.load(path), memory=peak.record(compute.device, compute.dtype))
    log.info("quantized %s into %s (%s, %s; %d tensor bytes, %s) in %.1fs, peak host memory %s", info.id, path,
             plan.mix, quantizer.value, artifact.tensor_bytes, artifact.dtype, time.perf_counter() - start,
             format_bytes(peak.host_bytes) if peak.host_bytes is not None else "unknown")
    return artifact


def quantize_gguf(plan: Plan, out: str | Path, *, model: str | None = None,
                  quantizer: Quantizer | str = Quantizer.RTN, calibration: str | Path | None = None,
                  compute_device: str = AUTO, max_memory: int | str | None = None,
                  progress: Callable[[int], None] | None = None) -> Artifact:
    """The GGUF build of a llama.cpp ``plan`` (:func:`lsaq.quantization.gguf_build.write_gguf_artifact`) in the
    directory ``out``, from ``model`` or the plan's own (a safetensors checkpoint is converted to a float GGUF first
    by llama.cpp's converter, :func:`lsaq.models.hf_gguf.hf_to_gguf`); refused, before any weight is read, for a
    plan made for other weights, GPTQ with INT4 in K-quants, or a safetensors source without the converter.

    ``rtn``: llama.cpp's quantizer rounds every tensor from the source's values. ``gptq``: :func:`quantize` first
    makes the compressed-tensors build of the same precisions (INT4 per channel for Q4_0, in groups of 32 for
    Q4_1; the other arguments as there) in a temporary directory beside ``out``, and the GGUF keeps its decoder
    layers' codes exactly (:mod:`lsaq.quantization.ggml_codes`); the embedding and head are llama.cpp's."""
    from lsaq.models.hf_gguf import hf_to_gguf
    from lsaq.planning.ggml import CODE_GROUPS
    from lsaq.quantization.gguf_build import check_gguf_source, write_gguf_artifact
    from lsaq.quantization.ggml_quant import check_llama_cpp
    from lsaq.quantization.reader import ArtifactCodes

    quantizer = check_quantizer(quantizer, calibration)
    source = model if model is not None else plan_model_source(plan.model)
    out = Path(out)
    start = time.perf_counter()
    with PeakMemory() as peak:
        located = locate_model(source)
        check_gguf_source(located.path, quantizer, plan.options.gguf_int4, plan.options.gguf_int8)
        if calibration is not None:
            check_calibration_dir(calibration)
        check_llama_cpp()
        empty = empty_model(located.load_dir)  # the structure, no weights: the identity and the plan's check
        info = model_info(located, empty)
        check_plan(plan, info, decoder_parts(empty))
        del empty
        codes, calibration_hash, work = None, None, None
        try:
            if quantizer is not Quantizer.RTN:
                # the compressed-tensors build whose codes the GGUF keeps: a temporary beside ``out`` (a killed
                # run's is swept by the next, lsaq.atomic)
                work = temp_dir(out.absolute().with_name(out.name + ".codes"))
                group = CODE_GROUPS[plan.options.gguf_int4]
                ct_plan = replace(plan, options=replace(plan.options, runtime=Runtime.TRANSFORMERS,
                                                        policy=WeightPolicy(group_size=group)))
                calibration_hash = quantize(ct_plan, work / "codes", model=source, quantizer=quantizer,
                                            calibration=calibration, compute_device=compute_device,
                                            max_memory=max_memory, progress=progress).calibration
                codes = ArtifactCodes(work / "codes")
            gguf = (located.path if located.path.suffix == ".gguf"
                    else hf_to_gguf(located.load_dir, located.content_hash, located.declared_dtype))
            path = write_gguf_artifact(gguf, located.declared_dtype, plan, ModelRef.from_info(info), out, codes,
                                       quantizer, calibration_hash)
        finally:
            if work is not None:
                shutil.rmtree(work, ignore_errors=True)
    artifact = replace(Artifact.load(path), memory=peak.record(torch.device("cpu"), torch.float32))
    log.info("built %s as GGUF into %s (%s, %s; %d tensor bytes) in %.1fs, peak host memory %s", info.id, path,
             plan.mix, quantizer.value, artifact.tensor_bytes, time.perf_counter() - start,
             format_bytes(peak.host_bytes) if peak.host_bytes is not None else "unknown")
    return artifact


def gptq_bytes(config: dict) -> int:
    """GPTQ's own buffers at its peak: a float64 ``[in, in]`` Hessian and about 1.5 more for its inverse factor,
    for the widest input of a layer (the MLP's down projection)."""
    from lsaq.models.families import model_shape

    widest = max(lin.in_features for lin in model_shape(config).layer_linears)
    return int(2.5 * widest * widest * 8)


def check_shard_size(value: int | str | None) -> int:
    """Tensor bytes per weights file from ``--max-shard-size``/``max_shard_size`` (None: transformers' default);
    ``ValueError`` naming the value unless it is a size of at least 1 MB."""
    if value is None:
        return DEFAULT_MAX_SHARD_BYTES
    size = parse_bytes(value, what="max shard size")
    if size < MIN_SHARD_BYTES:
        raise ValueError(f"max shard size: {value!r} is below the smallest allowed, 1 MB ({MIN_SHARD_BYTES} bytes)")
    return size
