"""Measured cost per layer and precision (lsaq.importance.cost): probes share one float pass without changing any
value, the record round-trips and feeds the planner's table, and on the real model INT8 costs less than INT4."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import kl_noise, logit_noise
from test_importance import tiny_model

from lsaq.calibration.sets import CalibrationSet
from lsaq.importance.cost import LayerLoss, measure_layer_loss
from lsaq.importance.sensitivity import Probe, probe_samples, sensitivity_samples
from lsaq.models.identity import ModelInfo
from lsaq.precision import Precision

PROBES = ("int8", "int4", "int4-g16")


def tiny_info(model) -> ModelInfo:
    return ModelInfo(id="tiny", source="test", revision=None, content_hash="0" * 64,
                     architecture="LlamaForCausalLM", model_type=model.config.model_type,
                     num_layers=model.config.num_hidden_layers, config=json.loads(model.config.to_json_string()),
                     dtype="float32")


def kl_tolerance(kl: np.ndarray, logits: torch.Tensor, model) -> np.ndarray:
    """How far a KL measured by lsaq (batches of 3, layers replayed) and by a brute-force forward pass over the
    whole batch may differ: the float rounding of two differently blocked passes, never a wrong position or layer."""
    cfg = model.config
    noise = logit_noise(logits.dtype, float(logits.abs().max()), cfg.num_hidden_layers * cfg.intermediate_size)
    return kl_noise(kl, noise, cfg.vocab_size, float(logits.abs().max()))


@pytest.fixture(scope="module")
def measured():
    model = tiny_model("llama").double()  # float64: what is compared is the replay's logic, not fp32 rounding
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


def test_gptq_probes_measure_gptq_codes_from_the_float_activations(measured, tmp_path):
    """With ``quantizer="gptq"`` each probe swaps in the codes GPTQ chooses from the float model's activations
    (brute force here: Hessians hooked on a plain float pass, then whole forward passes with one layer's codes
    swapped in), and the record says so."""
    import torch.nn.functional as F

    from lsaq.importance.sensitivity import quantized_layer
    from lsaq.models.parts import decoder_parts
    from lsaq.quantization.gptq import HessianAccumulator, gptq_quantize

    model, calib, rtn = measured
    record = measure_layer_loss(model, tiny_info(model), calib, PROBES, quantizer="GPTQ", batch_size=3)
    assert record.quantizer == "gptq" and record.id != rtn.id and record.loss != rtn.loss
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n}
    acc = {n: HessianAccumulator(m.in_features, torch.float64) for n, m in linears.items()}
    hooks = [m.register_forward_pre_hook(lambda _m, a, n=n: acc[n].add(a[0])) for n, m in linears.items()]
    with torch.inference_mode():
        logits = model(input_ids=calib.tokens, use_cache=False).logits
    for h in hooks:
        h.remove()
    for k, label in enumerate(PROBES):
        probe = Probe.parse(label)
        want = []
        for i, layer in enumerate(decoder_parts(model).layers):  # brute force: whole passes, layer i GPTQ'd
            codes = {n.split(f"layers.{i}.")[1]: gptq_quantize(m.weight, acc[n].hessian(), probe.precision,
                                                               probe.group_size, act_order=True)
                     for n, m in linears.items() if f"layers.{i}." in n}
            with torch.inference_mode(), quantized_layer(layer, probe.precision, probe.group_size, codes):
                quant = F.log_softmax(model(input_ids=calib.tokens, use_cache=False).logits.double(), -1)
            ref = F.log_softmax(logits.double(), -1)
            want.append(float((ref.exp() * (ref - quant)).sum(-1).mean()))
        want = np.array(want)  # [L]
        np.testing.assert_allclose([row[k] for row in record.loss], want, rtol=0,
                                   atol=kl_tolerance(want, logits, model).max())
    record.save(tmp_path / "gptq.json")
    assert LayerLoss.load(tmp_path / "gptq.json") == record
    with pytest.raises(ValueError, match="unknown quantizer 'awq'"):
        measure_layer_loss(model, tiny_info(model), calib, PROBES, quantizer="awq")


def test_a_kl_stride_scores_every_nth_position_only(measured):
    """``stride=s``: the KL of positions s-1, 2s-1, ... (brute force here: full forward passes with one layer
    quantized); stride 1 is the full measurement, and the stride is part of the record."""
    import torch.nn.functional as F

    from lsaq.importance.sensitivity import probe_samples, quantized_layer
    from lsaq.models.parts import decoder_parts

    model, calib, full = measured
    probe = Probe.parse("int4")
    np.testing.assert_array_equal(probe_samples(model, calib, [probe], batch_size=3, stride=1).scores[0].mean(0),
                                  [row[1] for row in full.loss])
    stride = 5  # 12 tokens: positions 4 and 9
    got = probe_samples(model, calib, [probe], batch_size=3, stride=stride).scores[0]  # [N, L]
    with torch.inference_mode():
        ref = F.log_softmax(model(input_ids=calib.tokens).logits[:, stride - 1::stride].double(), -1)
        for i, layer in enumerate(decoder_parts(model).layers):
            with quantized_layer(layer, probe.precision):
                logits = model(input_ids=calib.tokens).logits.double()
            kl = (ref.exp() * (ref - F.log_softmax(logits[:, stride - 1::stride], -1))).sum(-1)  # [N, 2]
            want = kl.mean(-1).numpy()  # [N], KLs of ~1e-5
            tol = kl_tolerance(want, logits, model).max()
            np.testing.assert_allclose(got[:, i], want, rtol=0, atol=tol)
            full_ref = F.log_softmax(model(input_ids=calib.tokens).logits.double(), -1)
            every = (full_ref.exp() * (full_ref - F.log_softmax(logits, -1))).sum(-1)  # [N, 12]
            assert np.abs(got[:, i] - every[:, ::stride].mean(-1).numpy()).max() > 1000 * tol  # other positions
    strided = measure_layer_loss(model, tiny_info(model), calib, PROBES, batch_size=3, stride=stride)
    assert strided.stride == stride and strided.id != full.id and full.stride == 1
    with pytest.raises(ValueError, match="stride must be a positive integer, got 0"):
        probe_samples(model, calib, [probe], stride=0)


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
    from conftest import tiny_llama_dir

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
