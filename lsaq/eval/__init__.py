"""Evaluation of (quantized) causal LMs: WikiText perplexity, lm-evaluation-harness zero-shot accuracy, fidelity.

``perplexity`` follows the GPTQ protocol; ``evaluate_tasks`` runs the harness's scoring of PIQA, ARC-Easy,
ARC-Challenge, HellaSwag, WinoGrande, BoolQ and LAMBADA (OpenAI) on local copies of the data, offline; ``fidelity``
measures how far a quantized model's next-token distributions moved from the float model's (KL divergence, top-1
agreement). All take any causal LM module, so quantized models work unchanged. ``report`` builds the
``lsaq.eval_report`` record of an artifact, and ``stage.evaluate`` is the evaluate stage that produces it.
"""

import importlib
from typing import Any

# name -> submodule; imported on first use, so `lsaq.eval.options` (checked before any work) does not pull in torch.
# The functions `fidelity` and `perplexity` share their modules' names: import them from lsaq.eval.fidelity and
# lsaq.eval.perplexity.
_WHERE = {
    "FidelityResult": "fidelity",
    "TaskResult": "harness", "evaluate_tasks": "harness",
    "PerplexityResult": "perplexity",
    **{name: "report" for name in ("EvalReport", "ModelEval", "build_report", "compare", "load_report",
                                   "metrics_table", "plan_summary", "render_markdown", "run_record", "write_report")},
    "EvalOptions": "options", "evaluate": "stage",
    "TASK_NAMES": "tasks", "parse_hellaswag": "tasks", "resolve_tasks": "tasks",
}


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)


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
    "load_report",
    "metrics_table",
    "parse_hellaswag",
    "plan_summary",
    "render_markdown",
    "resolve_tasks",
    "run_record",
    "write_report",
]
