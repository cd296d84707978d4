"""Evaluation on the layer stream: fidelity and perplexity of a float checkpoint and its build walked one decoder
layer at a time equal the whole models' within float rounding (the shared model, every supported family); an
artifact read one layer at a time is the model `load_quantized` loads; `lsaq eval` of a checkpoint larger than its
peak holds one layer of each; what must load the whole model is refused before any work when it cannot fit."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import (WIDE_LLAMA, WIDE_PARAMS, kl_noise, logit_noise, lsaq_peak_rss, nll_noise, shard_checkpoint,
                      tiny_family_model, tiny_plan)

from lsaq.engine.checkpoint import Checkpoint
from lsaq.engine.logits import branch_logits
from lsaq.engine.skeleton import Resident, Skeleton
from lsaq.eval.fidelity import fidelity, stream_fidelity
from lsaq.eval.perplexity import perplexity, stream_window_nll, window_nll
from lsaq.models.families import SUPPORTED_MODEL_TYPES
from lsaq.models.parts import decoder_parts
from lsaq.precision import Precision
from lsaq.quantization.artifact import ArtifactError
from lsaq.quantization.reader import ArtifactLayers, load_quantized

FP16, INT8, INT4 = Precision.FP16, Precision.INT8, Precision.INT4
WIKI_TEST = "data/wikitext-2-raw/wiki.test.raw"


def windows_of(n: int, length: int, vocab: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------- the shared model


@pytest.fixture(scope="module")
def shared_pair(shared_gguf, mixed_artifact):
    """The shared model whole (float32) and its mixed FP16/INT8/INT4 build whole, and both as layer streams."""
    from lsaq.models.loading import load_model, locate_model

    base = load_model(shared_gguf)
    quant = load_quantized(mixed_artifact[0], dtype=torch.float32)
    skeleton = Skeleton.build(Checkpoint.open(locate_model(str(shared_gguf)).load_dir))
    layers = ArtifactLayers.open(mixed_artifact[0], dtype=torch.float32)
    return base, quant, skeleton, layers


def test_streamed_fidelity_equals_the_whole_models(shared_pair):
    from conftest import shared_path
    from lsaq.eval.perplexity import eval_windows

    base, quant, skeleton, layers = shared_pair
    windows, digest, _ = eval_windows(base.tokenizer, str(shared_path(WIKI_TEST)), 256)
    windows = windows[:3]
    whole = fidelity(base.model, quant.model, windows, source="wiki", source_hash=digest)
    # a pass of one window: three walks, so a chunk that crosses windows and passes is exercised
    streamed = stream_fidelity(skeleton, layers, windows, source="wiki", source_hash=digest, batch_size=1, chunk=100)
    with torch.no_grad():
        scale = float(base.model(input_ids=windows).logits.abs().max())
    cfg = base.model.config
    noise = logit_noise(torch.float32, scale, cfg.num_hidden_layers * cfg.intermediate_size)
    assert streamed.positions == whole.positions == 3 * 256
    assert abs(streamed.kl_mean - whole.kl_mean) <= kl_noise(whole.kl_mean, noise, cfg.vocab_size, scale)
    assert abs(streamed.kl_p99 - whole.kl_p99) <= kl_noise(whole.kl_p99, noise, cfg.vocab_size, scale)
    # an argmax flips only where two logits tie within the noise: none on 768 positions of real text
    assert abs(streamed.top1_agreement - whole.top1_agreement) <= 2 / whole.positions
    assert 0.05 < whole.kl_mean < 2.0  # the INT4 layers move the distributions: not a vacuous comparison
    # a candidate that gives one window's logits at a time (a GGUF build in llama.cpp): chunks of 100 positions
    # span two windows of 256, and the windows are asked for in order, each once
    asked = []

    def one_window(row: torch.Tensor) -> torch.Tensor:
        asked.append(row)
        with torch.no_grad():
            return quant.model(input_ids=row[None]).logits[0]

    by_window = stream_fidelity(skeleton, one_window, windows, source="wiki", source_hash=digest, batch_size=1,
                                chunk=100)
    assert [r.tolist() for r in asked] == windows.tolist()
    assert abs(by_window.kl_mean - whole.kl_mean) <= kl_noise(whole.kl_mean, noise, cfg.vocab_size, scale)
    assert abs(by_window.top1_agreement - whole.top1_agreement) <= 2 / whole.positions


@pytest.mark.parametrize("which", ["float", "quantized"])
def test_streamed_perplexity_equals_the_whole_model(shared_pair, which):
    from conftest import shared_path

    base, quant, skeleton, layers = shared_pair
    model, stream = (base.model, skeleton) if which == "float" else (quant.model, layers)
    source = str(shared_path(WIKI_TEST))
    whole = perplexity(model, base.tokenizer, source, seq_len=256, max_windows=3)
    streamed = perplexity(stream, base.tokenizer, source, seq_len=256, max_windows=3)
    cfg = base.model.config
    noise = logit_noise(torch.float32, 40.0, cfg.num_hidden_layers * cfg.intermediate_size)
    # plus the whole path's float32 sum of 255 NLLs per window (the stream sums in float64)
    tol = nll_noise(noise, cfg.vocab_size, 40.0) + 255 * torch.finfo(torch.float32).eps * whole.nll
    assert streamed.tokens == whole.tokens == 3 * 255
    assert abs(streamed.nll - whole.nll) <= tol, (streamed.nll, whole.nll, tol)


def test_an_artifact_read_layer_by_layer_is_the_loaded_model(shared_pair, mixed_artifact):
    _, quant, _, layers = shared_pair
    expected = dict(quant.model.state_dict())
    for i in (0, 1, 2):  # FP16, INT8, INT4
        got = layers.load(i).state_dict()
        prefix = f"{layers.layer_prefix}.{i}."
        mine = {k: v for k, v in expected.items() if k.startswith(prefix)}
        assert sorted(prefix + k for k in got) == sorted(mine)
        for k, v in got.items():
            assert torch.equal(v, mine[prefix + k]), k
        layers.release(i)
        assert all(p.is_meta for p in layers.parts.layers[i].parameters())


def test_an_artifact_with_a_stray_layer_tensor_is_refused_on_opening(mixed_artifact, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    from lsaq.quantization.record import MANIFEST
    from lsaq.records import file_sha256

    art = tmp_path / "art"
    shutil.copytree(mixed_artifact[0], art)
    tensors = load_file(str(art / "model.safetensors"))
    tensors["model.layers.0.self_attn.q_proj.weight_scale"] = torch.ones(3, dtype=torch.bfloat16)  # layer 0 is FP16
    save_file(tensors, str(art / "model.safetensors"), metadata={"format": "pt"})
    obj = json.loads((art / MANIFEST).read_text())
    obj["files"]["model.safetensors"] |= {"bytes": (art / "model.safetensors").stat().st_size,
                                          "sha256": file_sha256(art / "model.safetensors")}
    (art / MANIFEST).write_text(json.dumps(obj))
    with pytest.raises(ArtifactError, match=r"model\.layers\.0\.self_attn\.q_proj\.weight_scale is not part of"):
        ArtifactLayers.open(art)


# ------------------------------------------------------------------------------------- every family, tiny


@pytest.mark.parametrize("model_type", SUPPORTED_MODEL_TYPES)
def test_streamed_logits_equal_the_model_for_every_family(model_type, tmp_path):
    """Sliding and full attention layers (``mixed``) included: the walk replays each layer's own call."""
    mixed = model_type in {"gemma2", "gemma3_text", "qwen3"}
    model = tiny_family_model(model_type, layers=4, mixed=mixed)
    shard_checkpoint(model, tmp_path / "m")
    skeleton = Skeleton.build(Checkpoint.open(tmp_path / "m"))
    windows = windows_of(3, 12, model.config.vocab_size)
    with torch.no_grad():
        whole = model(input_ids=windows).logits.reshape(-1, model.config.vocab_size)  # [3*12, V]
    got = torch.empty_like(whole)
    for start, (logits,) in branch_logits([skeleton], windows, batch_size=2, chunk=5, budget=1):
        got[start:start + logits.shape[0]] = logits
    noise = logit_noise(torch.float32, float(whole.abs().max()), 4 * model.config.intermediate_size)
    torch.testing.assert_close(got, whole, rtol=0, atol=noise)
    nll = stream_window_nll(Resident(decoder_parts(model)), windows, batch_size=3)
    ref = window_nll(model, windows)
    vocab = model.config.vocab_size
    assert torch.allclose(nll, ref, rtol=0, atol=12 * nll_noise(noise, vocab, float(whole.abs().max()))
                          + 11 * torch.finfo(torch.float32).eps * float(ref.max()))


def test_branches_of_different_depths_cannot_walk_together(tmp_path):
    from lsaq.engine.calls import record_calls
    from lsaq.engine.walk import Branch, walk_branches

    a, b = tiny_family_model("llama", layers=2), tiny_family_model("llama", layers=3)
    ids = windows_of(1, 4, 96)
    branches = [Branch(Resident(decoder_parts(m)), record_calls(decoder_parts(m), ids, 1)) for m in (a, b)]
    with pytest.raises(ValueError, match=r"different depths cannot walk together: \[2, 3\] layers"):
        walk_branches(branches)


# -------------------------------------------------------------------------- whole-model paths that cannot fit


def test_tasks_that_cannot_fit_are_refused_before_any_work(monkeypatch, tmp_path):
    from lsaq.eval import stage
    from lsaq.eval.stage import EvalOptions, OptionError, evaluate

    from lsaq.engine.synthetic import char_tokenizer

    shard_checkpoint(tiny_family_model("llama", layers=2), tmp_path / "m")
    char_tokenizer().save_pretrained(tmp_path / "m")
    monkeypatch.setattr("lsaq.resources.available_memory", lambda: 1000)
    ran: list[str] = []
    monkeypatch.setattr(stage, "perplexity", lambda *a, **k: ran.append("ppl"))
    monkeypatch.setattr(stage, "evaluate_tasks", lambda *a, **k: ran.append("tasks"))
    with pytest.raises(OptionError, match=r"zero-shot tasks \(lm-eval\) need the whole model in memory: .* takes "
                                          r"about .*, 1000 B is available here; measure perplexity and fidelity"):
        evaluate(tmp_path / "m", options=EvalOptions(ppl=True, tasks="piqa"))
    assert ran == []


# ------------------------------------------------------------------------------- memory of `lsaq eval`

# Of the float32 model's bytes (2.42 GiB): streamed, 1.10 GiB here (0.45); evaluating the two models whole took
# 5.44 GiB (2.2) on the same command.
EVAL_FRACTION = 0.6


@pytest.mark.slow
def test_evaluating_a_sharded_checkpoint_holds_one_layer_of_each(tmp_path):
    """12 layers of width 2048 (651M parameters: 2.4 GiB in float32) and its all-INT8 build in 100 MB shards:
    ``lsaq eval`` (perplexity of both, fidelity) in its own process peaks well under the float32 model."""
    from lsaq.engine.synthetic import write_random_checkpoint
    from lsaq.models.loading import locate_model, model_info
    from lsaq.quantization.stage import quantize

    model = write_random_checkpoint(WIDE_LLAMA, tmp_path / "model")
    params = WIDE_PARAMS
    located = locate_model(str(model))
    info = model_info(located, Skeleton.build(Checkpoint.open(located.load_dir)).model)
    tiny_plan(info, [INT8] * 12).save(tmp_path / "plan.json")
    quantize(tmp_path / "plan.json", tmp_path / "art", model=str(model), max_shard_size="100MB")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(" ".join(f"word{i % 97}" for i in range(4000)))
    stdout, peak = lsaq_peak_rss(["eval", str(tmp_path / "art"), "--baseline-model", str(model), "--ppl",
                                  "--ppl-source", str(corpus), "--seq-len", "256", "--max-windows", "2",
                                  "--fidelity-windows", "2"])
    print(f"lsaq eval peak RSS {peak / 2**30:.2f} GiB, float32 model {params * 4 / 2**30:.2f} GiB")
    assert peak < EVAL_FRACTION * params * 4, \
        f"peak RSS {peak / 2**30:.2f} GiB, float32 model {params * 4 / 2**30:.2f} GiB"
    assert "KL" in stdout, stdout[-2000:]


def test_a_large_embedding_stays_16_bit_in_both_streams_with_the_same_logits(tmp_path, monkeypatch):
    """An untied model's float embedding and head above HEAD_LIMIT stay in bfloat16 in the float skeleton and in
    the build's stream (the embedding's rows upcast as gathered, the head a slice of the vocabulary at a time):
    the same logits as float32 copies; loaded whole, the build's head is float32 (its forward calls it)."""
    import lsaq.engine.skeleton as skeleton_module
    import lsaq.quantization.reader as reader_module
    from conftest import tiny_llama_dir
    from lsaq.models.loading import load_model
    from lsaq.quantization.stage import quantize

    src = tiny_llama_dir(tmp_path / "src", head_gain=8.0)
    quantize(tiny_plan(load_model(src).info, [INT8, INT4, FP16]), tmp_path / "art", model=str(src))
    windows = windows_of(2, 10, 128)

    def logits() -> tuple[list[torch.Tensor], torch.dtype, torch.dtype]:
        skeleton = Skeleton.build(Checkpoint.open(src))
        layers = ArtifactLayers.open(tmp_path / "art", dtype=torch.float32)
        got = [pair for _, pair in branch_logits([skeleton, layers], windows, batch_size=2, chunk=7)]
        return ([torch.cat(t) for t in zip(*got)], skeleton.parts.embed.weight.dtype, layers.parts.embed.weight.dtype,
                layers.parts.lm_head.weight.dtype)

    full, *full_dtypes = logits()
    monkeypatch.setattr(skeleton_module, "HEAD_LIMIT", 0)
    monkeypatch.setattr(reader_module, "HEAD_LIMIT", 0)
    small, *small_dtypes = logits()
    assert full_dtypes == [torch.float32] * 3 and small_dtypes == [torch.bfloat16] * 3
    for a, b in zip(full, small):
        assert torch.equal(a, b)
    whole = load_quantized(tmp_path / "art", dtype=torch.float32).model
    assert whole.lm_head.weight.dtype == torch.float32 and whole.get_input_embeddings().weight.dtype == torch.bfloat16
    with torch.no_grad():
        assert torch.equal(whole(input_ids=windows).logits.reshape(-1, 128), small[1])
