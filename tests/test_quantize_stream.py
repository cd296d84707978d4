"""Quantization on the layer stream: the quantize stage reads one decoder layer at a time from the checkpoint and
writes, byte for byte, the artifact the whole-model path writes (every file, manifest included), from one
``model.safetensors`` or from shards, rounding to nearest or with GPTQ (whose calibration activations walk through
the quantized layers, each with its own call arguments)."""

from __future__ import annotations

import filecmp
from pathlib import Path

import pytest
import torch
from conftest import plan_with_precisions, shard_checkpoint, tiny_llama_dir, tiny_plan

from lsaq.models.loading import load_model
from lsaq.planning.memory import WeightPolicy
from lsaq.precision import Precision
from lsaq.quantization.artifact import write_artifact
from lsaq.quantization.stage import quantize

FP16, INT8, INT4 = Precision.FP16, Precision.INT8, Precision.INT4
POLICIES = {
    "per-channel": WeightPolicy(),
    "g32, int8 head": WeightPolicy(group_size=32, head=INT8),
    "int8 embedding, int4 head": WeightPolicy(embed=INT8, head=INT4),
}


def same_files(a: Path, b: Path) -> None:
    names = sorted(p.name for p in a.iterdir())
    assert sorted(p.name for p in b.iterdir()) == names
    assert [n for n in names if not filecmp.cmp(a / n, b / n, shallow=False)] == []


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("policy", list(POLICIES))
def test_streamed_rtn_writes_the_whole_models_bytes(policy, tied, tmp_path):
    src = tiny_llama_dir(tmp_path / "src", tied=tied)
    plan = tiny_plan(load_model(src).info, [INT4, INT8, FP16], POLICIES[policy])
    write_artifact(load_model(src), plan, tmp_path / "whole")
    quantize(plan, tmp_path / "streamed", model=str(src))
    same_files(tmp_path / "whole", tmp_path / "streamed")


def test_streamed_rtn_on_the_shared_model(shared_gguf, tmp_path):
    info = load_model(shared_gguf).info
    plan = plan_with_precisions(info, [(FP16, INT8, INT4)[i % 3] for i in range(info.num_layers)], group_size=64)
    write_artifact(load_model(shared_gguf), plan, tmp_path / "whole")
    quantize(plan, tmp_path / "streamed", model=str(shared_gguf))
    same_files(tmp_path / "whole", tmp_path / "streamed")


def test_a_sharded_source_gives_the_same_tensors(tmp_path):
    src = tiny_llama_dir(tmp_path / "src")
    sharded = shard_checkpoint(load_model(src).model.to(torch.bfloat16), tmp_path / "sharded", layers_per_shard=1)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (sharded / name).write_bytes((src / name).read_bytes())
    assert len(list(sharded.glob("model-*.safetensors"))) == 4
    for path in (src, sharded):
        plan = tiny_plan(load_model(path).info, [INT8, INT4, FP16])
        quantize(plan, tmp_path / f"art-{path.name}", model=str(path))
    assert filecmp.cmp(tmp_path / "art-src" / "model.safetensors", tmp_path / "art-sharded" / "model.safetensors",
                       shallow=False)


@pytest.mark.parametrize("model_type", ["llama", "qwen3"], ids=["llama", "qwen3 with sliding layers"])
def test_streamed_gptq_writes_the_whole_models_bytes(model_type, tmp_path):
    from conftest import tiny_family_model, tiny_tokenizer

    from lsaq.calibration.sets import CalibrationSet, calibrate, load_calibration_dir

    src = tmp_path / "src"
    model = tiny_family_model(model_type, layers=4, mixed=model_type == "qwen3", vocab_size=128)
    model.to(torch.bfloat16).save_pretrained(src)
    tiny_tokenizer().save_pretrained(src)
    (tmp_path / "text.txt").write_text("the quick brown fox jumps over the lazy dog; " * 40)
    calibrate(str(src), tmp_path / "calib", source=str(tmp_path / "text.txt"), samples=4, seq_len=16)
    calib: CalibrationSet = load_calibration_dir(tmp_path / "calib")
    plan = tiny_plan(load_model(src).info, [INT4, FP16, INT8, INT4], WeightPolicy(group_size=16))
    write_artifact(load_model(src), plan, tmp_path / "whole", quantizer="gptq", calibration=calib)
    quantize(plan, tmp_path / "streamed", model=str(src), quantizer="gptq", calibration=tmp_path / "calib")
    same_files(tmp_path / "whole", tmp_path / "streamed")
