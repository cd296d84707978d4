"""Measured cost per layer and precision (lsaq.importance.cost): probes share one float pass without changing any
value, the record round-trips and feeds the planner's table, and on the real model INT8 costs less than INT4."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from test_importance import tiny_model

from lsaq.importance.calibration import CalibrationSet
from lsaq.importance.cost import LayerLoss, measure_layer_loss
from lsaq.importance.sensitivity import Probe, sensitivity_samples
from lsaq.models.identity import ModelInfo
from lsaq.precision import Precision

PROBES = ("int8", "int4", "int4-g16")


def tiny_info(model) -> ModelInfo:
    return ModelInfo(id="tiny", source="test", revision=None, content_hash="0" * 64,
                     architecture="LlamaForCausalLM", model_type=model.config.model_type,
                     num_layers=model.config.num_hidden_layers, config=json.loads(model.config.to_json_string()),
                     dtype="float32")


@pytest.fixture(scope="module")
def measured():
    model = tiny_model("llama")
    calib = CalibrationSet.from_tokens(torch.randint(3, 96, (4, 12), generator=torch.Generator().manual_seed(3)))
    return model, calib, measure_layer_loss(model, tiny_info(model), calib, PROBES, batch_size=3)


def test_shared_probes_give_each_probe_its_own_measurement(measured):
    model, calib, record = measured
    assert record.probes == PROBES and record.num_layers == 3
    for k, label in enumerate(PROBES):
        probe = Probe.parse(label)
        alone = sensitivity_samples(model, calib, precision=probe.precision, group_size=probe.group_size,
                                    batch_size=3)
        np.testing.assert_array_equal([row[k] for row in record.loss], alone.mean(0))
    int8, int4 = (np.array([row[k] for row in record.loss]) for k in (0, 1))
    assert (np.abs(int8) < int4).all()  # per layer, INT8 moves the distribution less than INT4
    assert record.seconds > 0 and record.forward_seconds > 0 and np.isfinite(record.cost_ratio)


def test_the_record_round_trips_and_gives_the_planner_its_table(measured, tmp_path):
    model, calib, record = measured
    record.save(tmp_path / "loss.json")
    back = LayerLoss.load(tmp_path / "loss.json")
    assert back == record and back.id == record.id
    obj = json.loads((tmp_path / "loss.json").read_text())
    assert obj["schema"] == "lsaq.layer_loss" and obj["version"] == 1 and obj["id"] == record.id
    again = measure_layer_loss(model, tiny_info(model), calib, PROBES, batch_size=3)
    assert again.loss == record.loss and again.id == record.id  # deterministic; timings are not in the id
    table = record.table()
    assert [set(t) for t in table] == [set(Precision)] * 3 and all(t[Precision.FP16] == 0.0 for t in table)
    assert [t[Precision.INT4] for t in table] == [row[1] for row in record.loss]
    assert [t[Precision.INT4] for t in record.table(group_size=16)] == [row[2] for row in record.loss]
    with pytest.raises(ValueError, match="needs int4-g32"):
        record.table(group_size=32)


def test_probe_labels_parse_and_bad_ones_are_named():
    assert Probe.parse("INT4-g64") == Probe(Precision.INT4, 64) and Probe.parse("int8").label == "int8"
    for bad in ("fp16", "int3", "int8-g64", "int4-gx"):
        with pytest.raises(ValueError, match=f"unknown probe '{bad}'"):
            Probe.parse(bad)
    model = tiny_model("llama")
    calib = CalibrationSet.from_tokens(torch.randint(3, 96, (1, 8)))
    with pytest.raises(ValueError, match="named twice"):
        measure_layer_loss(model, tiny_info(model), calib, ("int4", "INT4"))


def test_real_model_int8_costs_less_than_int4_in_every_layer(shared_model):
    tokens = torch.tensor(shared_model.tokenizer("The quick brown fox jumps over the lazy dog. " * 8)["input_ids"][:64])
    calib = CalibrationSet.from_tokens(tokens.view(1, 64))
    record = measure_layer_loss(shared_model.model, shared_model.info, calib, ("int8", "int4", "int4-g64"))
    loss = np.array(record.loss)  # [30, 3]
    print(f"layer loss on 1 x 64 tokens: {record.seconds:.1f}s = {record.cost_ratio:.1f} forward passes; "
          f"mean KL int8 {loss[:, 0].mean():.2e}, int4 {loss[:, 1].mean():.2e}, int4-g64 {loss[:, 2].mean():.2e}")
    assert loss.shape == (30, 3) and np.isfinite(loss).all()
    assert (loss[:, 0] < loss[:, 1]).all() and loss[:, 2].mean() < loss[:, 1].mean()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from test_dtype import tiny_llama_dir

    return tiny_llama_dir(tmp_path_factory.mktemp("tiny-loss") / "model", head_gain=20.0)


def test_measured_plans_minimise_the_recorded_loss_and_record_it(tiny_dir, tmp_path, capsys):
    from lsaq.cli import main
    from lsaq.planning.planner import Plan, PlanOptions
    from lsaq.planning.solvers import predicted_loss
    from lsaq.planning.stage import DeviceRequest, plan

    (tmp_path / "text.txt").write_text("the quick brown fox jumps over the lazy dog. " * 60)
    assert main(["measure", "--model", str(tiny_dir), "--calib", str(tmp_path / "text.txt"), "--samples", "3",
                 "--seq-len", "16", "--probes", "int8,int4", "--out", str(tmp_path / "loss.json")]) == 0
    assert "forward passes" in capsys.readouterr().out
    record = LayerLoss.load(tmp_path / "loss.json")
    sizes = {s: plan(DeviceRequest(budget="1GiB"), loss=record, options=PlanOptions(context=64, strategy=s)).breakdown.required
             for s in ("fp16", "int4")}
    budget = (sizes["fp16"] + sizes["int4"]) // 2  # room for some layers above INT4, not all
    options = PlanOptions(context=64, strategy="measured")
    result = plan(DeviceRequest(budget=f"{budget}B"), loss=record, options=options, out=tmp_path / "plan.json")
    table = record.table()
    assert result.fits and result.predicted_loss < predicted_loss(table, [Precision.INT4] * 3)
    assert result.loss_id == record.id and result.predicted_loss == predicted_loss(table, result.precisions)
    assert Plan.load(tmp_path / "plan.json") == result and Plan.load(tmp_path / "plan.json").id == result.id
    # every other plan that fits the same budget has at least the predicted loss
    for s in ("lsaq", "optimal", "int8", "int4"):
        try:
            other = plan(DeviceRequest(budget=f"{budget}B"), loss=record, options=PlanOptions(context=64, strategy=s))
        except ValueError:
            continue
        assert predicted_loss(table, other.precisions) >= result.predicted_loss - 1e-15
    assert main(["plan", "--loss", str(tmp_path / "loss.json"), "--strategy", "measured", "--budget", f"{budget}B",
                 "--context", "64"]) == 0
    assert "predicted loss" in capsys.readouterr().out
    with pytest.raises(ValueError, match="needs a measured layer-loss table"):
        plan(DeviceRequest(budget=f"{budget}B"), importance=[1.0, 2.0, 3.0], config=str(tiny_dir), options=options)
