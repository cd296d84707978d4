"""Evaluation of (quantized) causal LMs: WikiText perplexity and lm-evaluation-harness zero-shot accuracy.

``perplexity`` follows the GPTQ protocol; ``evaluate_tasks`` runs the harness's scoring of PIQA, ARC-Easy,
ARC-Challenge, HellaSwag, WinoGrande, BoolQ and LAMBADA (OpenAI) on local copies of the data, offline. Both take
any causal LM module and its tokenizer, so quantized models work unchanged.
"""

from .harness import TaskResult, evaluate_tasks
from .perplexity import PerplexityResult, perplexity
from .tasks import TASK_NAMES, parse_hellaswag, resolve_tasks

__all__ = [
    "PerplexityResult",
    "TASK_NAMES",
    "TaskResult",
    "evaluate_tasks",
    "parse_hellaswag",
    "perplexity",
    "resolve_tasks",
]
