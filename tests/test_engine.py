"""The layer-streaming engine: a checkpoint read one module at a time, the skeleton, every layer's own call, the walk.

Streamed hidden states equal a whole-model forward for every registered family (mixed sliding and full attention
included); the walk's steps on a model in memory equal them too; a damaged shard or index is named; scoring streams a sharded
checkpoint in a fraction of the whole model's memory.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import WIDE_LLAMA, WIDE_PARAMS, lsaq_peak_rss, shard_checkpoint, tiny_family_model

from lsaq.engine.calls import record_calls
from lsaq.engine.checkpoint import Checkpoint
from lsaq.engine.skeleton import Resident, Skeleton
from lsaq.engine.walk import walk, walk_steps
from lsaq.models.families import SUPPORTED_MODEL_TYPES
from lsaq.models.parts import decoder_parts

MIXED = ("gemma2", "gemma3_text", "qwen3")  # configured with alternating sliding and full attention


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, tuple[Path, torch.nn.Module]]:
    """Per family: a tiny random checkpoint in float32 (sharded one layer per file) and the model it holds."""
    root = tmp_path_factory.mktemp("families")
    out = {}
    for model_type in SUPPORTED_MODEL_TYPES:
        model = tiny_family_model(model_type, layers=4, mixed=model_type in MIXED)
        shard_checkpoint(model, root / model_type, layers_per_shard=1)
        out[model_type] = (root / model_type, model)
    return out


def tokens(n: int = 5, length: int = 12) -> torch.Tensor:
    return torch.randint(3, 96, (n, length), generator=torch.Generator().manual_seed(1))


def reference(model: torch.nn.Module, ids: torch.Tensor) -> list[torch.Tensor]:
    """Every decoder layer's output ``[N, T, H]`` from one whole-model forward, taken by forward hooks."""
    outs: list[torch.Tensor] = []
    parts = decoder_parts(model)
    hooks = [layer.register_forward_hook(lambda _m, _a, out: outs.append(out[0] if isinstance(out, tuple) else out))
             for layer in parts.layers]
    try:
        with torch.inference_mode():
            model(input_ids=ids, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return outs


@pytest.mark.parametrize("model_type", SUPPORTED_MODEL_TYPES)
def test_the_stream_gives_the_whole_models_hidden_states(model_type, checkpoints):
    from transformers import AutoModelForCausalLM

    path, _ = checkpoints[model_type]
    ids = tokens()
    # float64 on both sides (buffers computed in float64 too): rounding far below any real difference
    wide = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64).eval()
    ref = reference(wide, ids)
    skeleton = Skeleton.build(Checkpoint.open(path), dtype=torch.float64)
    assert all(p.is_meta for layer in skeleton.parts.layers for p in layer.parameters())
    got: dict[int, torch.Tensor] = {}
    calls = record_calls(skeleton.parts, ids, batch_size=2)
    walk(skeleton, calls, lambda i, _l, _x, y: got.setdefault(i, torch.cat(y)))
    assert sorted(got) == list(range(4))
    for i, expected in enumerate(ref):
        torch.testing.assert_close(got[i], expected, rtol=1e-12, atol=1e-12 * float(expected.abs().max()))
    assert all(p.is_meta for layer in skeleton.parts.layers for p in layer.parameters())  # every layer released
    # the walk's steps on the model in memory, batches of 3: each layer's outputs are the whole model's
    resident = decoder_parts(wide)
    for i, _layer, _inputs, out in walk_steps(Resident(resident), record_calls(resident, ids, batch_size=3)):
        torch.testing.assert_close(torch.cat(out), ref[i], rtol=1e-12, atol=1e-12 * float(ref[i].abs().max()))


@pytest.mark.parametrize("model_type", MIXED)
def test_layers_of_mixed_attention_have_their_own_calls(model_type, checkpoints):
    """Replaying layer 0's call for every layer (sliding window 5 of 12 tokens) gives other hidden states."""
    _, model = checkpoints[model_type]
    ids = tokens()
    parts = decoder_parts(model)
    calls = record_calls(parts, ids, batch_size=5)
    first = calls.calls[0][0]
    with torch.inference_mode():
        replayed = first(parts.layers[1], first(parts.layers[0], calls.inputs[0]))
    ref = reference(model, ids)
    assert (replayed - ref[1]).abs().max() > 1e-3 * ref[1].abs().max()


def test_resident_and_streamed_walks_agree_and_tied_heads_are_tied(tmp_path):
    model = tiny_family_model("gemma", layers=2)  # gemma ties its head to the embedding
    shard_checkpoint(model, tmp_path / "m", layers_per_shard=2)
    skeleton = Skeleton.build(Checkpoint.open(tmp_path / "m"))
    assert skeleton.parts.lm_head.weight is skeleton.parts.embed.weight
    ids = tokens()
    streamed = walk(skeleton, record_calls(skeleton.parts, ids, 5), lambda *a: None)
    resident = walk(Resident(decoder_parts(model)), record_calls(decoder_parts(model), ids, 5), lambda *a: None)
    torch.testing.assert_close(streamed[0], resident[0], rtol=0, atol=0)


def test_a_released_layer_holds_no_memory_even_when_a_caller_still_holds_it(tmp_path):
    """A walk's loop variable keeps the last layer's module until the next load: release empties that module
    itself (otherwise two layers are resident at each load), also after quantization swapped its linears."""
    from lsaq.precision import Precision
    from lsaq.quantization.apply import quantize_layer

    shard_checkpoint(tiny_family_model("llama", layers=2), tmp_path / "m")
    skeleton = Skeleton.build(Checkpoint.open(tmp_path / "m"))
    for i in range(2):
        layer = skeleton.load(i)
        assert not any(t.is_meta for t in layer.state_dict().values())
        if i == 1:  # packed modules in place of its linears
            quantize_layer(layer, Precision.INT4, ["self_attn.q_proj", "mlp.down_proj"], None, torch.bfloat16)
        skeleton.release(i)
        assert all(t.is_meta for t in layer.state_dict().values())
        assert skeleton.parts.layers[i] is not layer
        assert all(t.is_meta for t in skeleton.parts.layers[i].state_dict().values())


def damaged(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_a_damaged_shard_or_index_is_named(checkpoints, tmp_path):
    src, _ = checkpoints["llama"]
    index = json.loads((src / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[1]

    cut = damaged(src, tmp_path / "cut")
    raw = (cut / shard).read_bytes()
    (cut / shard).write_bytes(raw[:-16])
    gone = damaged(src, tmp_path / "gone")
    (gone / shard).unlink()
    bad_json = damaged(src, tmp_path / "json")
    (bad_json / "model.safetensors.index.json").write_text("{")
    moved = damaged(src, tmp_path / "moved")  # a tensor the index says is in another shard
    other = dict(index, weight_map={**index["weight_map"], "model.norm.weight": shard})
    (moved / "model.safetensors.index.json").write_text(json.dumps(other))
    cases = [
        (cut, f"{cut / shard}: truncated: its header describes"),
        (gone, f"model.safetensors.index.json: shard {shard} (holding"),
        (bad_json, "model.safetensors.index.json: not a safetensors index"),
        (moved, "does not match model.safetensors.index.json: it lacks 'model.norm.weight'"),
    ]
    for path, message in cases:
        with pytest.raises(ValueError) as e:
            Checkpoint.open(path)
        assert message in str(e.value), (path, str(e.value))


def test_streamed_scores_equal_a_whole_model_forward(shared_gguf, wiki_valid, tmp_path):
    """Cosine and jaccard from ``score`` (the checkpoint streamed one layer at a time) against the same measures
    taken by hooks on one whole-model forward of the shared model (float32 both)."""
    from lsaq.calibration.sets import calibrate, load_calibration_dir
    from lsaq.importance.similarity import cosine, jaccard, topk_indices
    from lsaq.importance.stage import score
    from lsaq.methods import DEFAULT_K
    from lsaq.models.loading import load_model

    calibrate(str(shared_gguf), tmp_path / "calib", source=str(wiki_valid), samples=4, seq_len=64)
    ids = load_calibration_dir(tmp_path / "calib").tokens
    loaded = load_model(shared_gguf)
    parts = decoder_parts(loaded.model)
    with torch.inference_mode():
        first: list[torch.Tensor] = []
        hook = parts.layers[0].register_forward_pre_hook(lambda _m, args: first.append(args[0]))
        outs = reference(loaded.model, ids)
        hook.remove()
        hidden = [first[0], *outs]  # h_0 .. h_L, each [N, T, H]
        lens = [topk_indices(parts.lm_head(parts.final_norm(h)), DEFAULT_K) for h in hidden]
        layers = range(len(outs))
        want = {
            "cosine": np.array([(1 - cosine(hidden[i], hidden[i + 1]).double()).mean().item() for i in layers]),
            "jaccard": np.array([(1 - jaccard(lens[i], lens[i + 1]).double()).mean().item() for i in layers]),
        }
    for method, expected in want.items():
        got = np.array(score(str(shared_gguf), method=method, calibration=tmp_path / "calib").importance)
        np.testing.assert_allclose(got, expected, rtol=1e-6, atol=0, err_msg=method)


# Of the whole model's float32 bytes: streamed, 0.83 GiB of 2.42 (0.34) here; loading it whole needs more than
# the float32 bytes themselves (> 1.0). The margin is for thread pools and allocators on other machines.
STREAM_FRACTION = 0.6


@pytest.mark.slow
def test_scoring_a_sharded_checkpoint_holds_one_layer(tmp_path):
    """12 layers of width 2048 (651M parameters: 2.4 GiB in float32, 1.3 GB of bf16 shards, one layer each):
    ``lsaq score`` in its own process peaks well under the float32 model (the import of torch and transformers,
    the embedding and head in float32, one layer, the hidden states)."""
    from lsaq.engine.synthetic import write_random_checkpoint

    model = write_random_checkpoint(WIDE_LLAMA, tmp_path / "model")
    params = WIDE_PARAMS
    assert len(list(model.glob("*.safetensors"))) == 13
    text = tmp_path / "text.txt"  # the character tokenizer: 32 tokens are 32 characters
    text.write_text("The quick brown fox jumps over the lazy dog. " * 10)
    _, peak = lsaq_peak_rss(["score", "--model", str(model), "--method", "jaccard", "--calib", str(text),
                             "--samples", "2", "--seq-len", "32", "--out", str(tmp_path / "imp.json")])
    assert peak < STREAM_FRACTION * params * 4, \
        f"peak RSS {peak / 2**30:.2f} GiB, float32 model {params * 4 / 2**30:.2f} GiB"
    record = json.loads((tmp_path / "imp.json").read_text())
    assert len(record["importance"]) == 12 and all(np.isfinite(record["importance"]))


def test_a_checkpoint_missing_a_layer_tensor_is_refused_before_any_layer_runs(checkpoints, tmp_path):
    from safetensors.torch import load_file, save_file

    src, _ = checkpoints["llama"]
    path = damaged(src, tmp_path / "short")
    index = json.loads((path / "model.safetensors.index.json").read_text())
    name = "model.layers.2.mlp.down_proj.weight"
    shard = path / index["weight_map"].pop(name)
    tensors = load_file(str(shard))
    del tensors[name]
    save_file(tensors, str(shard), metadata={"format": "pt"})
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=f"the checkpoint has no tensor {name}$"):
        Skeleton.build(Checkpoint.open(path))


def test_a_large_head_and_embedding_stay_16_bit_and_cosine_reads_no_head(tmp_path, monkeypatch):
    """Above HEAD_LIMIT the head and the embedding stay in the checkpoint's bfloat16 (the head upcast a slice of the
    vocabulary at a time, the embedding's rows as gathered): the same scores as float32 copies."""
    import lsaq.engine.skeleton as skeleton_module
    import lsaq.models.parts as parts_module
    from lsaq.calibration.sets import CalibrationSet
    from lsaq.importance.scoring import score_samples

    model = tiny_family_model("llama", layers=3, tie_word_embeddings=False)
    shard_checkpoint(model, tmp_path / "m", dtype=torch.bfloat16)
    checkpoint = Checkpoint.open(tmp_path / "m")
    calib = CalibrationSet.from_tokens(tokens(4, 16))
    whole = Skeleton.build(checkpoint)
    assert whole.parts.lm_head.weight.dtype == torch.float32
    monkeypatch.setattr(skeleton_module, "HEAD_LIMIT", 0)
    monkeypatch.setattr(parts_module, "VOCAB_SLICE", 7)  # 96 rows: 14 slices, the last one short
    large = Skeleton.build(checkpoint)
    assert large.parts.lm_head.weight.dtype == torch.bfloat16 and large.parts.embed.weight.dtype == torch.bfloat16
    np.testing.assert_array_equal(score_samples(large, calib, "jaccard", 5), score_samples(whole, calib, "jaccard", 5))
    np.testing.assert_array_equal(score_samples(large, calib, "cosine"), score_samples(whole, calib, "cosine"))
    headless = Skeleton.build(checkpoint, head=False)
    assert headless.parts.lm_head.weight.is_meta
    np.testing.assert_array_equal(score_samples(headless, calib, "cosine"), score_samples(whole, calib, "cosine"))
