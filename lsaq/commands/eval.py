"""``lsaq eval``: WikiText perplexity and zero-shot accuracy of a model, as a table and a JSON report."""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from typing import Any

SCHEMA = "lsaq.eval"
VERSION = 1


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="perplexity (GPTQ protocol) and zero-shot accuracy (lm-evaluation-harness)")
    p.add_argument("model_path", nargs="?", default=None, metavar="MODEL_OR_DIR",
                   help="local HF directory, .gguf file or hub id (default: SmolLM2-135M)")
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
    p.add_argument("--out", default=None, help="write the report as JSON here")
    p.set_defaults(func=run)


def validate(args: argparse.Namespace) -> None:
    """Check what can be checked before loading anything, so bad input fails fast and writes nothing."""
    from ..eval.harness import DATA_CHOICES
    from ..eval.tasks import resolve_tasks

    if args.model_path and args.model and args.model_path != args.model:
        raise ValueError(f"two models given: {args.model_path!r} and --model {args.model!r}; give one")
    if not args.ppl and not args.tasks:
        raise ValueError("nothing to do: pass --ppl and/or --tasks NAME[,NAME...]")
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
    from ..calibration import shared_dir

    shared = shared_dir()
    local = shared / "data" / "wikitext-2-raw" / "wiki.test.raw" if shared is not None else None
    return str(local) if local is not None and local.is_file() else "wikitext:wikitext-2-raw-v1:test"


def _load(path: str | None) -> Any:
    """Load what ``lsaq eval`` evaluates: anything :func:`lsaq.model.load_model` accepts.

    One place to extend (e.g. with quantized artifact directories): returns a ``LoadedModel``.
    """
    from ..model import load_model

    return load_model(path)


def run(args: argparse.Namespace) -> int:
    validate(args)
    from .. import __version__
    from ..records import atomic_write_json

    start = time.perf_counter()
    loaded = _load(args.model_path or args.model)
    report: dict[str, Any] = {
        "schema": SCHEMA,
        "version": VERSION,
        "lsaq_version": __version__,
        "model": {k: v for k, v in loaded.info.to_json().items() if k != "config"},
        "perplexity": None,
        "tasks": {},
    }
    if args.ppl:
        from tqdm import tqdm

        from ..eval.perplexity import perplexity

        source = args.ppl_source or default_ppl_source()
        with tqdm(desc="perplexity", unit="window", file=sys.stderr) as bar:
            ppl = perplexity(
                loaded.model, loaded.tokenizer, source, seq_len=args.seq_len, max_windows=args.max_windows,
                batch_size=args.ppl_batch_size, progress=bar.update,
            )
        report["perplexity"] = ppl.to_json()
    if args.tasks:
        from ..eval.harness import evaluate_tasks

        results = evaluate_tasks(
            loaded.model, loaded.tokenizer, args.tasks, limit=args.limit, batch_size=args.task_batch_size,
            data=args.task_data, data_dir=args.data_dir,
        )
        report["tasks"] = {name: r.to_json() for name, r in results.items()}
    report["seconds"] = time.perf_counter() - start
    print(format_report(report))
    if args.out:
        atomic_write_json(args.out, report)
        print(f"wrote {args.out}")
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
