"""The artifact's 16-bit dtype follows the source: a bf16-native model whose activations pass float16's range
(65504) quantizes into a bf16 artifact that stock ``from_pretrained(dir)`` runs correctly by default.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import PROMPT, tiny_llama_dir, tiny_plan
from safetensors import safe_open

from lsaq.models.loading import load_model
from lsaq.precision import Precision
from lsaq.quantization.reader import load_quantized
from lsaq.quantization.stage import quantize

FP16, INT8, INT4 = Precision.FP16, Precision.INT8, Precision.INT4


def greedy(model, tokenizer, n: int = 8) -> list[int]:
    ids = tokenizer(PROMPT, return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**ids, max_new_tokens=n, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return out[0, ids["input_ids"].shape[1]:].tolist()


def tensor_dtypes(path: Path) -> set[str]:
    """safetensors dtype names of every stored tensor ("BF16", "I8", ...)."""
    with safe_open(path / "model.safetensors", framework="pt") as f:
        return {f.get_slice(k).get_dtype() for k in f.keys()}


# ------------------------------------------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def hot_source(tmp_path_factory) -> Path:
    return tiny_llama_dir(tmp_path_factory.mktemp("hot") / "src", hot=True, head_gain=100.0)


def test_the_hot_model_overflows_float16_only(hot_source):
    """The premise: float32 and bfloat16 agree, float16 overflows (NaN logits, greedy decoding emits <pad>)."""
    from transformers import AutoModelForCausalLM

    tok = load_model(hot_source).tokenizer
    runs = {dt: AutoModelForCausalLM.from_pretrained(hot_source, dtype=dt).eval()
            for dt in (torch.float32, torch.bfloat16, torch.float16)}
    ids = tok(PROMPT, return_tensors="pt")
    seen = []
    hook = runs[torch.float32].model.layers[0].register_forward_hook(
        lambda mod, args, out: seen.append(float((out[0] if isinstance(out, tuple) else out).abs().max())))
    with torch.inference_mode():
        assert torch.isfinite(runs[torch.float32](**ids).logits).all()
        assert not torch.isfinite(runs[torch.float16](**ids).logits).all()
    hook.remove()
    assert seen[0] > 65504  # the residual stream after layer 0, in float32
    tokens = {dt: greedy(m, tok) for dt, m in runs.items()}
    assert tokens[torch.bfloat16] == tokens[torch.float32]
    assert tokens[torch.float16] != tokens[torch.float32] and set(tokens[torch.float16]) == {tok.pad_token_id}


def test_bf16_source_quantizes_to_a_bf16_artifact_stock_transformers_runs(hot_source, tmp_path):
    """Mixed plan (FP16 / INT8 / INT4 layers): the artifact stores and declares bfloat16; its DEFAULT stock load
    greedy-decodes the float32 source's tokens, and so does lsaq's runtime. Declared float16, it would not."""
    from transformers import AutoModelForCausalLM

    source = load_model(hot_source)
    assert source.info.dtype == "bfloat16"
    want = greedy(source.model, source.tokenizer)
    plan = tiny_plan(source.info, [FP16, INT8, INT4])
    art = quantize(plan, tmp_path / "art", model=str(hot_source))
    config = json.loads((art.path / "config.json").read_text())
    assert art.dtype == config["dtype"] == config["torch_dtype"] == "bfloat16"
    assert tensor_dtypes(art.path) == {"BF16", "I32", "I64"}  # every float tensor and scale bf16, codes in words

    stock = AutoModelForCausalLM.from_pretrained(art.path).eval()
    assert stock.dtype == torch.bfloat16
    assert stock.model.layers[1].self_attn.q_proj.weight_scale.dtype == torch.bfloat16  # read exactly, not rounded
    assert greedy(stock, source.tokenizer) == want
    ours = load_quantized(art.path)  # bf16 activations, packed kernels
    assert greedy(ours.model, ours.tokenizer) == want

    # The same artifact declared float16 (what every artifact declared before): stock loads it in float16,
    # the residual stream overflows, and greedy decoding is all <pad>.
    fp16 = tmp_path / "declared-fp16"
    shutil.copytree(art.path, fp16)
    (fp16 / "config.json").write_text(json.dumps(config | {"dtype": "float16", "torch_dtype": "float16"}))
    broken = AutoModelForCausalLM.from_pretrained(fp16).eval()
    assert broken.dtype == torch.float16
    tokens = greedy(broken, source.tokenizer)
    assert tokens != want and set(tokens) == {source.tokenizer.pad_token_id}


def test_float16_source_keeps_float16(tmp_path):
    src = tiny_llama_dir(tmp_path / "src", dtype=torch.float16)
    loaded = load_model(src)
    assert loaded.info.dtype == "float16"
    art = quantize(tiny_plan(loaded.info, [INT8, FP16, INT4]), tmp_path / "art", model=str(src))
    config = json.loads((art.path / "config.json").read_text())
    assert art.dtype == config["dtype"] == "float16"
    assert tensor_dtypes(art.path) == {"F16", "I32", "I64"}
    ours = load_quantized(art.path, dtype=torch.float32)
    scale = ours.model.model.layers[0].self_attn.q_proj.scale
    assert scale.dtype == torch.float16
