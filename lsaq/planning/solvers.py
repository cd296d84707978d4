"""Choosing one precision per layer under a byte capacity: the LSAQ rule and the exact optimum.

Pure functions over per-layer importances (higher = more important, non-negative) and per-layer costs
(``{precision: bytes}``); the planner supplies both.

* :func:`lsaq_assign` (the paper's rule): start every layer at the highest allowed precision and demote one
  step at a time, least important layer first (FP16 -> INT8 for every layer in that order, then INT8 -> INT4 in
  the same order) until the layers fit. A more important layer never ends below a less important one, and a
  larger capacity never lowers any layer (the demotion sequence is fixed; more room stops it earlier).
* :func:`optimal_assign`: maximise ``sum_i importance_i * q(precision_i)`` under the capacity, a multiple-choice
  knapsack. Solved exactly by dynamic programming over the Pareto frontier of (exact bytes, exact value):
  values are integers on one common denominator (importances and ``q`` as exact rationals), bytes are exact,
  so there is no byte grid, no rounding, and ties are exact. With identical layer costs (every supported family)
  the frontier holds at most (L+1)(L+2)/2 states. Only if a frontier exceeds ``max_frontier`` (heterogeneous
  layers) is it thinned by byte buckets (true bytes kept, so the result still fits); then the result reports the
  LP-relaxation upper bound (a provable bound on the gap) and the LSAQ rule's plan is kept if it scores higher.

The objective's quality weights ``q`` (:func:`default_quality`): ``q(FP16) = 1`` (the lossless reference) and
``q(p) = 1 - 2**(4 - bits)`` for integers, i.e. INT8 15/16, INT4 0: the relative RMS noise of a b-bit uniform
quantiser halves with every added bit; INT4 is the zero of the scale. Equivalently the optimum minimises
``sum_i importance_i * 2**(4 - bits_i)``, an importance-weighted expected quantisation error.

Ties are broken deterministically: equal importance ranks the earlier layer as more important.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction
from math import lcm
from typing import Mapping, Sequence

from lsaq.methods import ranking
from lsaq.precision import Precision

MAX_FRONTIER = 200_000
LayerCosts = Sequence[Mapping[Precision, int]]


def default_quality() -> dict[Precision, float]:
    """``q(p)``: FP16 1 (reference), else ``1 - 2**(4 - bits)``: INT8 0.9375, INT4 0."""
    return {p: 1.0 if p is Precision.FP16 else 1.0 - 2.0 ** (4 - p.bits) for p in Precision}


def precision_levels(allowed: Sequence[Precision | str]) -> list[Precision]:
    """``allowed`` as distinct precisions, most precise first; ``ValueError`` when empty or unknown."""
    levels = sorted({Precision.parse(p) for p in allowed}, key=list(Precision).index)
    if not levels:
        raise ValueError(f"no precision allowed; valid precisions: {', '.join(p.value for p in Precision)}")
    return levels


def objective(
    importance: Sequence[float], precisions: Sequence[Precision], quality: Mapping[Precision, float] | None = None
) -> Fraction:
    """``sum_i importance_i * q(precision_i)``, computed exactly."""
    q = quality or default_quality()
    return sum((Fraction(w) * Fraction(q[p]) for w, p in zip(importance, precisions)), Fraction(0))


def lsaq_assign(
    importance: Sequence[float], costs: LayerCosts, capacity: int, allowed: Sequence[Precision]
) -> list[Precision] | None:
    """The LSAQ demotion rule; ``None`` when even demoting every layer to the lowest level does not fit."""
    levels = precision_levels(allowed)
    assign = [levels[0]] * len(importance)
    used = sum(c[levels[0]] for c in costs)
    least_first = ranking(importance)[::-1]
    for step in range(1, len(levels)):
        for i in least_first:
            if used <= capacity:
                return assign
            used += costs[i][levels[step]] - costs[i][assign[i]]
            assign[i] = levels[step]
    return assign if used <= capacity else None


def lp_upper_bound(
    importance: Sequence[float], costs: LayerCosts, capacity: int, allowed: Sequence[Precision],
    quality: Mapping[Precision, float] | None = None,
) -> float:
    """An upper bound on the optimum: the LP relaxation (fractional choices on each layer's concave hull)."""
    q = quality or default_quality()
    levels = precision_levels(allowed)
    base_cost, bound, steps = 0, 0.0, []
    for w, c in zip(importance, costs):
        opts = sorted(((c[p], w * q[p]) for p in levels), key=lambda t: (t[0], -t[1]))
        hull = [opts[0]]
        for cost, val in opts[1:]:
            if val <= hull[-1][1]:
                continue  # costs at least as much and is worth no more
            # Drop the last hull point while it lies on or below the chord to the new point (not concave).
            while len(hull) >= 2 and (hull[-1][1] - hull[-2][1]) * (cost - hull[-2][0]) <= (val - hull[-2][1]) * (hull[-1][0] - hull[-2][0]):
                hull.pop()
            hull.append((cost, val))
        base_cost, bound = base_cost + hull[0][0], bound + hull[0][1]
        steps += [(b[1] - a[1], b[0] - a[0]) for a, b in zip(hull, hull[1:])]
    room = capacity - base_cost
    for dv, dc in sorted(steps, key=lambda s: -s[0] / s[1]):
        if room <= 0:
            break
        take = min(1.0, room / dc)
        bound, room = bound + take * dv, room - take * dc
    return bound


@dataclass
class SolverInfo:
    """How an assignment was found."""

    method: str  # "uniform", "rule", "exact" or "bucketed"
    frontier: int = 0  # the largest Pareto frontier the DP held
    upper_bound: float | None = None  # LP bound on the objective, when the result is not proven optimal
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"method": self.method, "frontier": self.frontier, "upper_bound": self.upper_bound, "notes": list(self.notes)}


def _scaled_values(importance: Sequence[float], q: Mapping[Precision, float], levels: list[Precision]) -> list[dict[Precision, int]]:
    """Per layer and level, ``importance * q`` as integers over one common denominator (exact comparisons)."""
    exact = [[Fraction(w) * Fraction(q[p]) for p in levels] for w in importance]
    den = lcm(*(f.denominator for row in exact for f in row)) if exact else 1
    return [{p: int(f * den) for p, f in zip(levels, row)} for row in exact]


def optimal_assign(
    importance: Sequence[float], costs: LayerCosts, capacity: int, allowed: Sequence[Precision],
    quality: Mapping[Precision, float] | None = None, max_frontier: int = MAX_FRONTIER,
) -> tuple[list[Precision] | None, SolverInfo]:
    """The assignment maximising the objective within ``capacity``; ``None`` when nothing fits."""
    q = quality or default_quality()
    levels = precision_levels(allowed)
    values = _scaled_values(importance, q, levels)
    # Least important first: among exactly tied states the one generated first survives, which is the one that
    # took the higher level for the layer handled later, i.e. the more important one (the lsaq rule's tie-break).
    order = ranking(importance)[::-1]
    # A state is (bytes, value, path); path is a linked list (level index, parent) of choices along `order`.
    frontier: list[tuple[int, int, tuple | None]] = [(0, 0, None)]
    largest, bucketed = 1, False
    for i in order:
        grown = [(b + costs[i][p], v + values[i][p], (k, path)) for b, v, path in frontier for k, p in enumerate(levels)]
        grown = [s for s in grown if s[0] <= capacity]
        if not grown:
            return None, SolverInfo("exact", largest)
        grown.sort(key=lambda s: (s[0], -s[1]))  # stable: among exact ties the first generated survives
        frontier, best = [], None
        for s in grown:  # keep a state only if it beats every cheaper one
            if best is None or s[1] > best:
                frontier.append(s)
                best = s[1]
        if len(frontier) > max_frontier:
            bucketed = True
            width = max(1, -(-capacity // max_frontier))
            keep: dict[int, tuple] = {-1: frontier[0]}  # the cheapest state always stays: feasibility is never lost
            for s in frontier[1:]:  # then the most valuable state per byte bucket; true bytes are kept
                if (k := s[0] // width) not in keep or s[1] > keep[k][1]:
                    keep[k] = s
            frontier = sorted(keep.values(), key=lambda s: s[0])
        largest = max(largest, len(frontier))
    _, _, path = frontier[-1]  # the frontier's value rises with bytes: the last state is the best
    picks = []
    while path is not None:
        picks.append(path[0])
        path = path[1]
    assign: list[Precision] = [levels[0]] * len(importance)
    for i, k in zip(order, reversed(picks)):
        assign[i] = levels[k]
    if not bucketed:
        return assign, SolverInfo("exact", largest)
    info = SolverInfo(
        "bucketed", largest, lp_upper_bound(importance, costs, capacity, allowed, q),
        [f"a Pareto frontier exceeded {max_frontier} states and was thinned by byte buckets"],
    )
    rule = lsaq_assign(importance, costs, capacity, allowed)
    if rule is not None and objective(importance, rule, q) > objective(importance, assign, q):
        info.notes.append("the lsaq rule scored higher than the thinned programme and was kept")
        assign = rule
    return assign, info
