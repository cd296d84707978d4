"""The importance methods a layer ranking can come from, and the defaults the study chose.

Kept free of torch so that the command line (and, later, pipeline parameters) can name and validate methods
without loading the numeric stack; the scoring itself is in :mod:`lsaq.importance.scoring` and :mod:`lsaq.importance.sensitivity`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from lsaq.choices import Choice
from lsaq.precision import Precision


class Method(Choice):
    """How a decoder layer's importance is measured (higher = keep it at higher precision)."""

    JACCARD = "jaccard"  # LSAQ: 1 - Jaccard of the logit-lens top-k sets of a layer's input and output
    COSINE = "cosine"  # LWQ baseline: 1 - cosine of a layer's input and output hidden states
    SENSITIVITY = "sensitivity"  # measured: KL of next-token distributions with only that layer INT4

    @classmethod
    def noun(cls) -> tuple[str, str]:
        return "importance method", "methods"


# What measured best in the LSAQ vs LWQ study on the default model (benchmarks/study_methods.py; the table and the
# reasoning are in the README, "LSAQ vs LWQ study"): the cosine ranking gave lower WikiText-2 perplexity than
# jaccard at every budget from 4.5 to 7.5 bits per weight, at an eighth of jaccard's cost.
DEFAULT_METHOD = Method.COSINE
# For jaccard: of k = 1, 5, 10, 20, 50, the top-1 set agreed best with the measured per-layer sensitivity.
DEFAULT_K = 1
# For sensitivity: the precision its probe puts one layer at (the lowest the planner uses), per-channel scales.
SENSITIVITY_PROBE = Precision.INT4


def ranking(importance: Sequence[float]) -> list[int]:
    """Layer indices, most important first; equal importance: the earlier layer first."""
    return sorted(range(len(importance)), key=lambda i: (-importance[i], i))


@dataclass(frozen=True)
class ImportanceRef:
    """Which importance a plan was made from: an ``lsaq.layer_importance`` record's id and method, a bare vector
    (``method="vector"``, id = hash of the values), or none at all (``method="uniform"``, every layer 1.0)."""

    id: str
    method: str | None
    k: int | None = None
    source: str | None = None  # the file it was read from, when it came from one

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> "ImportanceRef":
        return cls(id=str(obj["id"]), method=obj.get("method"), k=obj.get("k"), source=obj.get("source"))


UNIFORM_IMPORTANCE = ImportanceRef(id="none", method="uniform")
