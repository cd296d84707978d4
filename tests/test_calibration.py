"""Calibration sets: the typed record, generated text (seeded sampler with a KV cache), the default source order,
and the calibrate stage's directory."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from lsaq.calibration import sets as cal
from lsaq.calibration import generated
from lsaq.calibration.sets import CalibrationInfo, CalibrationSet, load_calibration
from lsaq.models.identity import ModelInfo
from lsaq.models.loading import LoadedModel
from lsaq.records import RecordError

OLD_KEYS = ["hash", "source", "source_hash", "samples", "seq_len", "seed", "tokens"]  # info() before "kind"
TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=128, bos_token_id=1, eos_token_id=2,
            tie_word_embeddings=True)
WORDS = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(125)]  # token id = index; "w{i}" is id i + 3


def tiny_llama(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **TINY), dtype=torch.float32).eval()


def word_tokenizer():
    """A real (saveable) fast tokenizer over WORDS, whitespace-split, BOS <s> and EOS </s>."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def tiny_model_dir(path: Path, seed: int = 0) -> Path:
    """A tiny Llama with its tokenizer saved as a Hugging Face directory (safetensors) that load_model reads."""
    tiny_llama(seed).save_pretrained(path)
    word_tokenizer().save_pretrained(path)
    return path


def word_text(n: int, seed: int = 0) -> str:
    g = torch.Generator().manual_seed(seed)
    return " ".join(WORDS[3 + int(i)] for i in torch.randint(0, 125, (n,), generator=g))


class Ids:
    """The token-id attributes start_token() reads, without a vocabulary."""

    def __init__(self, bos=None, eos=None):
        self.bos_token_id, self.eos_token_id = bos, eos


@pytest.fixture(scope="module")
def model():
    # float64: sampling with a KV cache in batches, and without, draws the same tokens only if the two computations'
    # probabilities agree far inside a uniform draw's resolution; fp32 rounding that differs with the batch shape
    # (or the CPU's vector width) would flip a draw now and then, float64 rounding practically never
    return tiny_llama().double()


def loaded(model, content_hash="c" * 64) -> LoadedModel:
    info = ModelInfo(id="tiny", source="/tiny", revision=None, content_hash=content_hash, architecture="Llama",
                     model_type="llama", num_layers=3, config={})
    return LoadedModel(model=model, tokenizer=word_tokenizer(), info=info)


# ------------------------------------------------------------------------------------------ the record


def test_info_is_typed_and_keeps_the_old_dict_shape():
    calib = CalibrationSet.from_tokens(torch.arange(12).view(3, 4), seed=5)
    info = calib.info()
    assert isinstance(info, CalibrationInfo) and info.kind == "tokens" and (info.samples, info.seq_len) == (3, 4)
    j = info.to_json()
    assert list(j) == OLD_KEYS[:2] + ["kind"] + OLD_KEYS[2:] and j["tokens"] == 12 and j["seed"] == 5
    assert CalibrationInfo.from_json(json.loads(json.dumps(j))) == info
    assert all(part.kind == "tokens" and part.info().source_hash == info.source_hash for part in calib.split(3))


@pytest.mark.parametrize("source, kind", [("/data/wiki.valid.raw", "file"), ("corpus.txt", "file"),
                                          ("wikitext:wikitext-2-raw-v1:validation", "dataset"),
                                          ("allenai/c4:en", "dataset"), ("tokens", "tokens")])
def test_old_records_without_kind_read_back(source, kind):
    old = {"hash": "a" * 64, "source": source, "source_hash": "b" * 64, "samples": 2, "seq_len": 8, "seed": 0,
           "tokens": 16}
    info = CalibrationInfo.from_json(old)
    assert info.kind == kind and {k: v for k, v in info.to_json().items() if k != "kind"} == old


def test_unknown_kind_is_refused():
    with pytest.raises(ValueError, match="unknown calibration kind 'web'; valid: file, dataset, generated, tokens"):
        CalibrationInfo("h", "s", "web", "h", 1, 2, 0, 2)


def test_text_file_hash_is_unchanged_by_kinds(tmp_path):
    """Text sets hash exactly as before kinds existed, so importance ids derived from them stay the same."""
    src = tmp_path / "c.txt"
    src.write_text(word_text(400))
    calib = load_calibration(word_tokenizer(), str(src), samples=3, seq_len=16, seed=2)
    meta = cal.canonical_json({"source_hash": calib.source_hash, "shape": [3, 16], "seed": 2})
    assert calib.kind == "file" and calib.hash == cal.sha256_hex(meta + calib.tokens.numpy().tobytes())


# ------------------------------------------------------------------------------------------ generated text


def test_sampler_with_cache_equals_plain_recomputation(model):
    """Each row: its own generator, one multinomial draw per step from softmax of the full-sequence logits."""
    tokens = generated.sample_sequences(model, 1, samples=3, seq_len=20, seed=7, batch_size=2)
    assert tokens.shape == (3, 20) and tokens.dtype == torch.int64 and (tokens[:, 0] == 1).all()
    for row in range(3):
        gen = torch.Generator().manual_seed(generated.row_seed(7, row))
        ids = [1]
        with torch.no_grad():
            for _ in range(19):
                probs = torch.softmax(model(input_ids=torch.tensor([ids])).logits[0, -1].float(), dim=-1)
                ids.append(int(torch.multinomial(probs, 1, generator=gen)))
        assert tokens[row].tolist() == ids, row


def test_generated_set_is_deterministic_per_seed(model):
    tok = word_tokenizer()
    a = cal.generate_calibration(model, tok, "c" * 64, samples=4, seq_len=12, seed=3)
    b = cal.generate_calibration(model, tok, "c" * 64, samples=4, seq_len=12, seed=3, batch_size=3)
    assert torch.equal(a.tokens, b.tokens) and a.hash == b.hash and a.source_hash == b.source_hash
    assert a.kind == a.info().kind == "generated" and a.source == "generated"
    other = cal.generate_calibration(model, tok, "c" * 64, samples=4, seq_len=12, seed=4)
    assert not torch.equal(a.tokens, other.tokens) and other.hash != a.hash and other.source_hash != a.source_hash
    other_model = cal.generate_calibration(model, tok, "d" * 64, samples=4, seq_len=12, seed=3)
    assert torch.equal(other_model.tokens, a.tokens) and other_model.source_hash != a.source_hash
    # Row i does not depend on how many rows are drawn: a smaller set is a prefix of a larger one.
    fewer = cal.generate_calibration(model, tok, "c" * 64, samples=2, seq_len=12, seed=3, batch_size=1)
    assert torch.equal(fewer.tokens, a.tokens[:2]) and fewer.source_hash == a.source_hash
    expected = cal.sha256_hex(cal.canonical_json(
        {"model": "c" * 64, "seed": 3, "sampler": dict(generated.SAMPLER, start_token=1)}))
    assert a.source_hash == expected


def test_generated_text_is_kept_in_the_cache_and_a_damaged_copy_is_redrawn(model, tmp_path, monkeypatch):
    monkeypatch.setenv("LSAQ_CACHE", str(tmp_path))
    tok = word_tokenizer()
    first = cal.generate_calibration(model, tok, "c" * 64, samples=3, seq_len=9, seed=5)
    (kept,) = (tmp_path / "generated").glob("*.safetensors")

    def no_sampling(*args, **kwargs):
        raise AssertionError("sampled again although the set is cached")

    monkeypatch.setattr(cal, "sample_sequences", no_sampling)
    again = cal.generate_calibration(model, tok, "c" * 64, samples=3, seq_len=9, seed=5)
    assert torch.equal(again.tokens, first.tokens) and again.hash == first.hash
    with pytest.raises(AssertionError, match="sampled again"):  # another seed is another set
        cal.generate_calibration(model, tok, "c" * 64, samples=3, seq_len=9, seed=6)
    monkeypatch.undo()
    monkeypatch.setenv("LSAQ_CACHE", str(tmp_path))
    kept.write_bytes(kept.read_bytes()[:20])  # truncated: not used, drawn again and replaced
    redrawn = cal.generate_calibration(model, tok, "c" * 64, samples=3, seq_len=9, seed=5)
    assert torch.equal(redrawn.tokens, first.tokens) and kept.stat().st_size > 20


def test_start_token_is_bos_else_eos():
    assert generated.start_token(Ids(bos=5, eos=6)) == 5
    assert generated.start_token(Ids(eos=6)) == 6
    config_only = torch.nn.Module()
    config_only.config = Ids(bos=None, eos=[7, 8])
    assert generated.start_token(Ids(), config_only) == 7
    with pytest.raises(ValueError, match="neither the tokenizer nor the model config names a BOS or EOS"):
        generated.start_token(Ids())


def test_load_calibration_generates_with_the_model(model, caplog):
    with caplog.at_level(logging.INFO, logger="lsaq.calibration.sets"):
        calib = load_calibration(word_tokenizer(), "generated", samples=2, seq_len=10, seed=1, model=loaded(model))
    assert calib.kind == "generated" and calib.tokens.shape == (2, 10)
    assert [r.message for r in caplog.records] == ["calibration text: generated by the model (given)"]
    with pytest.raises(ValueError, match="generated calibration text needs the model"):
        load_calibration(word_tokenizer(), "generated", samples=2, seq_len=10)


@pytest.mark.model
def test_real_model_finds_its_own_samples_likely(shared_model):
    """The real model's NLL on its own samples is far below its NLL on the same tokens shuffled in each row: the
    sampler puts each draw where the model predicted it."""
    from lsaq.eval.perplexity import window_nll

    calib = cal.generate_calibration(shared_model.model, shared_model.tokenizer, "x", samples=2, seq_len=48, seed=0)
    assert (calib.tokens[:, 0] == shared_model.tokenizer.bos_token_id).all()
    shuffled = calib.tokens.clone()
    g = torch.Generator().manual_seed(0)
    for row in shuffled:
        row[1:] = row[1:][torch.randperm(47, generator=g)]
    own, mixed = window_nll(shared_model.model, calib.tokens).sum(), window_nll(shared_model.model, shuffled).sum()
    assert own < 0.7 * mixed, (own, mixed)


# ------------------------------------------------------------------------------------------ default source order


@pytest.fixture
def no_corpus(tmp_path, monkeypatch):
    """No LSAQ_CALIB, an empty shared folder and an unreachable hub (a host that cannot resolve)."""
    empty = tmp_path / "empty-shared"
    empty.mkdir()
    monkeypatch.setenv("LSAQ_SHARED", str(empty))
    monkeypatch.delenv("LSAQ_CALIB", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "https://hub.lsaq-test.invalid")
    return empty


def messages(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "lsaq.calibration.sets"]


def test_default_prefers_lsaq_calib(no_corpus, tmp_path, monkeypatch, caplog):
    src = tmp_path / "mine.txt"
    src.write_text(word_text(300))
    monkeypatch.setenv("LSAQ_CALIB", str(src))
    with caplog.at_level(logging.INFO, logger="lsaq.calibration.sets"):
        calib = load_calibration(word_tokenizer(), samples=2, seq_len=16)
    assert calib.source == str(src) and calib.kind == "file"
    assert messages(caplog) == [f"calibration text: {src} (LSAQ_CALIB is set)"]
    monkeypatch.setenv("LSAQ_CALIB", str(tmp_path / "missing.txt"))
    with pytest.raises(ValueError, match="LSAQ_CALIB=.*missing.txt' is not a file"):
        load_calibration(word_tokenizer(), samples=2, seq_len=16)


def test_default_takes_the_shared_wikitext(no_corpus, caplog):
    wiki = no_corpus / cal.WIKITEXT_VALID
    wiki.parent.mkdir(parents=True)
    wiki.write_text(word_text(300, seed=1))
    with caplog.at_level(logging.INFO, logger="lsaq.calibration.sets"):
        calib = load_calibration(word_tokenizer(), samples=2, seq_len=16)
    assert calib.source == str(wiki) and calib.kind == "file"
    assert messages(caplog) == [f"calibration text: {wiki} (the local WikiText-2 copy under {no_corpus})"]


def test_default_falls_back_to_generated_fast_when_offline(no_corpus, model, caplog):
    start = time.perf_counter()
    with caplog.at_level(logging.INFO, logger="lsaq.calibration.sets"):
        calib = load_calibration(word_tokenizer(), samples=2, seq_len=8, seed=4, model=loaded(model))
    assert time.perf_counter() - start < cal.HUB_PROBE_TIMEOUT_S + 5
    assert calib.kind == "generated"
    (line,) = messages(caplog)
    assert line.startswith("calibration text: generated by the model (no local corpus") and "unreachable" in line
    with pytest.raises(ValueError, match="generated calibration text needs the model"):
        load_calibration(word_tokenizer(), samples=2, seq_len=8)


def test_offline_variables_skip_the_probe_and_fail_fast(no_corpus):
    """HF_HUB_OFFLINE=1 from the start of a process (the libraries read it at import): no probe, and the hub
    dataset fails at once from the empty cache, so the default falls back to generated text."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("HF_ENDPOINT", "LSAQ_CALIB")}
    env |= {"HF_HUB_OFFLINE": "1", "LSAQ_SHARED": str(no_corpus), "HF_HOME": str(no_corpus / "hf")}
    code = ("import json, time; from lsaq.calibration import sets as c; t = time.perf_counter(); "
            "assert c.hub_unreachable() is None; s, why, read = c.default_source(); "
            "print(json.dumps([s, why, read, time.perf_counter() - t]))")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    source, why, read, seconds = json.loads(done.stdout.splitlines()[-1])
    assert source == "generated" and read is None and "no hub" in why and seconds < 10, (why, seconds)


# ------------------------------------------------------------------------------------------ the stage


def test_calibrate_writes_a_directory_that_reads_back(tmp_path, monkeypatch):
    monkeypatch.setenv("LSAQ_CACHE", str(tmp_path / "cache"))
    model_dir = tiny_model_dir(tmp_path / "tiny")
    out = tmp_path / "calib"
    info = cal.calibrate(str(model_dir), out, source="generated", samples=3, seq_len=16, seed=2)
    assert info.kind == "generated" and (info.samples, info.seq_len, info.tokens) == (3, 16, 48)
    assert sorted(p.name for p in out.iterdir()) == ["calibration.json", "tokens.safetensors"]
    record = json.loads((out / "calibration.json").read_text())
    assert record["schema"] == "lsaq.calibration" and record["version"] == 1
    assert record["calibration"] == info.to_json() and record["model"]["source"] == str(model_dir)
    memory = cal.calibration_memory(out)  # generated text: the whole model ran on the CPU in float32
    assert (memory.device, memory.dtype) == ("cpu", "float32") and memory.peak_host_bytes > 2**20
    assert record["memory"] == memory.to_json()
    back = cal.load_calibration_dir(out)
    assert back.info() == info and back.tokens.shape == (3, 16)
    from lsaq.models.loading import load_model

    again = load_model(model_dir)
    assert record["model"]["content_hash"] == again.info.content_hash
    same = cal.generate_calibration(again.model, again.tokenizer, again.info.content_hash, samples=3, seq_len=16,
                                    seed=2)
    assert torch.equal(same.tokens, back.tokens) and same.hash == info.hash

    text = tmp_path / "c.txt"
    text.write_text(word_text(500))
    info2 = cal.calibrate(str(model_dir), out, source=str(text), samples=4, seq_len=16)  # replaces the set
    assert info2.kind == "file" and cal.load_calibration_dir(out).info() == info2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.txt", "cache", "calib", "tiny"]  # no temporaries


def test_calibration_dir_refuses_tampering(tmp_path, monkeypatch):
    from safetensors.torch import save_file

    monkeypatch.setenv("LSAQ_CACHE", str(tmp_path / "cache"))
    model_dir = tiny_model_dir(tmp_path / "tiny")
    text = tmp_path / "c.txt"
    text.write_text(word_text(500))
    out = tmp_path / "calib"
    cal.calibrate(str(model_dir), out, source=str(text), samples=2, seq_len=16)
    tokens = cal.load_calibration_dir(out).tokens
    edited = tokens.clone()
    edited[0, 3] += 1
    save_file({"tokens": edited}, str(out / "tokens.safetensors"))
    with pytest.raises(RecordError, match="do not match the recorded hash"):
        cal.load_calibration_dir(out)
    save_file({"tokens": tokens[:1]}, str(out / "tokens.safetensors"))
    with pytest.raises(RecordError, match=r"the record says int64 \(2, 16\)"):
        cal.load_calibration_dir(out)
    (out / "tokens.safetensors").write_bytes(b"junk")
    with pytest.raises(ValueError, match="tokens.safetensors: truncated or not a safetensors file"):
        cal.load_calibration_dir(out)

    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="exists and is not a calibration directory"):
        cal.calibrate(str(model_dir), busy, source=str(text), samples=2, seq_len=16)
    assert [p.name for p in busy.iterdir()] == ["keep.txt"]
