"""Measured layer sensitivity: the replay shortcut equals brute force, on tiny models of every family and the real one."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import kl_noise, logit_noise
from test_importance import FAMILIES, TINY, tiny_model

from lsaq.calibration.sets import CalibrationSet
from lsaq.importance.record import LayerImportance
from lsaq.importance.scoring import score_importance
from lsaq.importance.sensitivity import quantized_layer, sensitivity_samples
from lsaq.models.families import model_shape
from lsaq.models.parts import decoder_parts, layer_output
from lsaq.planning.devices import budget_profile
from lsaq.planning.planner import PlanOptions, make_plan
from lsaq.precision import Precision


def brute_force(model, tokens: torch.Tensor, precision: Precision) -> tuple[np.ndarray, float]:
    """KL(float || layer-i-quantized) of full forward passes in float64, mean over positions ``[N, L]``, and the
    largest logit magnitude seen."""
    layers = decoder_parts(model).layers
    with torch.inference_mode():
        logits = model(input_ids=tokens).logits.double()
        ref, scale = F.log_softmax(logits, -1), float(logits.abs().max())
        out = np.zeros((tokens.shape[0], len(layers)))
        for i, layer in enumerate(layers):
            with quantized_layer(layer, precision):
                logits = model(input_ids=tokens).logits.double()
            scale = max(scale, float(logits.abs().max()))
            out[:, i] = (ref.exp() * (ref - F.log_softmax(logits, -1))).sum(-1).mean(-1).numpy()
    return out, scale


@pytest.mark.parametrize("model_type", FAMILIES)
def test_replay_equals_brute_force(model_type):
    model = tiny_model(model_type).double()  # float64: the replay's logic is compared, not fp32 rounding
    tokens = torch.randint(3, 96, (3, 12), generator=torch.Generator().manual_seed(2))
    calib = CalibrationSet.from_tokens(tokens)
    fast = sensitivity_samples(model, calib, precision="int4", batch_size=2, chunk=7)  # ragged chunks
    slow, scale = brute_force(model, tokens, Precision.INT4)
    assert fast.shape == (3, 3) and (fast > 0).all()
    # Batches of 2 and a replay vs one whole pass: float64 rounding apart, while a replay with wrong arguments
    # (positions, masks) would be off by the size of the KL itself (~1e-4 nats).
    cfg = model.config
    width = max(cfg.hidden_size, getattr(cfg, "intermediate_size", 0) or 4 * cfg.hidden_size)
    noise = logit_noise(torch.float64, scale, cfg.num_hidden_layers * width)
    tol = kl_noise(slow, noise, cfg.vocab_size, scale)
    err = np.abs(fast - slow)
    assert (err <= tol).all(), f"replay - brute force: {err.max():.3g} > {tol.max():.3g}"
    assert tol.max() < 1e-6 * slow.min()
    # INT8 moves the distribution far less than INT4.
    int8 = sensitivity_samples(model, calib, precision="int8", batch_size=3)
    assert (int8 >= 0).all() and int8.mean() < fast.mean() / 10


@pytest.mark.parametrize("model_type, scaling", [("granite", dict(logits_scaling=8.0)),
                                                 ("gemma2", dict(final_logit_softcapping=0.3)),
                                                 ("llama", {})])
def test_the_parts_give_the_models_own_logits(model_type, scaling):
    """The probe's logits of the last hidden states are ``model(...).logits``, the family's scaling included
    (granite divides by ``logits_scaling``, gemma2/3 soft-cap): the KL is of the distributions the model gives."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(model_type, **{**TINY, **scaling})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float64).eval()
    tokens = torch.randint(3, 96, (2, 10), generator=torch.Generator().manual_seed(4))
    parts, last = decoder_parts(model), []
    hook = parts.layers[-1].register_forward_hook(lambda _m, _a, out: last.append(layer_output(out)))
    with torch.inference_mode():
        want = model(input_ids=tokens).logits
        got = parts.logits(last[0])  # last decoder layer's output [B, T, H] -> [B, T, V]
        plain = parts.lm_head(parts.final_norm(last[0]))
    hook.remove()
    torch.testing.assert_close(got, want, rtol=0, atol=16 * torch.finfo(torch.float64).eps * float(want.abs().max()))
    assert torch.equal(plain, want) == (not scaling)


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
