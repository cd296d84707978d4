"""``min_loss_assign``: the exact minimum of a measured per-layer loss under a byte capacity."""

from __future__ import annotations

import itertools
import math
import random
import time
from fractions import Fraction

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lsaq.planning.solvers import default_quality, min_loss_assign, objective, optimal_assign, predicted_loss
from lsaq.precision import Precision

FP16, INT8, INT4 = Precision.FP16, Precision.INT8, Precision.INT4
LEVEL = {p: i for i, p in enumerate(Precision)}  # 0 = most precise
SETTINGS = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# ---------------------------------------------------------------------------------- generators

# A small pool of values makes exact ties (and zeros) common; the free floats make the rest distinct.
loss_st = st.one_of(st.sampled_from([0.0, 0.0, 0.1, 0.25, 1.0]), st.floats(0.0, 10.0, allow_nan=False))
allowed_st = st.lists(st.sampled_from(list(Precision)), min_size=1, max_size=3, unique=True)


@st.composite
def instances(draw, max_layers=6):
    """(loss, costs, allowed): per layer ``{precision: loss}`` and ``{precision: bytes}`` for every precision.

    Byte costs are arbitrary non-negative integers (not ordered by precision; often tiny, so that plans of equal
    bytes, and exact ties, are common); half the time every layer has the same costs (as real model shapes give),
    else each layer its own.
    """
    n = draw(st.integers(1, max_layers))
    # Each layer's loss row from a pool of 1-3 rows: layers with identical rows give exact ties between plans.
    rows = draw(st.lists(st.fixed_dictionaries({p: loss_st for p in Precision}), min_size=1, max_size=3))
    loss = [draw(st.sampled_from(rows)) for _ in range(n)]

    def layer_cost():
        top = draw(st.sampled_from([2, 4, 60]))
        return {p: draw(st.integers(0, top)) for p in Precision}

    costs = [layer_cost()] * n if draw(st.booleans()) else [layer_cost() for _ in range(n)]
    return loss, costs, draw(allowed_st)


def bytes_of(assign, costs):
    return sum(c[p] for c, p in zip(costs, assign))


def exact_loss(loss, assign):
    return sum((Fraction(row[p]) for row, p in zip(loss, assign)), Fraction(0))


def byte_range(costs, allowed):
    return sum(min(c[p] for p in allowed) for c in costs), sum(max(c[p] for p in allowed) for c in costs)


def capacity_st(costs, allowed):
    """From below the cheapest assignment to above the dearest."""
    lo, hi = byte_range(costs, allowed)
    return st.integers(lo - 5, hi + 5)


def tie_key(loss, costs, allowed, assign):
    """The documented order: exact loss, then bytes, then layer 0's bytes (more first; equal: more precise), ..."""
    per_layer = tuple(x for c, p in zip(costs, assign) for x in (-c[p], LEVEL[p]))
    return (exact_loss(loss, assign), bytes_of(assign, costs)) + per_layer


# ----------------------------------------------------------------------------------- properties


@SETTINGS
@given(st.data())
def test_exact_optimum_and_tie_break_by_brute_force(data):
    loss, costs, allowed = data.draw(instances())
    capacity = data.draw(capacity_st(costs, allowed))
    fitting = [a for a in itertools.product(allowed, repeat=len(loss)) if bytes_of(a, costs) <= capacity]
    best, info = min_loss_assign(loss, costs, capacity, allowed)
    assert info.method == "exact"
    if not fitting:
        assert best is None
        return
    assert best is not None and len(best) == len(loss) and set(best) <= set(allowed)
    assert bytes_of(best, costs) <= capacity
    assert exact_loss(loss, best) == min(exact_loss(loss, a) for a in fitting)
    # Deterministic: exactly the plan the documented tie-break names.
    assert tuple(best) == min(fitting, key=lambda a: tie_key(loss, costs, allowed, a))
    assert predicted_loss(loss, best) == float(exact_loss(loss, best))


@SETTINGS
@given(st.data())
def test_larger_budget_never_raises_the_loss(data):
    loss, costs, allowed = data.draw(instances())
    capacities = sorted(data.draw(st.lists(capacity_st(costs, allowed), min_size=2, max_size=6)))
    previous = None
    for capacity in capacities:
        best, _ = min_loss_assign(loss, costs, capacity, allowed)
        if best is None:
            assert previous is None  # once something fits, more room keeps it fitting
            continue
        current = exact_loss(loss, best)
        assert previous is None or current <= previous
        previous = current


@SETTINGS
@given(
    st.lists(st.floats(0.0, 1.0, allow_nan=False, width=32), min_size=1, max_size=7),
    st.sampled_from([list(Precision), [FP16, INT8], [FP16, INT4], [INT8, INT4], [INT4]]),
    st.booleans(),
    st.floats(0.0, 1.0),
    st.randoms(use_true_random=False),
)
def test_same_optimum_as_optimal_assign(importance, allowed, same, frac, rnd):
    # loss = importance * (1 - q) makes minimising the loss the same as maximising sum importance * q.
    q = default_quality()
    loss = [{p: w * (1.0 - q[p]) for p in Precision} for w in importance]

    def layer_cost():
        c4 = rnd.randint(1, 400)
        c8 = c4 + rnd.randint(1, 400)
        return {INT4: c4, INT8: c8, FP16: c8 + rnd.randint(1, 800)}

    costs = [layer_cost()] * len(importance) if same else [layer_cost() for _ in importance]
    lo, hi = byte_range(costs, allowed)
    capacity = int(lo * 0.95 + frac * (hi - lo * 0.95))
    mine, mine_info = min_loss_assign(loss, costs, capacity, allowed)
    theirs, theirs_info = optimal_assign(importance, costs, capacity, allowed)
    assert (mine is None) == (theirs is None)
    if mine is None:
        return
    assert mine_info.method == theirs_info.method == "exact"
    assert objective(importance, mine) == objective(importance, theirs)
    assert exact_loss(loss, mine) == exact_loss(loss, theirs)


@settings(max_examples=30, deadline=None)
@given(st.data())
def test_thinned_frontier_fits_and_reports_a_lower_bound(data):
    loss, costs, allowed = data.draw(instances(max_layers=6))
    capacity = data.draw(capacity_st(costs, allowed))
    exact, _ = min_loss_assign(loss, costs, capacity, allowed)
    thinned, info = min_loss_assign(loss, costs, capacity, allowed, max_frontier=2)
    assert (thinned is None) == (exact is None)  # the cheapest state is never thinned away
    if thinned is None:
        return
    assert bytes_of(thinned, costs) <= capacity
    assert exact_loss(loss, thinned) >= exact_loss(loss, exact)
    if info.method == "bucketed":
        assert info.notes and info.lower_bound is not None and info.to_json()["lower_bound"] == info.lower_bound
        # The LP bound lies between the loss with no capacity at all and the true optimum.
        unconstrained = sum((min(Fraction(row[p]) for p in allowed) for row in loss), Fraction(0))
        assert float(unconstrained) <= info.lower_bound <= float(exact_loss(loss, exact))
    else:
        assert info.method == "exact" and exact_loss(loss, thinned) == exact_loss(loss, exact)


# ------------------------------------------------------------------------------------- examples


def test_ties_prefer_fewer_bytes_then_earlier_layers():
    # Every layer loses nothing at INT8: the cheapest zero-loss plan, not the dearest, is returned.
    costs = [{FP16: 4, INT8: 2, INT4: 1}] * 3
    loss = [{FP16: 0.0, INT8: 0.0, INT4: 1.0}] * 3
    best, _ = min_loss_assign(loss, costs, 12, list(Precision))
    assert best == [INT8, INT8, INT8]
    # Identical layers, 7 bytes: every ordering of {FP16, INT8, INT4} loses 1.6 (3 x INT8: 1.8); layer 0 then
    # layer 1 take the most bytes.
    loss = [{FP16: 0.0, INT8: 0.6, INT4: 1.0}] * 3
    best, _ = min_loss_assign(loss, costs, 7, list(Precision))
    assert best == [FP16, INT8, INT4]


def test_loss_need_not_vanish_at_fp16_and_may_favour_lower_precision():
    costs = [{FP16: 4, INT8: 2, INT4: 1}] * 2
    loss = [{FP16: 0.3, INT8: 0.1, INT4: 0.2}, {FP16: 0.0, INT8: 0.0, INT4: 0.0}]
    best, info = min_loss_assign(loss, costs, 100, list(Precision))
    assert best == [INT8, INT4] and info.method == "exact"
    assert predicted_loss(loss, best) == pytest.approx(0.1)


def test_bucketed_reports_the_lp_lower_bound():
    # One layer, 3 bytes: the LP takes INT4 (1 byte, loss 3), all of the step to INT8 (+1 byte, -2) and half of the
    # step to FP16 (+1 of 2 bytes, -0.5): 0.5. Frontier of 2 states > 1: thinned, INT8 (loss 1) still found.
    loss, costs = [{FP16: 0.0, INT8: 1.0, INT4: 3.0}], [{FP16: 4, INT8: 2, INT4: 1}]
    best, info = min_loss_assign(loss, costs, 3, list(Precision), max_frontier=1)
    assert best == [INT8] and info.method == "bucketed"
    assert info.lower_bound == 0.5 and "0.5" in info.notes[-1] and info.to_json()["lower_bound"] == 0.5
    assert "lower_bound" not in min_loss_assign(loss, costs, 3, list(Precision))[1].to_json()


def test_nothing_fits():
    costs = [{FP16: 4, INT8: 2, INT4: 1}] * 3
    loss = [{p: 0.0 for p in Precision}] * 3
    assert min_loss_assign(loss, costs, 2, list(Precision))[0] is None
    assert min_loss_assign(loss, costs, 3, list(Precision))[0] == [INT4] * 3
    assert min_loss_assign(loss, costs, 5, [FP16, INT8])[0] is None


@pytest.mark.parametrize(
    "loss, costs, allowed, match",
    [
        ([{FP16: 0.0, INT8: 0.1}], [{FP16: 4, INT8: 2}] * 2, [FP16, INT8], "1 layers but costs has 2"),
        ([{FP16: 0.0, INT8: 0.1}], [{FP16: 4, INT8: 2, INT4: 1}], list(Precision), "no value for allowed .* int4"),
        ([{FP16: 0.0, INT8: -0.5}], [{FP16: 4, INT8: 2}], [FP16, INT8], "got -0.5"),
        ([{FP16: 0.0, INT8: math.nan}], [{FP16: 4, INT8: 2}], [FP16, INT8], "got nan"),
        ([{FP16: math.inf, INT8: 0.1}], [{FP16: 4, INT8: 2}], [FP16, INT8], "at fp16 .* got inf"),
        ([{FP16: 0.0, INT8: "0.1"}], [{FP16: 4, INT8: 2}], [FP16, INT8], "got '0.1'"),
        ([{FP16: 0.0, INT8: 0.1}], [{FP16: 4}], [FP16, INT8], "costs of layer 0 have no bytes for .* int8"),
    ],
)
def test_bad_input_names_the_value(loss, costs, allowed, match):
    with pytest.raises(ValueError, match=match):
        min_loss_assign(loss, costs, 100, allowed)


def test_unused_precisions_are_not_validated():
    best, _ = min_loss_assign([{FP16: 0.0, INT8: 0.1, INT4: math.nan}], [{FP16: 4, INT8: 2, INT4: 1}], 3, [FP16, INT8])
    assert best == [INT8]


def test_predicted_loss_checks_lengths():
    with pytest.raises(ValueError, match="2 layers but the assignment has 1"):
        predicted_loss([{FP16: 0.0}] * 2, [FP16])


# -------------------------------------------------------------------------------- realistic size


def count_dp_minimum(loss, cost, capacity):
    """An independent exact check for identical layers: min loss over (#FP16, #INT8) counts, layer by layer."""
    n = len(loss)
    best: dict[tuple[int, int], Fraction] = {(0, 0): Fraction(0)}  # (#FP16, #INT8) so far -> min exact loss
    for row in loss:
        nxt: dict[tuple[int, int], Fraction] = {}
        for (a, b), v in best.items():
            for key, p in (((a + 1, b), FP16), ((a, b + 1), INT8), ((a, b), INT4)):
                cand = v + Fraction(row[p])
                if key not in nxt or cand < nxt[key]:
                    nxt[key] = cand
        best = nxt
    fits = [v for (a, b), v in best.items() if a * cost[FP16] + b * cost[INT8] + (n - a - b) * cost[INT4] <= capacity]
    return min(fits) if fits else None


def test_thirty_identical_layers_are_fast_and_exact():
    rnd = random.Random(7)
    cost = {FP16: 4_000_000, INT8: 2_100_000, INT4: 1_100_000}
    costs = [cost] * 30
    loss = [{FP16: 0.0, INT8: rnd.uniform(0, 1e-3), INT4: rnd.uniform(1e-3, 5e-2)} for _ in range(30)]
    for capacity in (33_000_000, 50_000_000, 63_000_000, 80_000_000, 100_000_000, 119_999_999):
        start = time.perf_counter()
        best, info = min_loss_assign(loss, costs, capacity, list(Precision))
        elapsed = time.perf_counter() - start
        assert elapsed < 1.0, f"{elapsed:.3f} s at capacity {capacity}"
        assert info.method == "exact" and info.frontier <= 31 * 32 // 2
        assert bytes_of(best, costs) <= capacity
        assert exact_loss(loss, best) == count_dp_minimum(loss, cost, capacity)
