"""The score stage: per-layer importance of a model on a calibration set, as a versioned record.

:func:`score` loads the model, draws (or reads) the calibration set, scores every decoder layer with one method
and writes the :class:`~lsaq.importance.scoring.LayerImportance` record. The calibration stage itself is
:func:`lsaq.importance.calibration.calibrate`; ``score`` takes its output directory or draws the set on the fly.
:func:`measure` is its sibling for the ``measured`` strategy: each layer's loss at each precision
(:class:`~lsaq.importance.cost.LayerLoss`), from the same model and calibration inputs.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

from lsaq.importance.calibration import load_calibration, load_calibration_for
from lsaq.importance.cost import DEFAULT_PROBES, LayerLoss, measure_layer_loss
from lsaq.importance.record import LayerImportance
from lsaq.importance.scoring import score_importance
from lsaq.importance.sensitivity import Probe
from lsaq.methods import DEFAULT_K, DEFAULT_METHOD, Method
from lsaq.models.families import model_shape
from lsaq.models.loading import load_model
from lsaq.planning.memory import AUTO_GROUP, fitting_group_size, parse_group_size
from lsaq.precision import Precision
from lsaq.precision import Quantizer

if TYPE_CHECKING:
    from lsaq.importance.calibration import CalibrationSet
    from lsaq.models.loading import LoadedModel

log = logging.getLogger(__name__)


def _positive(**values: int) -> None:
    for name, v in values.items():
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be at least 1, got {v!r}")


def _model_and_calibration(model: str | None, calibration: str | Path | None, source: str | None, samples: int,
                           seq_len: int, seed: int, revision: str | None,
                           trust_remote_code: bool) -> "tuple[LoadedModel, CalibrationSet]":
    """The loaded model and its calibration set: the directory ``calibration``, else drawn from ``source``."""
    if calibration is not None and source is not None:
        raise ValueError(f"give a calibration directory ({calibration}) or a calibration source ({source}), not both")
    loaded = load_model(model, revision=revision, trust_remote_code=trust_remote_code)
    if calibration is not None:
        return loaded, load_calibration_for(calibration, loaded.info)
    return loaded, load_calibration(loaded.tokenizer, source, samples=samples, seq_len=seq_len, seed=seed,
                                    model=loaded)


def score(
    model: str | None = None,
    out: str | Path | None = None,
    *,
    method: Method | str = DEFAULT_METHOD,
    k: int = DEFAULT_K,
    calibration: str | Path | None = None,
    source: str | None = None,
    samples: int = 32,
    seq_len: int = 512,
    seed: int = 0,
    batch_size: int = 4,
    revision: str | None = None,
    trust_remote_code: bool = False,
    progress: Callable[[int], None] | None = None,
) -> LayerImportance:
    """Rank the decoder layers of ``model`` (a local directory, ``.gguf``, hub id, or None: the embedded default).

    ``method``: ``cosine`` (LWQ, the default), ``jaccard`` (LSAQ's logit-lens top-``k`` Jaccard) or
    ``sensitivity`` (measured KL with one layer INT4). The calibration set is ``calibration`` (a directory written
    by :func:`lsaq.calibrate`) or else ``samples`` windows of ``seq_len`` tokens drawn with ``seed`` from
    ``source`` (a text/JSONL file, a dataset name, ``generated``, or None: the default order, see
    :func:`lsaq.importance.calibration.load_calibration`). ``out``: write the record there, atomically.
    ``progress`` is called with the number of sequences done after each batch.
    """
    method = Method.parse(method)  # bad choices fail before anything is loaded
    _positive(k=k, samples=samples, seq_len=seq_len, batch_size=batch_size)
    loaded, calib = _model_and_calibration(model, calibration, source, samples, seq_len, seed, revision,
                                           trust_remote_code)
    record = score_importance(loaded.model, loaded.info, calib, method, k, batch_size=batch_size, progress=progress)
    if out is not None:
        record.save(out)
    log.info("scored %d layers of %s with %s in %.1fs", record.num_layers, loaded.info.id, method.value,
             record.wall_time_s)
    return record


def measure(
    model: str | None = None,
    out: str | Path | None = None,
    *,
    probes: Sequence[str] = DEFAULT_PROBES,
    quantizer: str = "rtn",
    group_size: int | str | None = None,
    stride: int = 1,
    calibration: str | Path | None = None,
    source: str | None = None,
    samples: int = 32,
    seq_len: int = 512,
    seed: int = 0,
    batch_size: int = 4,
    revision: str | None = None,
    trust_remote_code: bool = False,
    progress: Callable[[int], None] | None = None,
) -> LayerLoss:
    """Measure every decoder layer's loss at every probe precision (``int8``, ``int4``, ``int4-g<size>``): the
    mean KL from the float model with only that layer quantized (:mod:`lsaq.importance.cost`), once for every
    device's plan (strategy ``measured``). ``quantizer``: whose codes each probe measures (``rtn``, or ``gptq`` on
    the calibration set's float activations): measure with the quantizer the builds will use. ``group_size``: also
    measure INT4 in groups of that size, or for ``"auto"`` of the largest size that divides every input width
    (:func:`~lsaq.planning.memory.fitting_group_size`), so plans can weigh the two INT4 formats. ``stride``: KL at
    every ``stride``-th position only (cheaper LM-head work; the README's study shows what it changes). Model,
    calibration and ``out`` as for :func:`score`."""
    Quantizer.parse(quantizer)
    group_size = parse_group_size(group_size)
    for probe in probes:
        Probe.parse(probe)  # bad probes fail before anything is loaded
    _positive(samples=samples, seq_len=seq_len, batch_size=batch_size, stride=stride)
    loaded, calib = _model_and_calibration(model, calibration, source, samples, seq_len, seed, revision,
                                           trust_remote_code)
    if group_size == AUTO_GROUP:
        group_size = fitting_group_size(model_shape(loaded.info.config))
    grouped = Probe(Precision.INT4, group_size).label if group_size is not None else None
    if grouped is not None and grouped not in {Probe.parse(p).label for p in probes}:
        probes = (*probes, grouped)
    record = measure_layer_loss(loaded.model, loaded.info, calib, probes, quantizer=quantizer, batch_size=batch_size,
                                stride=stride, progress=progress)
    if out is not None:
        record.save(out)
    log.info("measured %d layers x %s of %s in %.1fs (%.1f forward passes)", record.num_layers,
             "/".join(record.probes), loaded.info.id, record.seconds, record.cost_ratio)
    return record
