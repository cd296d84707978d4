"""Perplexity: the GPTQ protocol against a naive per-window reference, on a tiny model and the real one."""

from __future__ import annotations

import copy
import math
import os

import pytest
import torch
from conftest import logit_noise, nll_noise
from transformers import AutoConfig, AutoModelForCausalLM

from lsaq.cli import main
from lsaq.eval.perplexity import perplexity, read_eval_text
from lsaq.paths import shared_dir

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

MODEL_REL = "models/smollm2-135m-instruct-q4_1/SmolLM2-135M-Instruct.Q4_1.gguf"
WIKI_TEST_REL = "data/wikitext-2-raw/wiki.test.raw"


def _shared(rel: str):
    root = shared_dir()
    if root is None or not (root / rel).is_file():
        pytest.skip(f"shared material {rel} not found (set LSAQ_SHARED or put ../shared beside the checkout)")
    return root / rel


class ByteTokenizer:
    """Token = byte value: enough of the tokenizer interface that perplexity() uses."""

    def __call__(self, text: str, **_: object) -> dict[str, list[int]]:
        return {"input_ids": list(text.encode("utf-8"))}


@pytest.fixture(scope="module")
def tiny() -> torch.nn.Module:
    cfg = AutoConfig.for_model(
        "llama", vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float64).eval()  # float64: see assert_same_perplexity


@pytest.fixture(scope="module")
def real():
    """The shared SmolLM2-135M, loaded once for this module."""
    from lsaq.models.loading import load_model

    return load_model(_shared(MODEL_REL))


def naive_ppl(model: torch.nn.Module, ids: list[int], seq_len: int, windows: int) -> tuple[float, int, float]:
    """One window at a time, explicit log-softmax and gather: the reference the batched code must equal.
    Returns ``(ppl, scored tokens, largest logit magnitude)``."""
    nll, count, scale = 0.0, 0, 0.0
    for w in range(windows):
        x = torch.tensor(ids[w * seq_len : (w + 1) * seq_len]).unsqueeze(0)
        with torch.no_grad():
            logits = model(input_ids=x).logits[0].double()  # [L, V]
        logp, scale = torch.log_softmax(logits, dim=-1), max(scale, float(logits.abs().max()))
        for t in range(seq_len - 1):
            nll -= logp[t, x[0, t + 1]].item()
            count += 1
    return math.exp(nll / count), count, scale


def assert_same_perplexity(res, ref: float, scale: float, model: torch.nn.Module) -> None:
    """Batched (lsaq) vs one window at a time (naive), both float64: apart by float64 rounding only."""
    cfg = model.config
    noise = logit_noise(torch.float64, scale, cfg.num_hidden_layers * cfg.intermediate_size)
    tol = nll_noise(noise, cfg.vocab_size, scale)
    assert abs(res.nll - math.log(ref)) <= tol, (res.nll, math.log(ref), tol)
    assert abs(res.ppl / ref - 1) <= math.expm1(tol), (res.ppl, ref, tol)


def test_tiny_model_matches_naive_reference(tiny, tmp_path):
    text = "".join(f"line {i}: the quick brown fox jumps over the lazy dog.\n" for i in range(40))
    src = tmp_path / "corpus.txt"
    src.write_text(text)
    res = perplexity(tiny, ByteTokenizer(), str(src), seq_len=48, max_windows=5, batch_size=2)
    ref, count, scale = naive_ppl(tiny, list(text.encode()), 48, 5)
    assert res.windows == 5 and res.tokens == count == 5 * 47 and res.seq_len == 48
    assert res.windows_available == len(text.encode()) // 48 and res.text_tokens == len(text.encode())
    assert_same_perplexity(res, ref, scale, tiny)


def test_seq_len_is_capped_at_model_maximum(tiny, tmp_path):
    src = tmp_path / "corpus.txt"
    src.write_text("abcdefgh" * 100)
    res = perplexity(tiny, ByteTokenizer(), str(src), seq_len=2048)
    assert res.seq_len == 64 and res.windows == 800 // 64


def test_raw_file_joins_rows_like_gptq(tmp_path):
    # HF wikitext rows: each line with its newline, whitespace-only lines as ""; GPTQ joins them with "\n\n".
    src = tmp_path / "wiki.test.raw"
    src.write_text(" \n = Title = \n \n Body text .\n")
    text, digest = read_eval_text(str(src))
    assert text == "\n\n = Title = \n\n\n\n\n Body text .\n"
    assert len(digest) == 64


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(seq_len=1), "seq_len must be at least 2"),
        (dict(seq_len=0), "seq_len must be at least 2"),
        (dict(max_windows=0), "max_windows must be at least 1"),
        (dict(batch_size=0), "batch_size must be at least 1"),
    ],
)
def test_bad_arguments(tiny, tmp_path, kwargs, match):
    src = tmp_path / "corpus.txt"
    src.write_text("abc " * 100)
    with pytest.raises(ValueError, match=match):
        perplexity(tiny, ByteTokenizer(), str(src), **kwargs)


def test_bad_sources(tiny, tmp_path):
    tok = ByteTokenizer()
    (tmp_path / "empty.txt").write_text("  \n\n ")
    with pytest.raises(ValueError, match="has no text"):
        perplexity(tiny, tok, str(tmp_path / "empty.txt"), seq_len=16)
    with pytest.raises(ValueError, match="does not exist"):
        perplexity(tiny, tok, str(tmp_path / "missing.raw"), seq_len=16)
    (tmp_path / "short.txt").write_text("tiny")
    with pytest.raises(ValueError, match="fewer than one window"):
        perplexity(tiny, tok, str(tmp_path / "short.txt"), seq_len=16)
    with pytest.raises(ValueError, match="could not be loaded as a Hugging Face dataset"):
        perplexity(tiny, tok, "no-such-org/no-such-dataset-lsaq:x:test", seq_len=16)


def test_default_source_is_the_local_test_split_else_the_hub(tmp_path, monkeypatch):
    from lsaq.eval.perplexity import HF_DEFAULT, default_ppl_source, local_ppl_source

    monkeypatch.setenv("LSAQ_SHARED", str(tmp_path))
    assert local_ppl_source() is None and default_ppl_source() == HF_DEFAULT == "wikitext:wikitext-2-raw-v1:test"
    wiki = tmp_path / WIKI_TEST_REL
    wiki.parent.mkdir(parents=True)
    wiki.write_text(" = T = \n")
    assert local_ppl_source() == default_ppl_source() == str(wiki)


def test_cli_bad_input_fails_cleanly(capsys):
    assert main(["eval", "--ppl", "--seq-len", "1"]) == 2
    assert "--seq-len must be at least 2" in capsys.readouterr().err
    assert main(["eval"]) == 2
    assert "nothing to do" in capsys.readouterr().err


@pytest.mark.model
def test_real_model_matches_naive_reference(real):
    wiki = _shared(WIKI_TEST_REL)
    model = copy.deepcopy(real.model).double()  # float64: see assert_same_perplexity
    res = perplexity(model, real.tokenizer, str(wiki), seq_len=128, max_windows=3, batch_size=2)
    text, _ = read_eval_text(str(wiki))
    assert text.startswith("\n\n = Robert Boulter = \n\n\n\n\n Robert Boulter is an English film")
    ids = real.tokenizer(text, verbose=False)["input_ids"]
    ref, count, scale = naive_ppl(model, ids, 128, 3)
    assert res.windows == 3 and res.tokens == count == 3 * 127 and res.text_tokens == len(ids)
    assert_same_perplexity(res, ref, scale, model)
    assert 5 < res.ppl < 200  # an English LM on Wikipedia text; a broken pipeline gives ~vocab size


@pytest.mark.model
def test_cli_writes_report(real, tmp_path, monkeypatch, capsys):
    import json

    import lsaq.eval.stage as stage

    wiki = _shared(WIKI_TEST_REL)
    monkeypatch.setattr(stage, "load_for_eval",
                        lambda source, device="cpu": stage.EvalModel.resident(source, real))
    out = tmp_path / "report.json"
    rc = main(["eval", "--ppl", "--ppl-source", str(wiki), "--seq-len", "64", "--max-windows", "2",
               "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "perplexity" in printed and "2/" in printed
    report = json.loads(out.read_text())
    assert report["schema"] == "lsaq.eval" and report["perplexity"]["windows"] == 2
    assert report["perplexity"]["tokens"] == 2 * 63 and report["tasks"] == {}


@pytest.mark.model
def test_all_int8_perplexity_is_within_two_percent_of_float(real):
    """All decoder layers INT8 on lsaq's packed runtime (fp32 activations): perplexity within 2% of float."""
    import copy

    from conftest import plan_with_precisions

    from lsaq.precision import Precision
    from lsaq.quantization.apply import quantize_model

    wiki = str(_shared(WIKI_TEST_REL))
    base = perplexity(real.model, real.tokenizer, wiki, seq_len=512, max_windows=4)
    plan = plan_with_precisions(real.info, [Precision.INT8] * real.info.num_layers)
    model = quantize_model(copy.deepcopy(real.model), real.info, plan).float()
    quant = perplexity(model, real.tokenizer, wiki, seq_len=512, max_windows=4)
    assert quant.tokens == base.tokens and quant.source_hash == base.source_hash
    assert quant.ppl != base.ppl  # the weights really changed
    assert abs(quant.ppl / base.ppl - 1) < 0.02, (base.ppl, quant.ppl)
