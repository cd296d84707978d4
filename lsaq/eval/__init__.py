"""Evaluation of (quantized) causal LMs: WikiText perplexity and lm-evaluation-harness zero-shot accuracy.

``perplexity`` follows the GPTQ protocol; ``evaluate_tasks`` runs the harness's scoring of PIQA, ARC-Easy,
ARC-Challenge, HellaSwag, WinoGrande, BoolQ and LAMBADA (OpenAI) on local copies of the data, offline. Both take
any causal LM module and its tokenizer, so quantized models work unchanged. ``report`` builds the
``lsaq.eval_report`` record of an artifact: its plan and its metrics beside the float baseline's, with deltas.
"""

from lsaq.eval.harness import TaskResult, evaluate_tasks
from lsaq.eval.perplexity import PerplexityResult, perplexity
from lsaq.eval.report import (
    build_report, compare, load_report, metrics_table, plan_summary, render_markdown, run_record, write_report,
)
from lsaq.eval.tasks import TASK_NAMES, parse_hellaswag, resolve_tasks

__all__ = [
    "PerplexityResult",
    "TASK_NAMES",
    "TaskResult",
    "build_report",
    "compare",
    "evaluate_tasks",
    "load_report",
    "metrics_table",
    "parse_hellaswag",
    "perplexity",
    "plan_summary",
    "render_markdown",
    "resolve_tasks",
    "run_record",
    "write_report",
]
