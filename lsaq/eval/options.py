"""What an evaluation measures and how (:class:`EvalOptions`), checked on construction; free of torch, so a
pipeline can check its evaluation options before loading the numeric stack."""

from __future__ import annotations

from dataclasses import dataclass

from lsaq.choices import OptionError, literal
from lsaq.eval.tasks import resolve_tasks

DTYPES = ("float32", "bfloat16")
DATA_CHOICES = ("auto", "local", "hub")  # where lm-eval's task data comes from (lsaq.eval.harness)
DEFAULT_SEQ_LEN = 2048  # perplexity windows: the GPTQ protocol's length
# Fidelity window length when no perplexity window sets it: 8 x 512 = 4096 positions, a few seconds for a small
# model, and cheap to generate when there is no corpus.
DEFAULT_FIDELITY_SEQ_LEN = 512


@dataclass(frozen=True)
class EvalOptions:
    """What :func:`lsaq.eval.stage.evaluate` measures and how; every value is checked on construction
    (:class:`~lsaq.choices.OptionError`).

    ``tasks`` may be given as ``"piqa,arc_easy"``, ``"all"`` or names; it is stored as a tuple of task names.
    An artifact's fidelity (measured whenever ``with_baseline``) uses ``fidelity_windows`` windows of
    ``fidelity_seq_len`` tokens (default: ``seq_len`` when perplexity is measured, else
    ``DEFAULT_FIDELITY_SEQ_LEN``); generated text is drawn with ``fidelity_seed``.
    ``plots``: a folder for the plan's strip and memory charts (artifacts only; needs matplotlib).
    """

    ppl: bool = False
    ppl_source: str | None = None
    seq_len: int = DEFAULT_SEQ_LEN
    max_windows: int | None = None
    ppl_batch_size: int | None = None
    tasks: tuple[str, ...] | str = ()
    limit: int | None = None
    task_batch_size: int = 8
    task_data: str = "auto"
    data_dir: str | None = None
    dtype: str = "float32"
    with_baseline: bool = True
    fidelity_windows: int = 8
    fidelity_seq_len: int | None = None
    fidelity_seed: int = 0
    plots: str | None = None

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise OptionError(f"unknown {{dtype}} {literal(repr(self.dtype))}; valid: {', '.join(DTYPES)}")
        if self.task_data not in DATA_CHOICES:
            raise OptionError(f"unknown {{task_data}} {literal(repr(self.task_data))}; "
                              f"valid: {', '.join(DATA_CHOICES)}")
        for name, low in (("seq_len", 2), ("task_batch_size", 1), ("fidelity_windows", 1), ("fidelity_seed", 0),
                          ("max_windows", 1), ("ppl_batch_size", 1), ("limit", 1), ("fidelity_seq_len", 2)):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < low):
                raise OptionError(f"{{{name}}} must be at least {low}, got {literal(repr(value))}")
        tasks = self.tasks
        names = tuple(resolve_tasks(tasks)) if tasks else ()  # ValueError naming the valid tasks
        object.__setattr__(self, "tasks", names)
        for name in ("ppl_source", "data_dir", "plots"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, str(getattr(self, name)))

    @property
    def measures(self) -> bool:
        """Whether perplexity or tasks are asked for (fidelity aside)."""
        return self.ppl or bool(self.tasks)


__all__ = ["DATA_CHOICES", "DEFAULT_FIDELITY_SEQ_LEN", "DEFAULT_SEQ_LEN", "DTYPES", "EvalOptions"]
