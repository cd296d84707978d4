"""GPTQ on whole models, streamed layer by layer (lsaq.quantization.sequential): the artifact format does not change,
the manifest names the quantizer and its calibration, and on the real model the quantized outputs are closer to the
float model's than round-to-nearest's at the same bytes."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import plan_with_precisions, tiny_llama_dir, tiny_plan
from safetensors import safe_open

from lsaq.calibration.sets import calibrate, load_calibration_dir, tokenize_windows
from lsaq.models.loading import load_model
from lsaq.planning.memory import WeightPolicy
from lsaq.precision import Precision
from lsaq.quantization.artifact import verify_artifact
from lsaq.quantization.reader import load_quantized
from lsaq.quantization.record import Artifact
from lsaq.quantization.stage import quantize

TEXT = ("the quick brown fox jumps over the lazy dog while a cat sleeps on the warm mat near the door. " * 40)


def tensors(path) -> dict[str, torch.Tensor]:
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-gptq")
    model = tiny_llama_dir(root / "model", head_gain=20.0)
    (root / "text.txt").write_text(TEXT)
    calibrate(str(model), root / "calib", source=str(root / "text.txt"), samples=6, seq_len=24)
    return model, root / "calib"


def test_gptq_keeps_the_artifact_format_and_records_its_calibration(tiny, tmp_path):
    model, calib = tiny
    plan = tiny_plan(load_model(model).info, [Precision.INT8, Precision.FP16, Precision.INT4],
                     WeightPolicy(group_size=32, embed="int8"))
    rtn = quantize(plan, tmp_path / "rtn", model=str(model))
    layers = []
    gptq = quantize(plan, tmp_path / "gptq", model=str(model), quantizer="gptq", calibration=calib,
                    progress=layers.append)
    assert layers == [0, 1, 2]
    assert (rtn.quantizer, rtn.calibration) == ("rtn", None)
    assert gptq.quantizer == "gptq" and gptq.calibration == load_calibration_dir(calib).hash
    assert gptq == Artifact.load(gptq.path)
    assert json.loads((gptq.path / "lsaq_artifact.json").read_text())["version"] == 4
    verify_artifact(gptq.path)
    assert gptq.tensor_bytes == rtn.tensor_bytes == plan.breakdown.weights
    a, b = tensors(rtn.path), tensors(gptq.path)
    assert {k: (v.dtype, v.shape) for k, v in a.items()} == {k: (v.dtype, v.shape) for k, v in b.items()}
    changed = {k for k in a if not torch.equal(a[k], b[k])}
    # only the quantized linears' codes (and group-wise INT4's scales/zeros) differ; FP16 layer, norms, embedding
    # (quantized outside the layer loop) are RTN's
    assert changed and all(k.startswith(("model.layers.0.", "model.layers.2.")) for k in changed), changed
    assert not any(k.startswith("model.layers.1.") or "embed" in k or "norm" in k for k in changed)
    load_quantized(gptq.path)  # lsaq's runtime reads it as any artifact


def test_the_quantizer_and_its_calibration_go_together(tiny, tmp_path):
    model, calib = tiny
    plan = tiny_plan(load_model(model).info, [Precision.INT4] * 3)
    with pytest.raises(ValueError, match="'gptq' needs a calibration directory"):
        quantize(plan, tmp_path / "a", model=str(model), quantizer="gptq")
    with pytest.raises(ValueError, match="'rtn' takes no calibration"):
        quantize(plan, tmp_path / "b", model=str(model), calibration=calib)
    with pytest.raises(ValueError, match="unknown quantizer 'awq'; valid quantizers: rtn, gptq"):
        quantize(plan, tmp_path / "c", model=str(model), quantizer="awq")
    other = tiny_llama_dir(tmp_path / "other", seed=1)
    with pytest.raises(ValueError, match="drawn for model"):
        quantize(tiny_plan(load_model(other).info, [Precision.INT4] * 3), tmp_path / "d", model=str(other),
                 quantizer="gptq", calibration=calib)
    assert not any((tmp_path / n).exists() for n in "abcd")


@pytest.mark.model
@pytest.mark.slow
def test_gptq_int4_is_closer_to_the_float_model_than_rtn_and_loads_in_stock_transformers(
        shared_gguf, wiki_valid, tmp_path):
    from transformers import AutoModelForCausalLM

    text = wiki_valid.read_text()
    (tmp_path / "first-half.txt").write_text(text[:len(text) // 2])
    calib = tmp_path / "calib"
    calibrate(str(shared_gguf), calib, source=str(tmp_path / "first-half.txt"), samples=8, seq_len=256, seed=0)
    float_model = load_model(shared_gguf)
    plan = plan_with_precisions(float_model.info, [Precision.INT4] * float_model.info.num_layers)
    held = tokenize_windows(float_model.tokenizer, text[-40_000:], 128)[:4]  # from the half calibration never saw
    with torch.inference_mode():
        ref = torch.log_softmax(float_model.model(held).logits.float(), -1)
    del float_model

    def kl(path) -> float:
        q = load_quantized(path, dtype=torch.float32)
        for m in q.model.modules():  # the exact path: dequantized weights, as stock transformers computes
            if hasattr(m, "path"):
                m.path = "dequant"
        with torch.inference_mode():
            got = torch.log_softmax(q.model(held).logits.float(), -1)
        return float((ref.exp() * (ref - got)).sum(-1).mean())

    rtn = quantize(plan, tmp_path / "rtn", model=str(shared_gguf))
    gptq = quantize(plan, tmp_path / "gptq", model=str(shared_gguf), quantizer="gptq", calibration=calib)
    kl_rtn, kl_gptq = kl(rtn.path), kl(gptq.path)
    print(f"all-INT4 per-channel, KL to float on 4 x 128 held-out tokens: RTN {kl_rtn:.4f}, GPTQ {kl_gptq:.4f} "
          f"({kl_gptq / kl_rtn:.2f}x)")
    assert kl_gptq < 0.8 * kl_rtn
    stock = AutoModelForCausalLM.from_pretrained(gptq.path, dtype=torch.float32).eval()
    with torch.inference_mode():
        want = stock(held[:1]).logits
    ours = load_quantized(gptq.path, dtype=torch.float32)
    for m in ours.model.modules():
        if hasattr(m, "path"):
            m.path = "dequant"
    with torch.inference_mode():
        got = ours.model(held[:1]).logits
    assert torch.allclose(got, want, atol=2e-3, rtol=1e-3), (got - want).abs().max()


def test_cli_quantizes_with_gptq(tiny, tmp_path, capsys):
    from lsaq.cli import main

    model, calib = tiny
    tiny_plan(load_model(model).info, [Precision.INT4] * 3).save(tmp_path / "plan.json")
    assert main(["quantize", "--plan", str(tmp_path / "plan.json"), "--model", str(model), "--out",
                 str(tmp_path / "art"), "--quantizer", "gptq", "--calibration", str(calib)]) == 0
    assert ", gptq;" in capsys.readouterr().out and Artifact.load(tmp_path / "art").quantizer == "gptq"


def test_a_gptq_artifact_is_kept_in_the_store_and_fetched_not_remade_elsewhere(tiny, tmp_path, monkeypatch):
    """GPTQ's floating-point sums depend on the BLAS and its threads, so another machine could round a code the
    other way: the quantize task keeps a calibrated artifact in the store, and a machine without it fetches those
    very files (checked against the record) instead of quantizing again. Round to nearest is re-made."""
    import lsaq
    from lsaq.store.keys import plan_key
    from lsaq.store.stage import open_store
    from tasks import stages
    from tasks.records import PlanResult

    model_dir, _ = tiny
    store = str(tmp_path / "store")
    ident = stages.identify.fn(str(model_dir))
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    calib = stages.calibrate.fn(ident, str(text), 4, 16, 0, store, str(tmp_path / "work1"))
    p = tiny_plan(load_model(model_dir).info, [Precision.INT4, Precision.INT8, Precision.INT4], WeightPolicy())
    key = plan_key(ident.slug, ident.revision_slug, p.id)
    open_store(store).put_bytes(key, json.dumps(p.to_json()).encode())
    plan = PlanResult(key="plan-test", uri=key, store_key=key, plan_id=p.id, device="test", counts=p.counts,
                      avg_bits=dict(p.avg_bits), weights_bytes=0, required_bytes=0, usable_bytes=0)
    made = {q: stages.quantize.fn(ident, plan, store, str(tmp_path / "work1"), q, calib if q == "gptq" else None)
            for q in ("rtn", "gptq")}
    kept = [k for k in open_store(store).list("") if "/artifacts/" in k]
    assert kept and all(made["gptq"].key in k for k in kept)  # only the calibrated artifact is kept
    assert {k.rsplit("/", 1)[1] for k in kept} == {"lsaq_artifact.json", *made["gptq"].files}

    remade = []
    real_quantize = lsaq.quantize
    monkeypatch.setattr(lsaq, "quantize", lambda *a, **kw: remade.append(kw["quantizer"]) or real_quantize(*a, **kw))
    for q, artifact in made.items():  # machine 2: an empty scratch directory
        path = stages.ensure_artifact(ident, artifact, store, str(tmp_path / "work2"), plan)
        assert Artifact.load(path).files == artifact.files
    assert remade == ["rtn"]


@pytest.mark.parametrize("model_type", ["llama", "qwen3"])
def test_linears_on_one_input_share_one_hessian(model_type):
    """q/k/v (and gate/up) are called on the same tensor: one Hessian tensor for them, equal bit for bit to the
    Hessian of each linear's own inputs summed on its own; o and down have their own."""
    from conftest import tiny_family_model

    from lsaq.models.parts import decoder_parts
    from lsaq.quantization.gptq import HessianAccumulator
    from lsaq.engine.calls import record_calls
    from lsaq.quantization.sequential import input_hessians

    model = tiny_family_model(model_type, layers=2)
    parts = decoder_parts(model)
    ids = torch.randint(3, 96, (5, 12), generator=torch.Generator().manual_seed(0))
    calls = record_calls(parts, ids, batch_size=2)
    layer = parts.layers[0]
    names = [n for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)]
    separate = {n: HessianAccumulator(layer.get_submodule(n).in_features) for n in names}
    hooks = [layer.get_submodule(n).register_forward_pre_hook(lambda _m, a, acc=separate[n]: acc.add(a[0]))
             for n in names]
    try:
        with torch.inference_mode():
            for call, h in zip(calls.calls[0], calls.inputs):
                call(layer, h)
    finally:
        for h in hooks:
            h.remove()
    shared = input_hessians(layer, names, calls.calls[0], calls.inputs)
    attn, mlp = "self_attn.", "mlp."
    assert shared[attn + "q_proj"] is shared[attn + "k_proj"] is shared[attn + "v_proj"]
    assert shared[mlp + "gate_proj"] is shared[mlp + "up_proj"]
    assert len({id(h) for h in shared.values()}) == 4  # qkv, o, gate/up, down
    for n in names:
        assert torch.equal(shared[n], separate[n].hessian()), n
