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
* :func:`min_loss_assign`: for *measured* costs. Given per layer and precision a measured loss ``loss_i(p) >= 0``
  (e.g. the KL divergence of the output when only layer i is at precision p), minimise ``sum_i loss_i(p_i)``
  under the capacity. The same problem with the values replaced: the float losses are exact rationals on one
  common denominator, negated, and the same Pareto-frontier programme maximises them, so the optimum is exact
  (same bucketed fallback, which then reports the LP-relaxation lower bound on the loss). Among plans of exactly
  equal loss it returns the one with the fewest bytes; among those, layer 0 takes its costliest level (equal cost:
  the more precise), then layer 1, and so on. :func:`predicted_loss` is the sum it minimised.

The objective's quality weights ``q`` (:func:`default_quality`): ``q(FP16) = 1`` (the lossless reference) and
``q(p) = 1 - 2**(4 - bits)`` for integers, i.e. INT8 15/16, INT4 0: the relative RMS noise of a b-bit uniform
quantiser halves with every added bit; INT4 is the zero of the scale. Equivalently the optimum minimises
``sum_i importance_i * 2**(4 - bits_i)``, an importance-weighted expected quantisation error.

Ties are broken deterministically: equal importance ranks the earlier layer as more important.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction
from math import isfinite, lcm
from numbers import Rational, Real
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
    return float(_lp_max([{p: w * q[p] for p in levels} for w in importance], costs, capacity, levels))


def _lp_max(
    values: Sequence[Mapping[Precision, Real]], costs: LayerCosts, capacity: int, levels: list[Precision],
    exact: bool = False,
):
    """The LP relaxation of ``max sum_i values[i][p_i]`` subject to ``sum_i costs[i][p_i] <= capacity``.

    ``values``: per layer, ``{level: value}``: floats (a float result), or with ``exact`` Fractions (a Fraction).
    Each layer may take a convex combination of neighbouring points on its upper concave hull of (bytes, value);
    the hull's steps are then taken greedily, best value per byte first, the last one partially.
    """
    base_cost, bound, steps = 0, 0, []  # steps: (value gained, bytes spent) of one hull segment
    for vals, c in zip(values, costs):
        opts = sorted(((c[p], vals[p]) for p in levels), key=lambda t: (t[0], -t[1]))
        hull = [opts[0]]
        for cost, val in opts[1:]:
            if val <= hull[-1][1]:
                continue  # costs at least as much and is worth no more
            # Drop the last hull point while it lies on or below the chord to the new point (not concave).
            while len(hull) >= 2 and (
                (hull[-1][1] - hull[-2][1]) * (cost - hull[-2][0]) <= (val - hull[-2][1]) * (hull[-1][0] - hull[-2][0])
            ):
                hull.pop()
            hull.append((cost, val))
        base_cost, bound = base_cost + hull[0][0], bound + hull[0][1]
        steps += [(b[1] - a[1], b[0] - a[0]) for a, b in zip(hull, hull[1:])]
    room = Fraction(capacity - base_cost) if exact else capacity - base_cost
    for dv, dc in sorted(steps, key=lambda s: -s[0] / s[1]):
        if room <= 0:
            break
        take = min(1, room / dc)  # a Fraction when exact, else a float (or the int 1: the same sums)
        bound, room = bound + take * dv, room - take * dc
    return bound


@dataclass
class SolverInfo:
    """How an assignment was found."""

    method: str  # "uniform", "rule", "exact" or "bucketed"
    frontier: int = 0  # the largest Pareto frontier the DP held
    upper_bound: float | None = None  # LP bound on the objective, when the result is not proven optimal
    notes: list[str] = field(default_factory=list)
    lower_bound: float | None = None  # min_loss_assign: LP bound on the loss, when the result is not proven optimal

    def to_json(self) -> dict:
        out = {"method": self.method, "frontier": self.frontier, "upper_bound": self.upper_bound}
        out["notes"] = list(self.notes)
        if self.lower_bound is not None:  # only min_loss_assign sets it; plan records keep their shape
            out["lower_bound"] = self.lower_bound
        return out


def _scaled_values(
    importance: Sequence[float], q: Mapping[Precision, float], levels: list[Precision]
) -> list[dict[Precision, int]]:
    """Per layer and level, ``importance * q`` as integers over one common denominator (exact comparisons)."""
    return _on_common_denominator([[Fraction(w) * Fraction(q[p]) for p in levels] for w in importance], levels)


def _on_common_denominator(exact: list[list[Fraction]], levels: list[Precision]) -> list[dict[Precision, int]]:
    """``exact[i][k]`` (layer i, ``levels[k]``) times the lcm of all denominators: integers in the same ratios."""
    den = lcm(*(f.denominator for row in exact for f in row)) if exact else 1
    return [{p: int(f * den) for p, f in zip(levels, row)} for row in exact]


@dataclass
class _Programme:
    """What :func:`_pareto_programme` found: the assignment (``None``: nothing fits) and how."""

    assign: list[Precision] | None
    largest: int  # the largest frontier held
    bucketed: bool  # a frontier was thinned: the assignment fits but is not proven optimal


def _pareto_programme(
    values: Sequence[Mapping[Precision, int]], costs: LayerCosts, capacity: int, levels: list[Precision],
    order: Sequence[int], max_frontier: int,
) -> _Programme:
    """Maximise ``sum_i values[i][p_i]`` subject to ``sum_i costs[i][p_i] <= capacity``, ``p_i`` in ``levels``.

    ``values``: per layer ``{level: integer value}`` (exact); ``order``: the layer indices in the order they are
    added. Tie-break: among exactly tied (bytes, value) states the one generated first survives; states are
    generated from the cheapest parent up and, per parent, in ``levels`` order. So the layer handled last gets the
    costliest level an optimum allows (equal cost: the earlier level), then the one handled before it, and so on;
    and among equal-value optima the cheapest is returned.
    """
    # A state is (bytes, value, path); path is a linked list (level index, parent) of choices along `order`.
    frontier: list[tuple[int, int, tuple | None]] = [(0, 0, None)]
    largest, bucketed = 1, False
    for i in order:
        grown = [
            (b + costs[i][p], v + values[i][p], (k, path)) for b, v, path in frontier for k, p in enumerate(levels)
        ]
        grown = [s for s in grown if s[0] <= capacity]
        if not grown:
            return _Programme(None, largest, False)
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
    assign: list[Precision] = [levels[0]] * len(values)
    for i, k in zip(order, reversed(picks)):
        assign[i] = levels[k]
    return _Programme(assign, largest, bucketed)


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
    found = _pareto_programme(values, costs, capacity, levels, order, max_frontier)
    assign = found.assign
    if assign is None:
        return None, SolverInfo("exact", found.largest)
    if not found.bucketed:
        return assign, SolverInfo("exact", found.largest)
    info = SolverInfo(
        "bucketed", found.largest, lp_upper_bound(importance, costs, capacity, allowed, q),
        [f"a Pareto frontier exceeded {max_frontier} states and was thinned by byte buckets"],
    )
    rule = lsaq_assign(importance, costs, capacity, allowed)
    if rule is not None and objective(importance, rule, q) > objective(importance, assign, q):
        info.notes.append("the lsaq rule scored higher than the thinned programme and was kept")
        assign = rule
    return assign, info


# ------------------------------------------------------------------------------ measured losses

LayerLosses = Sequence[Mapping[Precision, float]]


def _as_fraction(x: Real) -> Fraction:
    """The exact value of a real number (a float, an int, a Fraction, a numpy float) as a Fraction."""
    return Fraction(x) if isinstance(x, (float, Rational)) else Fraction(float(x))


def _exact_losses(loss: LayerLosses, costs: LayerCosts, levels: list[Precision]) -> list[list[Fraction]]:
    """``loss`` validated and as exact rationals, ``[layer][level index]``; ``ValueError`` naming a bad value."""
    if len(loss) != len(costs):
        raise ValueError(f"loss has {len(loss)} layers but costs has {len(costs)}")
    exact = []
    for i, (row, c) in enumerate(zip(loss, costs)):
        for p in levels:
            if p not in row:
                raise ValueError(f"loss of layer {i} has no value for allowed precision {p.value}")
            if p not in c:
                raise ValueError(f"costs of layer {i} have no bytes for allowed precision {p.value}")
            x = row[p]
            if isinstance(x, bool) or not isinstance(x, Real) or not isfinite(x) or x < 0:
                raise ValueError(f"loss of layer {i} at {p.value} must be a finite number >= 0, got {x!r}")
        exact.append([_as_fraction(row[p]) for p in levels])  # a float's exact value: no rounding
    return exact


def predicted_loss(loss: LayerLosses, assignment: Sequence[Precision]) -> float:
    """``sum_i loss[i][assignment[i]]``, the quantity :func:`min_loss_assign` minimises (summed exactly)."""
    if len(loss) != len(assignment):
        raise ValueError(f"loss has {len(loss)} layers but the assignment has {len(assignment)}")
    return float(sum((_as_fraction(row[p]) for row, p in zip(loss, assignment)), Fraction(0)))


def min_loss_assign(
    loss: LayerLosses, costs: LayerCosts, capacity: int, allowed: Sequence[Precision],
    max_frontier: int = MAX_FRONTIER,
) -> tuple[list[Precision] | None, SolverInfo]:
    """The assignment minimising the measured ``sum_i loss[i][p_i]`` within ``capacity``; ``None`` when nothing fits.

    ``loss[i][p]``: the measured loss (finite, ``>= 0``) of layer i at precision p, needed for every allowed p;
    ``costs[i][p]``: its bytes. Exact (the Pareto programme of :func:`optimal_assign` on the negated losses as
    integers over one common denominator) unless a frontier exceeds ``max_frontier``: then ``SolverInfo.method``
    is ``"bucketed"``, a note says so and ``lower_bound`` holds the LP-relaxation bound on the loss. Ties: the
    fewest bytes among equal-loss optima, then the earlier layer takes its costliest (equal cost: more precise) level.
    """
    levels = precision_levels(allowed)
    exact = _exact_losses(loss, costs, levels)
    if not exact:
        return ([] if capacity >= 0 else None), SolverInfo("exact", 1)
    values = _on_common_denominator([[-f for f in row] for row in exact], levels)  # maximise the negated loss
    # The last layer first, so that layer 0 is handled last and wins exact ties (see _pareto_programme).
    found = _pareto_programme(values, costs, capacity, levels, range(len(exact) - 1, -1, -1), max_frontier)
    if found.assign is None or not found.bucketed:
        return found.assign, SolverInfo("exact", found.largest)
    bound = -_lp_max([dict(zip(levels, (-f for f in row))) for row in exact], costs, capacity, levels, exact=True)
    return found.assign, SolverInfo(
        "bucketed", found.largest,
        notes=[f"a Pareto frontier exceeded {max_frontier} states and was thinned by byte buckets",
               f"LP-relaxation lower bound on the loss: {float(bound):.6g}"],
        lower_bound=float(bound),
    )
