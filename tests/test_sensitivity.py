"""Measured layer sensitivity: the replay shortcut equals brute force, on tiny models of every family and the real one."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_importance import FAMILIES, tiny_model

from lsaq.importance.calibration import CalibrationSet
from lsaq.importance.record import LayerImportance
from lsaq.importance.scoring import score_importance
from lsaq.importance.sensitivity import quantized_layer, sensitivity_samples
from lsaq.models.families import model_shape
from lsaq.models.parts import decoder_parts
from lsaq.planning.devices import budget_profile
from lsaq.planning.planner import PlanOptions, make_plan
from lsaq.precision import Precision


def brute_force(model, tokens: torch.Tensor, precision: Precision) -> np.ndarray:
    """KL(float || layer-i-quantized) of full forward passes, mean over positions: ``[N, L]``."""
    layers = decoder_parts(model).layers
    with torch.inference_mode():
        ref = F.log_softmax(model(input_ids=tokens).logits.float(), -1)
        out = np.zeros((tokens.shape[0], len(layers)))
        for i, layer in enumerate(layers):
            with quantized_layer(layer, precision):
                lp = F.log_softmax(model(input_ids=tokens).logits.float(), -1)
            out[:, i] = (ref.exp() * (ref - lp)).sum(-1).mean(-1).double().numpy()
    return out


@pytest.mark.parametrize("model_type", FAMILIES)
def test_replay_equals_brute_force(model_type):
    model = tiny_model(model_type)
    tokens = torch.randint(3, 96, (3, 12), generator=torch.Generator().manual_seed(2))
    calib = CalibrationSet.from_tokens(tokens)
    fast = sensitivity_samples(model, calib, precision="int4", batch_size=2, chunk=7)  # ragged chunks
    slow = brute_force(model, tokens, Precision.INT4)
    assert fast.shape == (3, 3) and (fast > 0).all()
    # KL here is ~1e-4 nats; fp32 rounding of a differently batched forward shows at ~1e-7 absolute, while a
    # replay with wrong arguments (positions, masks) would be off by the size of the KL itself.
    np.testing.assert_allclose(fast, slow, rtol=1e-2, atol=1e-6)
    # INT8 moves the distribution far less than INT4 (fp32 noise can make a tiny KL slightly negative).
    int8 = sensitivity_samples(model, calib, precision="int8", batch_size=3)
    assert np.abs(int8).mean() < fast.mean() / 10


def test_quantized_layer_restores_the_float_weights_exactly():
    model = tiny_model("llama")
    layer = decoder_parts(model).layers[1]
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    with quantized_layer(layer, Precision.INT4):
        changed = [k for k, v in layer.state_dict().items() if not torch.equal(v, before[k])]
    assert changed and all(k.endswith("proj.weight") for k in changed)  # linears only, norms untouched
    assert all(torch.equal(v, before[k]) for k, v in layer.state_dict().items())


def test_float_probe_is_rejected():
    model = tiny_model("llama")
    calib = CalibrationSet.from_tokens(torch.randint(0, 96, (1, 8)))
    with pytest.raises(ValueError, match="valid: int8, int4"):
        sensitivity_samples(model, calib, precision="fp16")


def test_real_model_sensitivity_plans(shared_model, tmp_path):
    """30 finite non-negative scores, identical across runs, recorded with the probe, and usable by the planner."""
    tokens = torch.tensor(shared_model.tokenizer("The quick brown fox jumps over the lazy dog. " * 8)["input_ids"][:64])
    calib = CalibrationSet.from_tokens(tokens.view(1, 64))
    a = score_importance(shared_model.model, shared_model.info, calib, "sensitivity")
    b = score_importance(shared_model.model, shared_model.info, calib, "sensitivity")
    assert a.num_layers == 30 and a.importance == b.importance
    assert all(np.isfinite(x) and x >= 0 for x in a.importance) and max(a.importance) > 0
    assert a.k is None and a.params == {"probe": "int4", "group_size": None}
    loaded = LayerImportance.load(a.save(tmp_path / "sens.json"))
    assert loaded == a and loaded.id == a.id
    shape = model_shape(shared_model.info.config)
    plan = make_plan(shape, a.importance, budget_profile("200MiB"), PlanOptions(context=512))
    # The planner keeps the most sensitive layer at the highest precision any layer gets.
    top = a.ranking[0]
    assert list(Precision).index(plan.precisions[top]) == min(list(Precision).index(p) for p in plan.precisions)
