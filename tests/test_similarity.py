"""Top-k, Jaccard and KL primitives against naive references."""

from __future__ import annotations

import math

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings

from lsaq.importance.similarity import (
    cosine,
    intersection_size,
    jaccard,
    kl_divergence,
    spearman,
    topk_indices,
    topk_jaccard,
)


def naive_topk(row: list[float], k: int) -> list[int]:
    """Reference: sort by (-value, index): ties go to the lower index."""
    return sorted(range(len(row)), key=lambda i: (-row[i], i))[:k]


def naive_jaccard(a: list[int], b: list[int]) -> float:
    sa, sb = set(a), set(b)
    return len(sa & sb) / len(sa | sb)


# Small integer-valued scores make ties frequent, which is the case that needs care.
rows = st.lists(st.integers(-3, 3).map(float), min_size=1, max_size=40)


@settings(max_examples=200, deadline=None)
@given(st.lists(rows, min_size=1, max_size=6).filter(lambda r: len({len(x) for x in r}) == 1), st.data())
def test_topk_matches_naive_reference_with_ties(batch, data):
    k = data.draw(st.integers(1, len(batch[0])))
    got = topk_indices(torch.tensor(batch), k)
    assert got.tolist() == [naive_topk(r, k) for r in batch]


@settings(max_examples=200, deadline=None)
@given(rows, rows, st.data())
def test_topk_jaccard_matches_naive(x, y, data):
    n = min(len(x), len(y))
    x, y = x[:n], y[:n]
    k = data.draw(st.integers(1, n))
    got = topk_jaccard(torch.tensor(x), torch.tensor(y), k).item()
    assert got == pytest.approx(naive_jaccard(naive_topk(x, k), naive_topk(y, k)), abs=1e-6)


@settings(max_examples=100, deadline=None)
@given(st.sets(st.integers(0, 200), min_size=1, max_size=30), st.sets(st.integers(0, 200), min_size=1, max_size=30))
def test_jaccard_identities(a, b):
    ta, tb = torch.tensor(sorted(a)[::-1]), torch.tensor(sorted(b))
    assert jaccard(ta, ta).item() == 1.0  # identical sets
    assert jaccard(ta, tb).item() == pytest.approx(jaccard(tb, ta).item())  # symmetry
    assert jaccard(ta, tb).item() == pytest.approx(naive_jaccard(list(a), list(b)))
    assert intersection_size(ta, tb).item() == len(a & b)


def test_disjoint_sets_give_zero_and_batched_shapes():
    a = torch.tensor([[0, 1, 2], [5, 6, 7]])
    b = torch.tensor([[3, 4, 5], [7, 6, 5]])
    assert jaccard(a, b).tolist() == [0.0, 1.0]
    scores = torch.randn(2, 3, 50)
    assert topk_indices(scores, 5).shape == (2, 3, 5)
    assert topk_jaccard(scores, scores, 5).eq(1.0).all()


def test_all_equal_row_is_deterministic():
    x = torch.zeros(3, 1000)
    for _ in range(3):
        assert topk_indices(x, 7).tolist() == [list(range(7))] * 3


def test_topk_rejects_bad_k():
    with pytest.raises(ValueError, match=r"k must be in \[1, 4\]"):
        topk_indices(torch.zeros(4), 0)
    with pytest.raises(ValueError, match="got k=5"):
        topk_indices(torch.zeros(4), 5)


def test_cosine_basics():
    x = torch.randn(4, 16)
    assert torch.allclose(cosine(x, x), torch.ones(4))
    assert torch.allclose(cosine(x, -x), -torch.ones(4))
    assert cosine(torch.zeros(16), x[0]).item() == 0.0


def _naive_spearman(x: list[float], y: list[float]) -> float:
    """Pearson correlation of average ranks, written out element by element."""
    def ranks(v: list[float]) -> list[float]:
        return [sum(1 for u in v if u < a) + (sum(1 for u in v if u == a) - 1) / 2 for a in v]

    rx, ry = ranks(x), ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    num = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    den = (sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry)) ** 0.5
    return num / den


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 5), st.integers(0, 5)), min_size=2, max_size=30))
def test_spearman_matches_naive_average_rank_reference(pairs):
    x, y = [float(a) for a, _ in pairs], [float(b) for _, b in pairs]
    if len(set(x)) < 2 or len(set(y)) < 2:
        return  # a constant vector has no rank correlation
    assert spearman(x, y) == pytest.approx(_naive_spearman(x, y), abs=1e-12)


def test_spearman_identities():
    v = [0.3, 0.1, 0.9, 0.5]
    assert spearman(v, v) == pytest.approx(1.0)
    assert spearman(v, [-a for a in v]) == pytest.approx(-1.0)
    assert spearman(v, [a * 10 + 3 for a in v]) == pytest.approx(1.0)  # monotone maps keep ranks
    with pytest.raises(ValueError, match="equal length"):
        spearman([1.0, 2.0], [1.0, 2.0, 3.0])


def naive_kl(p_logits: list[float], q_logits: list[float]) -> float:
    """KL(softmax(p) || softmax(q)) with Python floats (float64), term by term."""
    lse = lambda v: max(v) + math.log(sum(math.exp(x - max(v)) for x in v))  # noqa: E731
    lp, lq = [x - lse(p_logits) for x in p_logits], [x - lse(q_logits) for x in q_logits]
    return sum(math.exp(a) * (a - b) for a, b in zip(lp, lq))


logit_rows = st.lists(st.floats(-30, 30, width=32), min_size=2, max_size=50)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(logit_rows, st.floats(0, 1)), min_size=1, max_size=4), st.data())
def test_kl_divergence_matches_a_float64_reference_and_leaves_its_inputs_alone(rows_and_mix, data):
    """fp32 logits in, float64 KL out: equal to the term-by-term reference to float64 rounding (a few ulps of the
    log-probabilities), whatever the shape; a nearly equal pair (mix ~ 1) keeps its tiny KL, which fp32
    log-probabilities would drown in ~1e-6 of rounding."""
    for row, mix in rows_and_mix:
        other = data.draw(st.lists(st.floats(-30, 30, width=32), min_size=len(row), max_size=len(row)))
        p = torch.tensor(row, dtype=torch.float32)
        q = (mix * p.double() + (1 - mix) * torch.tensor(other, dtype=torch.float64)).float()  # [V]
        p_in, q_in = p.clone(), q.clone()
        got = kl_divergence(p.view(1, 1, -1), q.view(1, 1, -1))
        assert got.shape == (1, 1) and got.dtype == torch.float64
        assert torch.equal(p, p_in) and torch.equal(q, q_in)
        want = naive_kl(p.tolist(), q.tolist())
        tol = 16 * torch.finfo(torch.float64).eps * (math.log(len(row)) + 60)  # ulps of |log p| <= log V + 60
        assert abs(float(got) - max(want, 0.0)) <= tol, (float(got), want)


def test_kl_divergence_edge_cases():
    a = torch.tensor([[0.0, 1.0, 2.0]], dtype=torch.float64)
    a_in = a.clone()
    assert kl_divergence(a, a).item() == 0.0 and torch.equal(a, a_in)  # float64 input: not changed in place
    assert kl_divergence(a, a + 5.0).item() == pytest.approx(0.0, abs=16 * torch.finfo(torch.float64).eps)
    ninf = float("-inf")
    ref, cand = torch.tensor([[0.0, ninf, 1.0], [0.0, 0.0, ninf]]), torch.tensor([[0.0, ninf, 1.0], [0.0, ninf, ninf]])
    assert kl_divergence(ref, cand).tolist() == [0.0, math.inf]  # p_v = 0 contributes 0; q_v = 0 < p_v: inf
    with pytest.raises(ValueError, match=r"logits differ in shape: \(2, 3\) vs \(2, 4\)"):
        kl_divergence(torch.zeros(2, 3), torch.zeros(2, 4))
