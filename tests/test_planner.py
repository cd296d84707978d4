"""Planner: property tests of the strategies, plan records, infeasibility, and ``lsaq plan``."""

from __future__ import annotations

import itertools
import json
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lsaq.cli import main
from lsaq.methods import ImportanceRef, ranking
from lsaq.models.families import model_shape
from lsaq.models.identity import ModelRef
from lsaq.planning.devices import budget_profile
from lsaq.planning.memory import WeightPolicy, group_widths
from lsaq.planning.planner import InfeasiblePlanError, Plan, PlanOptions, budget_for, make_plan
from lsaq.planning.solvers import default_quality, lp_upper_bound, lsaq_assign, objective, optimal_assign
from lsaq.planning.stage import resolve_device
from lsaq.precision import Precision

FP16, INT8, INT4 = Precision.FP16, Precision.INT8, Precision.INT4
LEVEL = {p: i for i, p in enumerate(Precision)}  # 0 = most precise
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# ---------------------------------------------------------------------------------- generators

importance_st = st.floats(min_value=0.0, max_value=1.0, allow_nan=False, width=32)


@st.composite
def problems(draw, max_layers=10, homogeneous=None):
    """(importance, per-layer costs, allowed levels) with FP16 > INT8 > INT4 in bytes, as real shapes give."""
    n = draw(st.integers(1, max_layers))
    imp = draw(st.lists(importance_st, min_size=n, max_size=n))
    same = draw(st.booleans()) if homogeneous is None else homogeneous

    def layer_cost():
        c4 = draw(st.integers(1, 400))
        c8 = c4 + draw(st.integers(1, 400))
        return {INT4: c4, INT8: c8, FP16: c8 + draw(st.integers(1, 800))}

    costs = [layer_cost()] * n if same else [layer_cost() for _ in range(n)]
    allowed = draw(st.sampled_from([list(Precision), [FP16, INT8], [FP16, INT4], [INT8, INT4], [INT4]]))
    return imp, costs, allowed


def cost_of(assign, costs):
    return sum(c[p] for c, p in zip(costs, assign))


def bounds(costs, allowed):
    return sum(min(c[p] for p in allowed) for c in costs), sum(max(c[p] for p in allowed) for c in costs)


# ----------------------------------------------------------------------------------- properties


@SETTINGS
@given(problems(), st.floats(0, 1.1))
def test_both_fit_or_both_infeasible(problem, frac):
    imp, costs, allowed = problem
    lo, hi = bounds(costs, allowed)
    capacity = int(lo * 0.9 + frac * (hi - lo * 0.9))
    rule = lsaq_assign(imp, costs, capacity, allowed)
    best, info = optimal_assign(imp, costs, capacity, allowed)
    if lo > capacity:  # even the cheapest assignment does not fit
        assert rule is None and best is None
        return
    assert rule is not None and best is not None and info.method == "exact"
    assert cost_of(rule, costs) <= capacity and cost_of(best, costs) <= capacity
    assert set(rule) <= set(allowed) and set(best) <= set(allowed)
    assert objective(imp, best) >= objective(imp, rule)  # exact rationals: never worse than the rule
    assert objective(imp, best) <= lp_upper_bound(imp, costs, capacity, allowed, default_quality()) + 1e-9


@SETTINGS
@given(problems(), st.floats(0, 1), st.floats(0, 1))
def test_larger_budget_is_monotone(problem, a, b):
    imp, costs, allowed = problem
    lo, hi = bounds(costs, allowed)
    small, large = sorted(int(lo + x * (hi - lo)) for x in (a, b))
    r_small, r_large = lsaq_assign(imp, costs, small, allowed), lsaq_assign(imp, costs, large, allowed)
    assert all(LEVEL[x] >= LEVEL[y] for x, y in zip(r_small, r_large))  # no layer loses precision
    o_small, o_large = optimal_assign(imp, costs, small, allowed)[0], optimal_assign(imp, costs, large, allowed)[0]
    assert objective(imp, o_large) >= objective(imp, o_small)


@SETTINGS
@given(problems(), st.floats(0, 1))
def test_lsaq_respects_importance_order(problem, frac):
    imp, costs, allowed = problem
    lo, hi = bounds(costs, allowed)
    rule = lsaq_assign(imp, costs, int(lo + frac * (hi - lo)), allowed)
    order = ranking(imp)
    for a, b in zip(order, order[1:]):  # a ranks above b (more important, or tied and earlier)
        assert LEVEL[rule[a]] <= LEVEL[rule[b]]
    levels = [p for p in Precision if p in allowed]
    used = [levels.index(p) for p in rule]
    assert max(used) - min(used) <= 1  # two adjacent allowed levels at a time


@settings(max_examples=40, deadline=None)
@given(problems(max_layers=6), st.floats(0, 1))
def test_optimal_equals_brute_force(problem, frac):
    imp, costs, allowed = problem
    lo, hi = bounds(costs, allowed)
    capacity = int(lo + frac * (hi - lo))
    best = max(
        (objective(imp, combo) for combo in itertools.product(allowed, repeat=len(imp)) if cost_of(combo, costs) <= capacity),
    )
    assert objective(imp, optimal_assign(imp, costs, capacity, allowed)[0]) == best


@settings(max_examples=25, deadline=None)
@given(problems(max_layers=12, homogeneous=False), st.floats(0, 1))
def test_thinned_frontier_still_fits_and_beats_rule(problem, frac):
    imp, costs, allowed = problem
    lo, hi = bounds(costs, allowed)
    capacity = int(lo + frac * (hi - lo))
    best, info = optimal_assign(imp, costs, capacity, allowed, max_frontier=3)
    rule = lsaq_assign(imp, costs, capacity, allowed)
    if rule is None:
        assert best is None
        return
    assert cost_of(best, costs) <= capacity
    assert objective(imp, best) >= objective(imp, rule)
    if info.method == "bucketed":
        assert info.upper_bound is not None and float(objective(imp, best)) <= info.upper_bound + 1e-9


def test_ties_are_deterministic_and_favor_earlier_layers():
    imp, costs = [1.0] * 6, [{FP16: 4, INT8: 2, INT4: 1}] * 6
    rule = lsaq_assign(imp, costs, 18, list(Precision))
    best, _ = optimal_assign(imp, costs, 18, list(Precision))
    assert rule == best == [FP16, FP16, FP16, INT8, INT8, INT8]


def test_optimal_can_beat_the_rule():
    # One dominant layer: optimal keeps it FP16 and pays with an extra INT4; the rule never mixes FP16 and INT4.
    imp, costs = [100.0, 1.0, 1.0, 1.0], [{FP16: 8, INT8: 4, INT4: 2}] * 4
    rule = lsaq_assign(imp, costs, 16, list(Precision))
    best, _ = optimal_assign(imp, costs, 16, list(Precision))
    assert rule == [INT8, INT8, INT8, INT8]
    assert best == [FP16, INT4, INT4, INT8] or objective(imp, best) > objective(imp, rule)
    assert objective(imp, best) > objective(imp, rule)


# -------------------------------------------------------------------------------- plans on shapes

def small_config(hidden, inter, layers, heads, kv, vocab, tied):
    return {"model_type": "llama", "hidden_size": hidden, "intermediate_size": inter, "num_hidden_layers": layers,
            "num_attention_heads": heads, "num_key_value_heads": kv, "vocab_size": vocab, "tie_word_embeddings": tied}


@st.composite
def shapes(draw):
    heads = draw(st.sampled_from([2, 4, 8]))
    head_dim = draw(st.sampled_from([8, 16, 32]))
    kv = draw(st.sampled_from([h for h in (1, 2, 4, 8) if heads % h == 0]))
    cfg = small_config(heads * head_dim, draw(st.integers(16, 256)), draw(st.integers(1, 12)), heads, kv,
                       draw(st.integers(16, 512)), draw(st.booleans()))
    return model_shape(cfg)


@settings(max_examples=40, deadline=None)
@given(shapes(), st.data())
def test_plans_fit_and_grow_with_budget(shape, data):
    imp = data.draw(st.lists(importance_st, min_size=shape.num_layers, max_size=shape.num_layers))
    # group sizes that divide every input width (the planner refuses ragged groups: test_int4_format)
    group = data.draw(st.sampled_from([None] + [g for g in (8, 32) if all(w % g == 0 for w in group_widths(shape))]))
    context, batch = data.draw(st.integers(1, 64)), data.draw(st.integers(1, 3))
    opts = {s: PlanOptions(context=context, batch=batch, strategy=s, policy=WeightPolicy(group_size=group)) for s in ("lsaq", "optimal")}
    b = budget_for(shape, opts["lsaq"])
    lo, hi = b.min_required(list(Precision), shape.num_layers), b.min_required([FP16], shape.num_layers)
    small, large = sorted(data.draw(st.integers(max(1, lo - 50), hi + 50)) for _ in range(2))
    plans = {}
    for s, o in opts.items():
        for budget in (small, large):
            try:
                plans[s, budget] = make_plan(shape, imp, budget_profile(budget), o)
            except InfeasiblePlanError as e:
                assert budget < lo and e.min_required == lo and e.available == budget
                assert "needs at least" in str(e) and "What would help" in str(e)
                continue
            p = plans[s, budget]
            assert p.fits and p.breakdown.required <= budget and p.headroom == budget - p.breakdown.required
    if ("lsaq", small) in plans:
        a, z = plans["lsaq", small], plans["lsaq", large]
        assert all(LEVEL[x] >= LEVEL[y] for x, y in zip(a.precisions, z.precisions))
        assert plans["optimal", large].objective >= plans["optimal", small].objective
        for budget in (small, large):
            assert objective(imp, plans["optimal", budget].precisions) >= objective(imp, plans["lsaq", budget].precisions)


@pytest.mark.parametrize("runtime", ["transformers", "llama.cpp"])
def test_infeasible_message_on_a_real_device(runtime):
    shape = model_shape(json.loads(open(_cfg("llama-2-7b")).read()))
    jetson = resolve_device("jetson-orin-nano-8gb")
    with pytest.raises(InfeasiblePlanError) as e:
        make_plan(shape, [1.0] * 32, jetson, PlanOptions(context=4096, runtime=runtime))
    msg = str(e.value)
    if runtime == "transformers":
        assert e.value.min_required == 6_508_877_312
    assert e.value.available == jetson.usable
    for hint in ("fits", "--embed-precision int8", "--embed-precision int4", "a device with at least"):
        assert hint in msg
    # and the hint is right: that context fits, one more token does not
    context = int(re.search(r"--context (\d+) fits", msg).group(1))
    assert context == 2667 or runtime != "transformers"
    make_plan(shape, [1.0] * 32, jetson, PlanOptions(context=context, runtime=runtime))
    with pytest.raises(InfeasiblePlanError):
        make_plan(shape, [1.0] * 32, jetson, PlanOptions(context=context + 1, runtime=runtime))


def test_uniform_baselines():
    shape = model_shape(json.loads(open(_cfg("llama-2-7b")).read()))
    dev = resolve_device("rtx3060")
    assert make_plan(shape, [1.0] * 32, dev, PlanOptions(strategy="int8")).precisions == (INT8,) * 32
    with pytest.raises(InfeasiblePlanError):
        make_plan(shape, [1.0] * 32, dev, PlanOptions(strategy="fp16"))
    assert make_plan(shape, [1.0] * 32, dev, PlanOptions(strategy="int4")).fits


def test_option_validation():
    with pytest.raises(ValueError, match="valid strategies: lsaq, optimal"):
        PlanOptions(strategy="greedy")
    with pytest.raises(ValueError, match="context"):
        PlanOptions(context=0)
    with pytest.raises(ValueError, match="valid precisions"):
        PlanOptions(allowed=("fp16", "int2"))
    shape = model_shape(small_config(32, 64, 2, 4, 2, 50, False))
    with pytest.raises(ValueError, match="3 values but the model has 2"):
        make_plan(shape, [1, 2, 3], budget_profile("1GiB"))
    with pytest.raises(ValueError, match="non-negative"):
        make_plan(shape, [1, -2], budget_profile("1GiB"))


# ---------------------------------------------------------------------------------- plan records


def _cfg(name: str) -> str:
    from importlib import resources

    return str(resources.files("lsaq").joinpath(f"data/configs/{name}.json"))


def test_plan_json_roundtrip(tmp_path):
    shape = model_shape(json.loads(open(_cfg("llama-3-8b")).read()))
    imp = [1.0 / (1 + i) for i in range(32)]
    plan = make_plan(shape, imp, resolve_device("rtx3060"), PlanOptions(strategy="optimal"),
                     model=ModelRef(id="llama-3-8b", model_type="llama", num_layers=32), importance_ref=ImportanceRef("abc", "jaccard", 10))
    path = plan.save(tmp_path / "plan.json")
    obj = json.loads(path.read_text())
    assert obj["schema"] == "lsaq.plan" and obj["version"] == 1 and obj["id"] == plan.id
    assert obj["budget"]["fits"] and obj["bytes"]["total"] <= obj["device"]["memory_bytes"]
    assert obj["shape"]["layer_linears"][0] == {"name": "self_attn.q_proj", "out_features": 4096, "in_features": 4096, "bias": False}
    assert obj["model"]["num_layers"] == 32 and obj["importance"]["id"] == "abc"
    assert set(obj["options"]) >= {"context", "batch", "strategy", "allowed", "group_size", "embed", "head"}
    loaded = Plan.load(path)
    assert loaded == plan and loaded.id == plan.id
    obj["bytes"]["kv_cache"] += 1
    path.write_text(json.dumps(obj))
    with pytest.raises(ValueError, match="stored bytes differ"):
        Plan.load(path)


# ------------------------------------------------------------------------------------------- CLI


def test_cli_plan_from_shipped_config(tmp_path, capsys):
    out = tmp_path / "p.json"
    assert main(["plan", "--config", "llama-2-7b", "--device", "rtx3060", "--context", "4096", "--compare",
                 "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "| lsaq | yes | 10/22/0 |" in text and "| fp16 | no |" in text and "headroom" in text
    plan = Plan.load(out)
    assert plan.importance_ref.id == "none" and plan.model.id == "llama-2-7b" and plan.fits


def test_cli_plan_with_importance_record_and_budget(tmp_path, capsys):
    from lsaq.calibration.sets import CalibrationInfo
    from lsaq.importance.record import LayerImportance
    from lsaq.models.identity import ModelInfo

    cfg = {**small_config(64, 128, 4, 4, 2, 256, True), "architectures": ["LlamaForCausalLM"]}
    info = ModelInfo("tiny", "/models/tiny", None, "f" * 64, "LlamaForCausalLM", "llama", 4, cfg)
    calib = CalibrationInfo("c" * 64, "tokens", "tokens", "d" * 64, samples=1, seq_len=8, seed=0, tokens=8)
    rec = LayerImportance(info, "jaccard", 10, calib,
                          (0.9, 0.1, 0.2, 0.6), (0.0,) * 4)
    rec.save(tmp_path / "imp.json")
    out = tmp_path / "plan.json"
    assert main(["plan", "--importance", str(tmp_path / "imp.json"), "--budget", "420KiB", "--context", "16",
                 "--strategy", "optimal", "--out", str(out)]) == 0
    plan = Plan.load(out)
    assert plan.importance_ref.id == rec.id and plan.model.content_hash == "f" * 64
    assert plan.device.name == "budget" and plan.fits and plan.precisions[0] is not INT4


def test_cli_plan_errors(tmp_path, capsys):
    argv = ["plan", "--config", "llama-2-7b", "--device", "jetson-orin-nano-8gb", "--runtime", "transformers"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "needs at least 6.06 GiB" in err and "5.20 GiB" in err
    assert main(["plan", "--config", "llama-2-7b"]) == 2
    assert "--device" in capsys.readouterr().err
    assert main(["plan", "--config", "llama-9", "--budget", "6GiB"]) == 2
    assert "shipped configs: llama-2-13b" in capsys.readouterr().err
    assert main(["plan", "--config", "llama-2-7b", "--budget", "6 lightyears"]) == 2
    assert "unknown unit" in capsys.readouterr().err
    assert main(["plan", "--config", "llama-2-7b", "--device", "rtx3060", "--wait-for-memory", "5"]) == 2
    assert "--device local" in capsys.readouterr().err
    (tmp_path / "v.json").write_text("[1, 2]")
    assert main(["plan", "--config", "llama-2-7b", "--device", "rtx3060", "--importance", str(tmp_path / "v.json")]) == 2
    assert "2 values but the model has 32" in capsys.readouterr().err


def test_cli_plan_bare_vector(tmp_path, capsys):
    (tmp_path / "v.json").write_text(json.dumps([1.0] + [0.1] * 31))
    out = tmp_path / "p.json"
    assert main(["plan", "--config", "llama-2-7b", "--device", "rtx3060-8gb", "--importance", str(tmp_path / "v.json"),
                 "--strategy", "optimal", "--out", str(out)]) == 0
    plan = Plan.load(out)
    assert plan.importance_ref.method == "vector" and plan.precisions[0] is not INT4


def test_cli_wait_for_memory_local(monkeypatch, capsys):
    import lsaq.planning.detect as d
    from lsaq.planning.devices import DeviceProfile, MemoryKind

    seen = iter([1 * 1024**3, 30 * 1024**3])
    monkeypatch.setattr(d, "detect_local", lambda: DeviceProfile("local", next(seen), MemoryKind.SYSTEM, 0))
    monkeypatch.setattr(d.time, "sleep", lambda s: None)
    assert main(["plan", "--config", "llama-2-7b", "--device", "local", "--wait-for-memory", "30"]) == 0
    assert "plan: llama-2-7b" in capsys.readouterr().out


def test_bucketed_path_reports_a_bound():
    costs = [{INT4: 10 + i, INT8: 30 + 3 * i, FP16: 70 + 7 * i} for i in range(12)]
    imp = [((7 * i) % 12 + 1) / 12 for i in range(12)]
    capacity = sum(c[INT8] for c in costs)
    best, info = optimal_assign(imp, costs, capacity, list(Precision), max_frontier=3)
    exact, exact_info = optimal_assign(imp, costs, capacity, list(Precision))
    assert info.method == "bucketed" and exact_info.method == "exact" and info.notes
    assert cost_of(best, costs) <= capacity
    assert objective(imp, best) <= objective(imp, exact) <= info.upper_bound + 1e-9
