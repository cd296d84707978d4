"""Evaluation of (quantized) causal LMs: WikiText perplexity, lm-evaluation-harness zero-shot accuracy, fidelity.

``perplexity`` follows the GPTQ protocol; ``evaluate_tasks`` runs the harness's scoring of PIQA, ARC-Easy,
ARC-Challenge, HellaSwag, WinoGrande, BoolQ and LAMBADA (OpenAI) on local copies of the data, offline; ``fidelity``
measures how far a quantized model's next-token distributions moved from the float model's (KL divergence, top-1
agreement). All take any causal LM module, so quantized models work unchanged. ``report`` builds the
``lsaq.eval_report`` record of an artifact, and ``stage.evaluate`` is the evaluate stage that produces it.
"""

from lsaq.eval.fidelity import FidelityResult, fidelity
from lsaq.eval.harness import TaskResult, evaluate_tasks
from lsaq.eval.perplexity import PerplexityResult, perplexity
from lsaq.eval.report import (
    EvalReport,
    ModelEval,
    build_report,
    compare,
    load_report,
    metrics_table,
    plan_summary,
    render_markdown,
    run_record,
    write_report,
)
from lsaq.eval.stage import EvalOptions, evaluate
from lsaq.eval.tasks import TASK_NAMES, parse_hellaswag, resolve_tasks

__all__ = [
    "EvalOptions",
    "EvalReport",
    "FidelityResult",
    "ModelEval",
    "PerplexityResult",
    "TASK_NAMES",
    "TaskResult",
    "build_report",
    "compare",
    "evaluate",
    "evaluate_tasks",
    "fidelity",
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
