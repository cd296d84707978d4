"""Zero-shot accuracy through lm-evaluation-harness, on an in-memory model, offline.

For each task we load the harness's own YAML (prompt, target, choices, metrics), swap its hub dataset for the
local documents from :mod:`lsaq.eval.tasks` through the harness's ``custom_dataset`` hook, and run
``lm_eval.evaluator.evaluate`` with an ``HFLM`` wrapped around the model and tokenizer we already hold. So the
scoring is the harness's: log-likelihood of each choice given the prompt, ``acc`` = argmax log-likelihood,
``acc_norm`` = argmax log-likelihood divided by the choice's length in characters (``len(str)``; the harness's
byte-normalized variant is ``acc_bytes``, not reported by these tasks), zero-shot, the first ``limit`` documents
in file order. LAMBADA reports ``acc`` (the target word is the greedy continuation) and ``perplexity``.

With ``data="hub"`` the YAML is used unchanged (the harness downloads the dataset; needs the network).
``lm_eval`` is imported only when a task runs (install ``lm-eval==0.4.13``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from torch import nn

from lsaq.eval.options import DATA_CHOICES
from lsaq.eval.tasks import TASKS, data_root, has_local_data, load_local_docs, resolve_tasks

# Seed the harness's simple_evaluate gives the few-shot sampler; unused at 0 shots but set the same way.
FEWSHOT_SEED = 1234


@dataclass(frozen=True)
class TaskResult:
    """The harness's metrics for one task. ``n`` examples were scored out of ``n_total`` in the split."""

    task: str
    metrics: dict[str, float]  # e.g. {"acc": 0.64, "acc_norm": 0.66}
    stderr: dict[str, float | None]  # standard error of each metric (None where the harness gives none)
    n: int
    n_total: int
    data: str  # "local:<data folder>" or "hub:<dataset path>"
    data_hash: str | None  # sha256 over the local files' sha256 (None for hub data)
    seconds: float
    harness: str  # "lm_eval <version>"
    notes: tuple[str, ...] = field(default_factory=tuple)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _require_lm_eval() -> Any:
    try:
        import lm_eval
    except ImportError as e:
        raise RuntimeError(
            "zero-shot tasks need lm-evaluation-harness: pip install -c constraints.txt lm-eval==0.4.13"
        ) from e
    return lm_eval


def build_task(name: str, data: str = "auto", data_dir: str | Path | None = None) -> tuple[Any, str, str | None]:
    """A harness ``ConfigurableTask`` for ``name`` on local or hub data; returns ``(task, data, data_hash)``."""
    lm_eval = _require_lm_eval()
    from datasets import Dataset, DatasetDict
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.tasks._yaml_loader import load_yaml  # resolves `include:` and `!function` as the harness does

    name = resolve_tasks([name])[0]
    if data not in DATA_CHOICES:
        raise ValueError(f"unknown data source {data!r}; valid: {', '.join(DATA_CHOICES)}")
    spec = TASKS[name]
    use_local = data == "local" or (data == "auto" and has_local_data(name, data_dir))
    cfg = load_yaml(Path(lm_eval.__file__).parent / "tasks" / spec.harness_yaml, resolve_func=True)
    for key in ("tag", "group", "task_list"):  # grouping keys are not task settings
        cfg.pop(key, None)
    cfg["num_fewshot"] = 0
    if use_local:
        docs, digest = load_local_docs(name, data_dir)
        split = spec.split
        # Only the evaluated split exists locally; no training split means no few-shot pool is looked up.
        cfg.update(
            dataset_path=f"lsaq-local/{name}",
            dataset_name=None,
            dataset_kwargs=None,
            custom_dataset=lambda **_: DatasetDict({split: Dataset.from_list(docs)}),
            training_split=None,
            validation_split=split if split == "validation" else None,
            test_split=split if split == "test" else None,
            fewshot_split=None,
        )
        source, data_hash = f"local:{data_root(data_dir)}", digest
    else:
        source, data_hash = f"hub:{cfg.get('dataset_path')}", None
    try:
        task = ConfigurableTask(config=cfg)
    except Exception as e:
        if use_local:
            raise
        raise ValueError(
            f"task {name!r}: the hub dataset {cfg.get('dataset_path')!r} could not be loaded ({type(e).__name__}); "
            "offline, use the local copies (shared/data, or pass a data folder)"
        ) from e
    task.set_fewshot_seed(seed=FEWSHOT_SEED)
    return task, source, data_hash


@contextlib.contextmanager
def _harness_quirks(model: nn.Module) -> Iterator[None]:
    """Keep HFLM and the harness from side effects we do not want while they run.

    * ``HFLM.__init__`` calls ``model.tie_weights()``. The model arrives already tied; re-tying a model whose
      LM head or embedding was swapped for a quantized module could re-attach float weights to it.
    * Bootstrap standard errors (LAMBADA perplexity) fork a process pool unless ``DISABLE_MULTIPROC`` is set;
      the single-process path gives the same seeded result without forking a process that holds the model.
    * The harness prints to stdout (e.g. "bootstrapping for stddev"); that goes to stderr, so stdout stays ours.
    * Its warnings about being handed a pre-built model are expected here; they are shown only when lsaq
      logs at INFO (``lsaq -v``).
    """
    had_tie = "tie_weights" in vars(model)
    saved_tie = vars(model).get("tie_weights")
    saved_env = os.environ.get("DISABLE_MULTIPROC")
    harness_log = logging.getLogger("lm_eval")
    saved_level = harness_log.level
    model.tie_weights = lambda *a, **k: None  # instance attribute shadows the method
    os.environ["DISABLE_MULTIPROC"] = "1"
    if logging.getLogger("lsaq").getEffectiveLevel() > logging.INFO:
        harness_log.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        harness_log.setLevel(saved_level)
        if had_tie:
            model.tie_weights = saved_tie
        else:
            del model.tie_weights
        if saved_env is None:
            os.environ.pop("DISABLE_MULTIPROC", None)
        else:
            os.environ["DISABLE_MULTIPROC"] = saved_env


def _parse_results(name: str, res: dict[str, Any]) -> tuple[dict[str, float], dict[str, float | None], int, int]:
    """``res["results"][name]`` has keys like ``"acc,none"`` and ``"acc_stderr,none"``; pick them apart."""
    raw = res["results"][name]
    metrics, stderr = {}, {}
    for key, value in raw.items():
        metric, comma, _filter = key.partition(",")
        if not comma or metric.endswith("_stderr"):  # "alias", "name" and the like carry no value
            continue
        metrics[metric] = float(value)
        err = raw.get(f"{metric}_stderr,{_filter}")
        stderr[metric] = float(err) if isinstance(err, (int, float)) else None
    counts = res["n-samples"][name]
    return metrics, stderr, int(counts["effective"]), int(counts["original"])


def evaluate_tasks(
    model: nn.Module,
    tokenizer: Any,
    tasks: str | Sequence[str],
    limit: int | None = None,
    batch_size: int = 8,
    data: str = "auto",
    data_dir: str | Path | None = None,
    bootstrap_iters: int = 1000,
    progress: Callable[[str, "TaskResult"], None] | None = None,
) -> dict[str, TaskResult]:
    """Zero-shot accuracy of ``model`` on ``tasks`` (names or ``"piqa,arc_easy"``; ``"all"`` for all seven).

    ``model`` must be a transformers causal LM (HFLM reads its ``config`` and ``device``); quantized models
    whose linear layers were swapped in place qualify. ``limit`` scores only the first N examples of each task.
    ``data``: ``"local"`` (files under ``data_dir``, default ``shared/data``), ``"hub"`` (needs the network) or
    ``"auto"`` (local when present). ``bootstrap_iters`` is for metrics without a closed-form standard error
    (LAMBADA perplexity; the harness default is 100000). ``progress(name, result)`` is called after each task.
    """
    names = resolve_tasks(tasks)
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be at least 1 when given, got {limit}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if data not in DATA_CHOICES:
        raise ValueError(f"unknown data source {data!r}; valid: {', '.join(DATA_CHOICES)}")
    lm_eval = _require_lm_eval()
    from lm_eval.evaluator import evaluate
    from lm_eval.models.huggingface import HFLM

    was_training = model.training
    model.eval()
    results: dict[str, TaskResult] = {}
    try:
        with _harness_quirks(model):
            # Build every task first: missing or malformed data fails before minutes of scoring, not after.
            built = {name: build_task(name, data, data_dir) for name in names}
            lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
            for name, (task, source, data_hash) in built.items():
                start = time.perf_counter()
                res = evaluate(
                    lm=lm,
                    task_dict={"tasks": {name: task}, "groups": {}, "group_map": {}},
                    limit=limit,
                    bootstrap_iters=bootstrap_iters,
                    log_samples=False,
                )
                assert res is not None, "single-process evaluate returns results on rank 0"
                metrics, stderr, n, n_total = _parse_results(name, res)
                notes = (_HELLASWAG_NOTE,) if name == "hellaswag" and source.startswith("local:") else ()
                results[name] = TaskResult(
                    task=name, metrics=metrics, stderr=stderr, n=n, n_total=n_total, data=source,
                    data_hash=data_hash, seconds=time.perf_counter() - start,
                    harness=f"lm_eval {lm_eval.__version__}", notes=notes,
                )
                if progress is not None:
                    progress(name, results[name])
    finally:
        model.train(was_training)
    return results


_HELLASWAG_NOTE = (
    "local llama.cpp text form: ctx_a/ctx_b split rebuilt from the joined context, so scores are close to "
    "but not bit-identical with hub-data harness scores"
)

__all__ = ["DATA_CHOICES", "TaskResult", "build_task", "evaluate_tasks"]
