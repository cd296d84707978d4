"""INT4 per-channel or in groups: group sizes must divide every input width, and ``group_size="auto"`` lets the
measured strategy weigh both formats by their measured loss and bytes."""

from __future__ import annotations

import math
import random

import pytest

from lsaq.calibration.sets import KINDS, CalibrationInfo
from lsaq.importance.cost import LayerLoss
from lsaq.models.configs import load_config
from lsaq.models.families import model_shape
from lsaq.models.identity import ModelInfo
from lsaq.planning.devices import DeviceProfile, MemoryKind
from lsaq.planning.memory import WeightPolicy, check_group_divides, fitting_group_size, group_widths
from lsaq.precision import parse_group_size
from lsaq.planning.planner import InfeasiblePlanError, PlanOptions, Strategy, budget_for, make_plan
from lsaq.planning.stage import plan
from lsaq.precision import Precision

CONFIG = load_config("llama-2-7b").config  # widths 4096 and 11008: groups of 128 fit
SHAPE = model_shape(CONFIG)
MEASURED = PlanOptions(context=256, strategy=Strategy.MEASURED)


def smollm_like() -> dict:
    return {**CONFIG, "hidden_size": 576, "intermediate_size": 1536, "num_attention_heads": 9,
            "num_key_value_heads": 3, "num_hidden_layers": 4}


def record(int4: list[float], grouped: list[float], int8: float = 1e-4, config: dict = CONFIG,
           group: int = 128) -> LayerLoss:
    n = len(int4)
    info = ModelInfo(id="llama-2-7b", source="test", revision=None, content_hash="ab" * 32,
                     architecture="LlamaForCausalLM", model_type="llama", num_layers=n, config=config)
    calib = CalibrationInfo(hash="cd" * 32, source="test", kind=sorted(KINDS)[0], source_hash="ef" * 32, samples=1,
                            seq_len=8, seed=0, tokens=8)
    rows = tuple((int8, a, b) for a, b in zip(int4, grouped))
    return LayerLoss(model=info, calibration=calib, probes=("int8", "int4", f"int4-g{group}"), loss=rows,
                     std=tuple((0.0,) * 3 for _ in rows))


def device_for_bits(bits: float, options: PlanOptions = MEASURED, shape=SHAPE) -> DeviceProfile:
    capacity = math.floor(bits * shape.num_layers * shape.linear_params_per_layer / 8)
    return DeviceProfile(name=f"{bits}-bits", memory=budget_for(shape, options).fixed + capacity,
                         kind=MemoryKind.SYSTEM, reserve=0, notes="test")


def test_group_sizes_must_divide_every_input_width():
    assert group_widths(SHAPE) == (4096, 11008) and fitting_group_size(SHAPE) == 128
    small = model_shape(smollm_like())
    assert group_widths(small) == (576, 1536) and fitting_group_size(small) == 64
    assert fitting_group_size(small, largest=32) == 32
    assert fitting_group_size(model_shape({**smollm_like(), "hidden_size": 100, "num_attention_heads": 4,
                                           "num_key_value_heads": 2})) is None
    check_group_divides(small, 64)
    with pytest.raises(ValueError, match=r"group size 128 does not divide the input width 576 .* fit: 64, 32, 16"):
        check_group_divides(small, 128)
    with pytest.raises(ValueError, match="group size 128 does not divide"):  # the planner refuses ragged groups
        make_plan(small, [1.0] * 4, device_for_bits(8, shape=small),
                  PlanOptions(context=256, policy=WeightPolicy(group_size=128)))


def test_auto_keeps_the_format_with_the_lower_predicted_loss():
    rng = random.Random(0)
    int4 = [rng.uniform(0.01, 1.0) for _ in range(SHAPE.num_layers)]
    rec = record(int4, [v / 20 for v in int4])  # groups: far less loss, a few more bytes
    for bits in (4.3, 4.6, 5.5, 7.0):
        device = device_for_bits(bits)
        both = {g: plan(device, loss=rec, options=MEASURED, group_size=g) for g in (None, 128)}
        auto = plan(device, loss=rec, options=MEASURED, group_size="auto")
        best = min(both.values(), key=lambda p: p.predicted_loss)
        assert auto == best and auto.predicted_loss == min(p.predicted_loss for p in both.values())
        assert auto.breakdown.required <= device.usable
    # at 4.3 bits all-INT4 in groups of 128 (4.19 bits) fits and wins; per-channel would need INT8 layers to gain
    assert plan(device_for_bits(4.3), loss=rec, options=MEASURED, group_size="auto").options.policy.group_size == 128


def test_auto_prefers_fewer_bytes_when_groups_do_not_help():
    int4 = [0.5] * SHAPE.num_layers
    same = plan(device_for_bits(6.0), loss=record(int4, int4), options=MEASURED, group_size="auto")
    assert same.options.policy.group_size is None  # equal loss: per-channel's scales take fewer bytes
    # 4.1 bits: every layer INT4; only per-channel fits (grouped INT4 is 4.19 bits), whatever it predicts
    tight = plan(device_for_bits(4.1), loss=record(int4, [0.0] * SHAPE.num_layers), options=MEASURED,
                 group_size="auto")
    assert tight.options.policy.group_size is None and set(tight.precisions) == {Precision.INT4}
    with pytest.raises(InfeasiblePlanError):
        plan(device_for_bits(3.9), loss=record(int4, int4), options=MEASURED, group_size="auto")


def test_bad_group_sizes_are_named():
    assert parse_group_size(" AUTO ") == "auto" and parse_group_size("64") == 64 and parse_group_size(None) is None
    for bad in ("x", "0", -4, "12.5", True):
        with pytest.raises(ValueError, match=f"got {bad!r}"):
            parse_group_size(bad)
    rec = record([0.5] * SHAPE.num_layers, [0.1] * SHAPE.num_layers)
    # a ranking strategy has nothing to weigh the formats by: auto is per-channel there
    ranked = plan(device_for_bits(5.0), loss=rec, options=PlanOptions(context=256), group_size="auto")
    assert ranked == plan(device_for_bits(5.0), loss=rec, options=PlanOptions(context=256))
    assert ranked.options.policy.group_size is None
    with pytest.raises(ValueError, match="needs a layer-loss record"):
        plan(device_for_bits(5.0), config="llama-2-7b", options=MEASURED, group_size="auto")
    with pytest.raises(ValueError, match="needs int4-g128"):  # the record measured groups of 64 only
        plan(device_for_bits(5.0), loss=record([0.5] * 32, [0.1] * 32, group=64), options=MEASURED,
             group_size="auto")


def test_cli_plans_auto_and_says_which_format_won(tmp_path, capsys):
    from lsaq.cli import main

    int4 = [0.5] * SHAPE.num_layers
    record(int4, [0.01] * SHAPE.num_layers).save(tmp_path / "loss.json")
    budget = str(device_for_bits(4.4).memory)
    assert main(["plan", "--loss", str(tmp_path / "loss.json"), "--strategy", "measured", "--group-size", "auto",
                 "--budget", budget, "--context", "256", "--out", str(tmp_path / "plan.json"), "--compare"]) == 0
    out = capsys.readouterr().out
    assert "int4 group size 128" in out
    assert main(["plan", "--config", "llama-2-7b", "--group-size", "big", "--budget", budget]) == 2
    assert "group size must be a positive integer, 'auto' or None (per-channel), got 'big'" in capsys.readouterr().err
