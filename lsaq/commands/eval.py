"""``lsaq eval``: WikiText perplexity and zero-shot accuracy of a model or of a quantized artifact.

A plain model (directory, ``.gguf``, hub id) gives a table and the ``lsaq.eval`` record (one run). An artifact
directory (from ``lsaq quantize``) is evaluated on lsaq's packed runtime and, unless ``--no-baseline``, beside the
float model its plan was made for, over the same windows and examples; the result is the ``lsaq.eval_report``
record of :mod:`lsaq.eval.report` (``--out r.json`` also writes ``r.md``), and ``--plots DIR`` draws its plan.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lsaq.planning.planner import Plan

SCHEMA = "lsaq.eval"
VERSION = 1
DTYPES = ("float32", "bfloat16")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="perplexity (GPTQ protocol) and zero-shot accuracy (lm-evaluation-harness)")
    p.add_argument("model_path", nargs="?", default=None, metavar="MODEL_OR_DIR",
                   help="local HF directory, .gguf file, hub id, or an artifact directory from `lsaq quantize` "
                        "(default: SmolLM2-135M)")
    p.add_argument("--model", default=None, help="same as MODEL_OR_DIR")
    p.add_argument("--ppl", action="store_true", help="measure perplexity")
    p.add_argument("--ppl-source", default=None,
                   help="perplexity text: .raw/.txt/.jsonl file or NAME[:CONFIG[:SPLIT]] dataset "
                        "(default: WikiText-2 raw test from shared/data, else wikitext:wikitext-2-raw-v1:test)")
    p.add_argument("--seq-len", type=int, default=2048, help="perplexity window in tokens (default 2048, capped at "
                                                               "the model's maximum)")
    p.add_argument("--max-windows", type=int, default=None, help="score only the first N windows (quick runs)")
    p.add_argument("--ppl-batch-size", type=int, default=None, help="windows per forward pass (default: ~4096 tokens)")
    p.add_argument("--tasks", default=None, help="comma-separated zero-shot tasks, or 'all' (valid: piqa, arc_easy, "
                                                 "arc_challenge, hellaswag, winogrande, boolq, lambada_openai)")
    p.add_argument("--limit", type=int, default=None, help="score only the first N examples of each task")
    p.add_argument("--task-batch-size", type=int, default=8, help="harness requests per forward pass (default 8)")
    p.add_argument("--task-data", default="auto", help="auto (local copies when present, default), local or hub")
    p.add_argument("--data-dir", default=None, help="folder with the local task copies (default: shared/data)")
    p.add_argument("--dtype", default="float32",
                   help="float dtype of the model(s): float32 (default) or bfloat16. With float32, an artifact's "
                        "INT8/INT4 layers compute the exact product of their stored codes for windows of >= 128 "
                        "tokens (dequantize path); shorter inputs use the bf16 CPU kernels")
    p.add_argument("--no-baseline", dest="baseline", action="store_false",
                   help="artifact only: skip evaluating the float model the plan was made for")
    p.add_argument("--baseline-model", default=None,
                   help="artifact only: the float baseline (default: the model the plan was made for; its content "
                        "hash must match the artifact's)")
    p.add_argument("--plots", default=None, metavar="DIR",
                   help="artifact only: draw plan_strip.png and memory.png of its plan into DIR (needs matplotlib)")
    p.add_argument("--out", default=None,
                   help="write the report as JSON here (for an artifact also a Markdown copy beside it, .md)")
    p.set_defaults(func=run)


def validate(args: argparse.Namespace) -> None:
    """Check what can be checked before loading anything, so bad input fails fast and writes nothing."""
    from lsaq.eval.harness import DATA_CHOICES
    from lsaq.eval.tasks import resolve_tasks

    if args.model_path and args.model and args.model_path != args.model:
        raise ValueError(f"two models given: {args.model_path!r} and --model {args.model!r}; give one")
    artifact = is_artifact(args.model_path or args.model)
    if not args.ppl and not args.tasks and not (artifact and args.plots):
        raise ValueError("nothing to do: pass --ppl and/or --tasks NAME[,NAME...]"
                         + (" (or --plots DIR)" if artifact else ""))
    if args.out and not args.ppl and not args.tasks:
        raise ValueError("--out needs --ppl and/or --tasks")
    if args.dtype not in DTYPES:
        raise ValueError(f"unknown --dtype {args.dtype!r}; valid: {', '.join(DTYPES)}")
    if not artifact:
        for flag, given in (("--plots", args.plots), ("--baseline-model", args.baseline_model),
                            ("--no-baseline", not args.baseline)):
            if given:
                raise ValueError(f"{flag} applies to an artifact directory (from `lsaq quantize`), not to "
                                 f"{args.model_path or args.model or 'the default model'}")
    if args.baseline_model and not args.baseline:
        raise ValueError("--baseline-model and --no-baseline contradict each other; give one")
    if args.plots:
        from lsaq.plots import MATPLOTLIB_HINT

        if importlib.util.find_spec("matplotlib") is None:
            raise ValueError(MATPLOTLIB_HINT)
    if args.ppl_source is not None and not args.ppl:
        raise ValueError("--ppl-source needs --ppl")
    if args.seq_len < 2:
        raise ValueError(f"--seq-len must be at least 2, got {args.seq_len}")
    for name in ("max_windows", "ppl_batch_size", "limit"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.task_batch_size < 1:
        raise ValueError(f"--task-batch-size must be at least 1, got {args.task_batch_size}")
    if args.task_data not in DATA_CHOICES:
        raise ValueError(f"unknown --task-data {args.task_data!r}; valid: {', '.join(DATA_CHOICES)}")
    if args.tasks:
        args.tasks = resolve_tasks(args.tasks)
        if importlib.util.find_spec("lm_eval") is None:
            raise ValueError("--tasks needs lm-evaluation-harness: pip install -c constraints.txt lm-eval==0.4.13")


def default_ppl_source() -> str:
    """WikiText-2 raw test: the shared local copy when present, else the hub dataset (needs network)."""
    from lsaq.paths import shared_dir

    shared = shared_dir()
    local = shared / "data" / "wikitext-2-raw" / "wiki.test.raw" if shared is not None else None
    return str(local) if local is not None and local.is_file() else "wikitext:wikitext-2-raw-v1:test"


@dataclass(frozen=True)
class ModelSource:
    """What :func:`_load` loads: a model (path, hub id, or None for the default) or an artifact directory."""

    path: str | None
    dtype: str = "float32"  # one of DTYPES
    artifact: bool = False


def is_artifact(path: str | None) -> bool:
    """A directory written by ``lsaq quantize`` (it has the manifest or the plan; a partial one is refused later)."""
    from lsaq.quantization.artifact import MANIFEST, PLAN

    return path is not None and Path(path).is_dir() and any((Path(path) / f).is_file() for f in (MANIFEST, PLAN))


def _load(source: ModelSource) -> Any:
    """Load what ``lsaq eval`` evaluates; returns a ``LoadedModel``.

    An artifact directory loads onto lsaq's packed runtime (:func:`lsaq.quantization.artifact.load_quantized`, sha256 of every
    file checked); anything else goes through :func:`lsaq.models.loading.load_model`. Float parts in ``source.dtype``.
    """
    import torch

    dtype = getattr(torch, source.dtype)
    if source.artifact:
        from lsaq.quantization.artifact import load_quantized

        return load_quantized(source.path, dtype=dtype)
    from lsaq.models.loading import load_model

    return load_model(source.path, dtype=dtype)


def _evaluate(loaded: Any, args: argparse.Namespace, label: str) -> tuple[Any, dict[str, Any]]:
    """Run the requested metrics on one loaded model: ``(PerplexityResult or None, {task: TaskResult})``."""
    ppl, tasks = None, {}
    if args.ppl:
        from tqdm import tqdm

        from lsaq.eval.perplexity import perplexity

        with tqdm(desc=f"perplexity{label}", unit="window", file=sys.stderr) as bar:
            ppl = perplexity(
                loaded.model, loaded.tokenizer, args.ppl_source, seq_len=args.seq_len, max_windows=args.max_windows,
                batch_size=args.ppl_batch_size, progress=bar.update,
            )
    if args.tasks:
        from lsaq.eval.harness import evaluate_tasks

        tasks = evaluate_tasks(
            loaded.model, loaded.tokenizer, args.tasks, limit=args.limit, batch_size=args.task_batch_size,
            data=args.task_data, data_dir=args.data_dir,
        )
    return ppl, tasks


def _measure(args: argparse.Namespace, source: ModelSource, label: str, *,
             content_hash: str | None = None) -> dict[str, Any]:
    """Load ``source``, run the requested metrics and free the model again: its run record
    (:func:`lsaq.eval.report.run_record`, seconds counted from the start of loading).

    ``content_hash``: the float weights the model must have (an artifact's baseline), checked before any metric.
    """
    import gc

    from lsaq.eval.report import run_record

    start = time.perf_counter()
    loaded = _load(source)
    if content_hash and loaded.info.content_hash != content_hash:
        raise ValueError(f"baseline model {source.path} (content {loaded.info.content_hash[:12]}) is not the "
                         f"model the artifact was made from (content {content_hash[:12]}); pass --baseline-model "
                         "or --no-baseline")
    ppl, tasks = _evaluate(loaded, args, label)
    record = run_record(loaded.info, perplexity=ppl, tasks=tasks, seconds=time.perf_counter() - start,
                        dtype=args.dtype, artifact=str(source.path) if source.artifact else None)
    del loaded, ppl, tasks
    gc.collect()  # free this model before the next one is loaded
    return record


def run(args: argparse.Namespace) -> int:
    validate(args)
    path = args.model_path or args.model
    if args.ppl:
        args.ppl_source = args.ppl_source or default_ppl_source()
    if is_artifact(path):
        return run_artifact(args, path)
    from lsaq import __version__
    from lsaq.records import atomic_write_json

    run = _measure(args, ModelSource(path, args.dtype), "")
    del run["artifact"]  # the plain record has no artifact field: {model, dtype, perplexity, tasks, seconds}
    report: dict[str, Any] = {"schema": SCHEMA, "version": VERSION, "lsaq_version": __version__, **run}
    print(format_report(report))
    if args.out:
        atomic_write_json(args.out, report)
        print(f"wrote {args.out}")
    return 0


def baseline_source(plan: "Plan", manifest: dict[str, Any]) -> str | None:
    """The float model an artifact was made from: the plan's model, or the manifest's for a plan from a bare
    config. Its recorded source path, else its id; None means the default model."""
    ident = plan.model.to_json() if plan.model.content_hash else manifest["model"]
    if ident.get("id") in (None, "default"):
        return None
    return ident.get("source") or ident.get("id")


def _check_baseline_reachable(source: str | None) -> None:
    from lsaq.models.loading import _is_hub_id

    if source is not None and not Path(source).expanduser().exists() and not _is_hub_id(source):
        raise ValueError(f"the artifact's base model {source} does not exist here; pass --baseline-model PATH, "
                         "or --no-baseline")


def run_artifact(args: argparse.Namespace, path: str) -> int:
    """``lsaq eval DIR`` on an artifact: quantized run, then the float baseline, one in memory at a time."""
    from lsaq.quantization.artifact import PLAN, verify_artifact
    from lsaq.eval.report import build_report, markdown_path, render_markdown, write_report
    from lsaq.planning.planner import Plan

    start = time.perf_counter()
    manifest = verify_artifact(path, checksums=False)  # fail fast; loading checks every sha256
    plan = Plan.load(Path(path) / PLAN)
    evaluate = bool(args.ppl or args.tasks)
    base_src = args.baseline_model or baseline_source(plan, manifest)
    if evaluate and args.baseline:
        _check_baseline_reachable(base_src)
    if args.out:
        markdown_path(args.out)  # a bad --out fails now, not after the evaluation
    report = None
    if evaluate:
        quantized = _measure(args, ModelSource(path, args.dtype, artifact=True), " (quantized)")
        baseline = None
        if args.baseline:
            baseline = _measure(args, ModelSource(base_src, args.dtype), " (baseline)",
                                content_hash=manifest["model"].get("content_hash"))
        settings = {"dtype": args.dtype, "ppl_source": args.ppl_source if args.ppl else None,
                    "seq_len": args.seq_len if args.ppl else None, "max_windows": args.max_windows,
                    "ppl_batch_size": args.ppl_batch_size, "tasks": list(args.tasks) if args.tasks else None,
                    "limit": args.limit, "task_data": args.task_data if args.tasks else None}
        artifact = {"path": str(path), "plan_id": manifest.get("plan_id"), "tensor_bytes": manifest.get("tensor_bytes"),
                    "files_bytes": sum(f["bytes"] for f in manifest["files"].values()),
                    "lsaq_version": manifest.get("lsaq_version")}
        report = build_report(quantized, baseline, plan=plan, artifact=artifact, settings=settings,
                              seconds=time.perf_counter() - start)
        print(render_markdown(report))
    if args.plots:
        from lsaq.plots import plot_memory, plot_plan_strip

        for written in (plot_plan_strip(plan, Path(args.plots) / "plan_strip.png"),
                        plot_memory(plan, Path(args.plots) / "memory.png")):
            print(f"wrote {written}")
    if args.out and report is not None:
        json_path, md_path = write_report(report, args.out)
        print(f"wrote {json_path} and {md_path}")
    return 0


def format_report(report: dict[str, Any]) -> str:
    """A readable summary: one perplexity line, then one row per task with acc, acc_norm, n and time."""
    lines = [f"{report['model']['id']} ({report['model']['architecture']}) [{report['model']['content_hash'][:12]}]"]
    if (p := report.get("perplexity")) is not None:
        lines.append(
            f"perplexity {p['ppl']:.3f}  (nll {p['nll']:.4f}, {p['windows']}/{p['windows_available']} windows x "
            f"{p['seq_len']} tokens, {p['tokens']} scored, {p['seconds']:.1f}s)  source={p['source']} "
            f"[{p['source_hash'][:12]}]"
        )
    if report.get("tasks"):
        lines.append(f"{'task':<15} {'acc':>14} {'acc_norm':>14} {'other':>16} {'n':>11} {'time':>7}")
        for name, r in report["tasks"].items():
            m, e = r["metrics"], r["stderr"]

            def cell(metric: str) -> str:
                if metric not in m:
                    return "-"
                err = e.get(metric)
                return f"{m[metric]:.4f}" + (f"±{err:.4f}" if err is not None else "")

            other = f"ppl {m['perplexity']:.2f}" if "perplexity" in m else "-"
            lines.append(
                f"{name:<15} {cell('acc'):>14} {cell('acc_norm'):>14} {other:>16} "
                f"{r['n']:>5}/{r['n_total']:<5} {r['seconds']:>6.1f}s"
            )
    lines.append(f"total {report['seconds']:.1f}s")
    return "\n".join(lines)
