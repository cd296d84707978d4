"""Fidelity (KL divergence and top-1 agreement of next-token distributions) against hand-computed values and a
float64 reference, on lookup-table models and tiny Llamas."""

from __future__ import annotations

import copy
import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import kl_noise, logit_noise

from lsaq.eval.fidelity import FidelityResult, fidelity, position_stats


class TableLM(torch.nn.Module):
    """A causal LM whose logits at a position depend only on that position's token: ``table[id]`` ([V, V])."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.table = torch.nn.Parameter(table, requires_grad=False)

    def forward(self, input_ids: torch.Tensor, use_cache: bool = False) -> SimpleNamespace:
        return SimpleNamespace(logits=self.table[input_ids])  # [B, T, V]


def kl64(p_logits: np.ndarray, q_logits: np.ndarray) -> float:
    """KL(softmax(p) || softmax(q)) in float64."""
    lp = p_logits - np.logaddexp.reduce(p_logits)
    lq = q_logits - np.logaddexp.reduce(q_logits)
    return float(np.sum(np.exp(lp) * (lp - lq)))


def test_hand_computed_kl_and_agreement():
    # p = (1/2, 1/4, 1/4), q = (1/4, 1/2, 1/4): KL = 1/2 ln 2 - 1/4 ln 2 = ln(2)/4; argmax 0 vs 1.
    f64 = dict(dtype=torch.float64)  # exact to float64 rounding: a few ulps of the log-probabilities (~1)
    ref = torch.log(torch.tensor([[0.5, 0.25, 0.25], [0.2, 0.3, 0.5]], **f64))
    cand = torch.log(torch.tensor([[0.25, 0.5, 0.25], [0.2, 0.3, 0.5]], **f64)) + torch.tensor([[3.0], [-1.0]], **f64)
    kl, agree = position_stats(ref, cand)
    eps = torch.finfo(torch.float64).eps
    assert kl.dtype == torch.float64 and kl[0].item() == pytest.approx(math.log(2) / 4, abs=16 * eps)
    assert kl[1].item() == pytest.approx(0.0, abs=16 * eps)  # a constant shift of the logits changes nothing
    assert agree.tolist() == [False, True]


def test_zero_probabilities_and_impossible_tokens():
    ninf = float("-inf")
    ref = torch.tensor([[0.0, ninf, 1.0], [0.0, 0.0, ninf]])
    cand = torch.tensor([[0.0, ninf, 1.0], [0.0, ninf, ninf]])
    kl, agree = position_stats(ref, cand)
    assert kl[0].item() == 0.0  # p_v = 0 where both are -inf: contributes 0, not nan
    assert kl[1].item() == math.inf  # the candidate gives probability 0 to a token the reference allows
    assert agree.tolist() == [True, True]


def test_identical_models_are_exact():
    torch.manual_seed(0)
    model = TableLM(torch.randn(50, 50) * 3)
    windows = torch.randint(0, 50, (5, 9))
    res = fidelity(model, copy.deepcopy(model), windows, source="s", source_hash="h", batch_size=2, chunk=7)
    assert (res.kl_mean, res.kl_p99, res.top1_agreement) == (0.0, 0.0, 1.0)
    assert (res.positions, res.windows, res.seq_len, res.source, res.source_hash) == (45, 5, 9, "s", "h")


@pytest.mark.parametrize("batch_size, chunk", [(None, 256), (1, 3), (4, 1)])
def test_lookup_models_against_float64_reference(batch_size, chunk):
    """Every position's KL against float64 by hand; mean, numpy's 99th percentile and agreement over positions."""
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(40, 40, generator=g) * 2, torch.randn(40, 40, generator=g) * 2
    b[:20] = a[:20] + 0.05 * torch.randn(20, 40, generator=g)  # half the tokens: nearly the same distribution
    windows = torch.randint(0, 40, (6, 11), generator=g)
    res = fidelity(TableLM(a), TableLM(b), windows, source="t", source_hash="h", batch_size=batch_size, chunk=chunk)
    ids = windows.flatten().numpy()
    per_pos = np.array([kl64(a[i].double().numpy(), b[i].double().numpy()) for i in ids])
    agree = np.array([a[i].argmax() == b[i].argmax() for i in ids])
    assert res.positions == 66 and res.windows == 6 and res.seq_len == 11
    # looked-up logits: the same fp32 values on both sides, so only the float64 statistics' rounding differs
    tol = kl_noise(per_pos, 0.0, 40, float(max(a.abs().max(), b.abs().max())))
    assert abs(res.kl_mean - per_pos.mean()) <= tol.mean()
    assert abs(res.kl_p99 - np.percentile(per_pos, 99)) <= tol.max()
    assert res.kl_p99 > res.kl_mean > 0 and res.top1_agreement == pytest.approx(agree.mean())
    assert 0 < res.top1_agreement < 1


def test_tiny_llama_against_perturbed_copy():
    """A real transformer pair (weights + 2% noise): the statistic equals a float64 per-window reference."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("llama", vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
                               initializer_range=0.5)  # large weights: peaked, far-from-uniform outputs
    torch.manual_seed(0)
    # float64 models: batches of 2 vs one pass of 3 differ by float64 rounding only, which the bound below states
    ref = AutoModelForCausalLM.from_config(cfg, dtype=torch.float64).eval()
    cand = copy.deepcopy(ref)
    with torch.no_grad():
        for p in cand.parameters():
            p.add_(0.02 * p.std() * torch.randn_like(p))
    windows = torch.randint(0, 96, (3, 24), generator=torch.Generator().manual_seed(2))
    res = fidelity(ref, cand, windows, source="x", source_hash="h", batch_size=2, chunk=5)
    with torch.no_grad():
        a, b = ref(input_ids=windows).logits.flatten(0, 1), cand(input_ids=windows).logits.flatten(0, 1)  # [72, V]
    lp, lq = torch.log_softmax(a, -1), torch.log_softmax(b, -1)
    per_pos = (lp.exp() * (lp - lq)).sum(-1).numpy()
    scale = float(max(a.abs().max(), b.abs().max()))
    noise = logit_noise(torch.float64, scale, cfg.num_hidden_layers * cfg.intermediate_size)
    tol = kl_noise(per_pos, noise, cfg.vocab_size, scale)  # [72]
    # a mean moves by at most the mean bound; a percentile by at most the largest one
    assert abs(res.kl_mean - per_pos.mean()) <= tol.mean()
    assert abs(res.kl_p99 - np.percentile(per_pos, 99)) <= tol.max()
    top2 = torch.cat([a, b]).topk(2, -1).values
    assert float((top2[:, 0] - top2[:, 1]).min()) > 2 * noise  # no near-tie that rounding could flip
    agree = (lp.argmax(-1) == lq.argmax(-1)).double().mean().item()
    assert res.top1_agreement == agree and res.kl_mean > 1e-3 and 0.5 < agree < 1
    assert ref.training is False and cand.training is False


def test_bad_input_is_refused():
    m = TableLM(torch.zeros(8, 8))
    with pytest.raises(ValueError, match=r"windows must have shape \[N>=1, T>=1\], got \(4,\)"):
        fidelity(m, m, torch.zeros(4, dtype=torch.int64), source="s", source_hash="h")
    with pytest.raises(ValueError, match="batch_size must be at least 1"):
        fidelity(m, m, torch.zeros(1, 4, dtype=torch.int64), source="s", source_hash="h", batch_size=0)
    with pytest.raises(ValueError, match="share a vocabulary"):
        fidelity(m, TableLM(torch.zeros(8, 9)), torch.zeros(1, 4, dtype=torch.int64), source="s", source_hash="h")


def test_result_round_trips_through_json():
    res = FidelityResult(kl_mean=0.125, kl_p99=1.5, top1_agreement=0.875, positions=64, windows=2, seq_len=32,
                         source="generated", source_hash="h" * 64, seconds=0.25)
    j = res.to_json()
    assert list(j) == ["kl_mean", "kl_p99", "top1_agreement", "positions", "windows", "seq_len", "source",
                       "source_hash", "seconds"]
    assert FidelityResult.from_json(json.loads(json.dumps(j))) == res
