"""Layer importance on tiny random models of every supported family, and on the real shared model."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from lsaq.cli import main
from lsaq.calibration.sets import CalibrationSet, load_calibration
from lsaq.importance.record import LayerImportance
from lsaq.importance.scoring import score_importance, score_samples
from lsaq.importance.similarity import spearman
from lsaq.models.families import SUPPORTED_MODEL_TYPES
from lsaq.models.loading import load_model
from lsaq.models.parts import decoder_parts

TINY = dict(
    vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
    num_key_value_heads=2, head_dim=8, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
)
FAMILIES = SUPPORTED_MODEL_TYPES  # the one registry: every family it claims is scored here


def tiny_model(model_type: str) -> torch.nn.Module:
    kwargs = dict(TINY)
    if model_type == "gpt_neox":
        kwargs.pop("head_dim"), kwargs.pop("num_key_value_heads")
    cfg = AutoConfig.for_model(model_type, **kwargs)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()


@pytest.mark.parametrize("model_type", FAMILIES)
def test_every_supported_family_scores(model_type):
    model = tiny_model(model_type)
    parts = decoder_parts(model)
    assert len(parts.layers) == 3
    calib = CalibrationSet.from_tokens(torch.randint(0, 96, (3, 16), generator=torch.Generator().manual_seed(1)))
    for method in ("jaccard", "cosine"):
        s = score_samples(model, calib, method, k=5, batch_size=2)
        assert s.shape == (3, 3)
        assert ((s >= 0) & (s <= 2)).all()
        if method == "jaccard":
            assert (s <= 1).all()


def test_unsupported_architecture_is_named():
    cfg = AutoConfig.for_model("gpt2", n_embd=32, n_layer=2, n_head=4, vocab_size=64)
    model = AutoModelForCausalLM.from_config(cfg)
    with pytest.raises(ValueError, match=r"unsupported architecture: model_type 'gpt2' \(GPT2LMHeadModel\).*supported model types"):
        decoder_parts(model)


def test_jaccard_of_identity_layers_is_zero():
    """A layer that returns its input unchanged changes no top-k set: importance exactly 0."""
    model = tiny_model("llama")
    parts = decoder_parts(model)
    for layer in parts.layers:
        for p in layer.parameters():
            p.data.zero_()  # zero projections: attention and MLP add 0 to the residual stream
    calib = CalibrationSet.from_tokens(torch.randint(0, 96, (2, 8)))
    assert score_samples(model, calib, "jaccard", k=4).max() == 0.0
    assert abs(score_samples(model, calib, "cosine").max()) < 1e-6


# ------------------------------------------------------------------------------------------ real model


@pytest.fixture(scope="module")
def real_calib(shared_model, wiki_valid):
    return load_calibration(shared_model.tokenizer, str(wiki_valid), samples=8, seq_len=128, seed=0)


@pytest.mark.parametrize("method", ["jaccard", "cosine"])
def test_real_model_scores_are_sane_and_deterministic(shared_model, real_calib, method):
    # jaccard's logit lens projects every layer onto the 49K vocabulary: a quarter of the windows keeps it quick
    calib = real_calib.split(4)[0] if method == "jaccard" else real_calib
    a = score_importance(shared_model.model, shared_model.info, calib, method, k=10)
    b = score_importance(shared_model.model, shared_model.info, calib, method, k=10)
    assert a.num_layers == 30 == shared_model.info.num_layers
    assert all(0.0 <= x <= 1.0 for x in a.importance)
    assert a.importance == b.importance and a.id == b.id  # identical inputs, identical scores
    assert sorted(a.ranking) == list(range(30))
    assert a.calibration.hash == calib.hash and a.model.content_hash == shared_model.info.content_hash


@pytest.mark.slow
def test_ranking_agrees_across_disjoint_calibration_halves(shared_model, wiki_valid):
    calib = load_calibration(shared_model.tokenizer, str(wiki_valid), samples=16, seq_len=128, seed=1)
    h1, h2 = calib.split(2)
    assert h1.hash != h2.hash
    # Disjoint text: no window appears in both halves.
    assert not {tuple(r) for r in h1.tokens.tolist()} & {tuple(r) for r in h2.tokens.tolist()}
    for method, floor in (("jaccard", 0.85), ("cosine", 0.85)):
        s1 = score_importance(shared_model.model, shared_model.info, h1, method).importance
        s2 = score_importance(shared_model.model, shared_model.info, h2, method).importance
        assert spearman(s1, s2) > floor, (method, spearman(s1, s2))


def test_record_round_trip(shared_model, real_calib, tmp_path):
    rec = score_importance(shared_model.model, shared_model.info, real_calib, "cosine")
    path = rec.save(tmp_path / "imp.json")
    obj = json.loads(path.read_text())
    assert obj["schema"] == "lsaq.layer_importance" and obj["version"] == 1
    assert obj["ranking"] == rec.ranking and obj["model"]["num_layers"] == 30
    assert LayerImportance.load(path) == rec


# ------------------------------------------------------------------------------------------ bad input


def run_cli(tmp_path, *args: str) -> tuple[int, bool]:
    out = tmp_path / "imp.json"
    rc = main(["score", "--out", str(out), *args])
    return rc, out.exists()


def test_cli_rejects_bad_input_and_writes_nothing(tmp_path, capsys, shared_gguf, wiki_valid):
    short = tmp_path / "short.txt"
    short.write_text("only a few words here")
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    unsupported = tmp_path / "bert"
    unsupported.mkdir()
    (unsupported / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    (unsupported / "model.safetensors").write_bytes(b"")
    cases = [
        (["--method", "euclid"], "unknown importance method 'euclid'; valid methods: jaccard, cosine"),
        (["--k", "0"], "k must be at least 1, got 0"),
        (["--samples", "0"], "samples must be at least 1, got 0"),
        (["--model", str(tmp_path / "nope")], "does not exist"),
        (["--model", str(unsupported)], "unsupported architecture: model_type 'bert'"),
        (["--model", str(shared_gguf), "--method", "jaccard", "--k", "50000", "--calib", str(wiki_valid),
          "--samples", "1", "--seq-len", "16"], "k must be in [1, 49152]"),
        (["--model", str(shared_gguf), "--calib", str(empty)], "empty.txt' is empty"),
        (["--model", str(shared_gguf), "--calib", str(short), "--samples", "2", "--seq-len", "64"], "too short"),
        (["--model", str(shared_gguf), "--calib", str(tmp_path / "missing.txt")], "does not exist"),
    ]
    for args, message in cases:
        rc, written = run_cli(tmp_path, *args)
        err = capsys.readouterr().err
        assert rc == 2 and message in err, (args, err)
        assert not written and not list(tmp_path.glob(".imp.json*")), args


def test_offline_hub_id_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="could not be resolved on the Hugging Face hub"):
        load_model("nobody-here/no-such-model-xyz")


def test_calibration_jsonl_joins_text_fields_and_names_bad_lines(tmp_path):
    from lsaq.calibration.sets import read_text

    good = tmp_path / "calib.jsonl"
    good.write_text('{"text": "first"}\n\n{"text": "second", "id": 2}\n')
    text, digest = read_text(str(good))
    assert text == "first\n\nsecond" and len(digest) == 64
    for body, message in [('{"text": "a"}\n{"txt": "b"}\n', r":2: each .jsonl line needs a string field 'text'"),
                          ('{"text": "a"}\n{oops\n', r":2: not valid JSON"),
                          ('["text"]\n', r":1: expected a JSON object, got list")]:
        good.write_text(body)
        with pytest.raises(ValueError, match=message):
            read_text(str(good))


def test_cli_scores_with_the_study_defaults(tmp_path, capsys, shared_gguf, wiki_valid):
    from lsaq.methods import DEFAULT_K, DEFAULT_METHOD

    base = ["--model", str(shared_gguf), "--calib", str(wiki_valid), "--samples", "2", "--seq-len", "64"]
    assert run_cli(tmp_path, *base) == (0, True)
    rec = LayerImportance.load(tmp_path / "imp.json")
    assert rec.method == DEFAULT_METHOD.value and rec.num_layers == 30
    assert f"method={DEFAULT_METHOD.value}" in capsys.readouterr().out
    assert run_cli(tmp_path, *base, "--method", "jaccard") == (0, True)
    assert LayerImportance.load(tmp_path / "imp.json").k == DEFAULT_K
