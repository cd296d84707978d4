"""A GGUF source converted tensor by tensor: the values transformers' whole-model GGUF loading produces, exactly,
within a bounded peak memory."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lsaq.models import gguf as gguf_module
from lsaq.models.gguf import convert_gguf, dequantized, exact_dtype

ROOT = Path(__file__).resolve().parents[1]


@given(st.lists(st.floats(-1e4, 1e4, allow_nan=False, width=32), min_size=1, max_size=64), st.integers(1, 9))
@settings(max_examples=60, deadline=None)
def test_exact_dtype_is_bfloat16_only_when_nothing_rounds(values, block):
    t = torch.tensor(values, dtype=torch.float32)
    lossless = torch.equal(t.to(torch.bfloat16).float(), t)
    assert exact_dtype(t, block=block) == (torch.bfloat16 if lossless else torch.float32)
    assert exact_dtype(t.to(torch.bfloat16).float(), block=block) == torch.bfloat16


def test_one_value_that_rounds_in_the_last_block_keeps_float32():
    t = torch.zeros(1000)
    t[-1] = 1.001  # not a bfloat16 value
    assert exact_dtype(t, block=64) == torch.float32
    assert exact_dtype(t[:-1], block=64) == torch.bfloat16


@pytest.mark.model
def test_blocks_of_rows_dequantize_as_the_whole_tensor(shared_gguf, monkeypatch):
    """Every tensor type of the shared GGUF (Q4_1, Q8_0, F32 ...), read in blocks of a few rows, equals gguf's
    dequantization of the memory-mapped tensor."""
    from gguf import GGUFReader, dequantize

    reader = GGUFReader(shared_gguf)
    monkeypatch.setattr(gguf_module, "DEQUANT_BLOCK_BYTES", 3 * 576 * 4 + 5)  # 3 rows of 576, a ragged last block
    seen = set()
    with open(shared_gguf, "rb") as f:
        for tensor in reader.tensors:
            if tensor.tensor_type in seen and not tensor.name.startswith("token_embd"):
                continue
            seen.add(tensor.tensor_type)
            got = dequantized(f, tensor)
            want = dequantize(tensor.data, tensor.tensor_type)
            assert got.dtype == np.float32 and got.shape == want.shape, tensor.name
            assert np.array_equal(got, want), tensor.name
    assert len(seen) >= 2


@pytest.mark.model
def test_conversion_equals_transformers_whole_model_loading(shared_gguf, tmp_path):
    """Every tensor, the config and the generation config of the converted checkpoint equal what transformers'
    from_pretrained(gguf_file=...) gives in float32 (what lsaq converted before, a whole model at a time)."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    out = tmp_path / "converted"
    out.mkdir()
    files = convert_gguf(shared_gguf, out, max_shard_bytes=40 * 2**20)  # several shards and an index
    assert len(files) > 2 and "model.safetensors.index.json" in files
    weight_map = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]

    whole = AutoModelForCausalLM.from_pretrained(shared_gguf.parent, gguf_file=shared_gguf.name, dtype=torch.float32)
    expected = whole.state_dict()
    tied = {"lm_head.weight"} if whole.config.tie_word_embeddings else set()
    assert set(weight_map) == set(expected) - tied
    dtypes = set()
    for name, shard in weight_map.items():
        with safe_open(out / shard, "pt") as f:
            got = f.get_tensor(name)
        dtypes.add(got.dtype)
        assert torch.equal(got.float(), expected[name]), name
    assert dtypes <= {torch.float32, torch.bfloat16} and torch.float32 in dtypes

    config = json.loads((out / "config.json").read_text())
    saved = json.loads(whole.config.to_json_string())
    for c in (config, saved):
        for k in ("transformers_version", "quantization_config", "dtype"):
            c.pop(k, None)
    assert config == {**saved, "architectures": ["LlamaForCausalLM"]}
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["eos_token_id"] == whole.generation_config.eos_token_id
    assert (out / "tokenizer.json").is_file()
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no spool left behind


# Converts in a process of its own and prints its peak RSS in KiB (VmHWM) as the last line.
CONVERT = ("import sys; from pathlib import Path; from lsaq.models.gguf import convert_gguf; "
           "convert_gguf(Path(sys.argv[1]), Path(sys.argv[2]), max_shard_bytes=2**27); "
           "print(next(l for l in open('/proc/self/status') if l.startswith('VmHWM:')).split()[1])")
# What importing the libraries costs, measured the same way.
IMPORTS = ("import torch, transformers, gguf, accelerate; from transformers import AutoModelForCausalLM; "
           "print(next(l for l in open('/proc/self/status') if l.startswith('VmHWM:')).split()[1])")


@pytest.mark.model
def test_conversion_peak_memory_is_a_few_tensors(shared_gguf, tmp_path):
    """The conversion holds the parsed metadata (vocabulary-sized, not depth-sized: 0.2 GiB allowed) and about
    three copies of the largest tensor (SmolLM2-135M's embedding, 49152 x 576 in float32: 113 MB), never the
    model (0.54 GB in float32; loading it whole to convert peaked at 1.15 GiB, this at 0.69 GiB)."""
    out = tmp_path / "converted"
    out.mkdir()
    baseline = subprocess.run([sys.executable, "-c", IMPORTS], capture_output=True, text=True, cwd=ROOT, check=True)
    proc = subprocess.run([sys.executable, "-c", CONVERT, str(shared_gguf), str(out)], capture_output=True,
                          text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    peak = int(proc.stdout.strip().splitlines()[-1]) * 1024
    imports = int(baseline.stdout.strip().splitlines()[-1]) * 1024
    largest = 49152 * 576 * 4
    assert peak - imports < 0.2 * 2**30 + 3 * largest, (peak / 2**30, imports / 2**30)
