"""The evaluate stage on a tiny Llama and its artifact: options, checks before loading, the report with fidelity
(on a corpus and on generated text), the plain-model record."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from conftest import plan_with_precisions
from test_calibration import tiny_model_dir, word_text

from lsaq.eval import stage
from lsaq.eval.report import EvalReport, ModelEval, render_markdown
from lsaq.eval.stage import EvalOptions, OptionError, evaluate
from lsaq.precision import Precision


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """``(model dir, artifact dir, corpus file, empty shared folder)``; lsaq's cache in a temporary folder."""
    from lsaq.models.loading import load_model
    from lsaq.quantization.artifact import write_artifact

    root = tmp_path_factory.mktemp("stage")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LSAQ_CACHE", str(root / "cache"))
        model_dir = tiny_model_dir(root / "tiny")
        loaded = load_model(model_dir)
        plan = plan_with_precisions(loaded.info, [Precision.FP16, Precision.INT8, Precision.INT4])
        write_artifact(loaded, plan, root / "art")  # quantizes `loaded` in place; it is not used again
        corpus = root / "corpus.txt"
        corpus.write_text(word_text(2000))
        (root / "empty").mkdir()
        yield model_dir, root / "art", corpus, root / "empty"


@pytest.fixture
def isolated(env, monkeypatch):
    """This module's cache, and a shared folder without WikiText (so no local default corpus)."""
    monkeypatch.setenv("LSAQ_CACHE", str(env[0].parent / "cache"))
    monkeypatch.setenv("LSAQ_SHARED", str(env[3]))
    return env


@pytest.fixture
def loads(monkeypatch):
    """Record every model :func:`evaluate` loads (artifact or not), still loading it."""
    seen: list[stage.ModelSource] = []
    real = stage.load_for_eval
    monkeypatch.setattr(stage, "load_for_eval",
                        lambda source, device="cpu": seen.append(source) or real(source, device))
    return seen


# ------------------------------------------------------------------------------------------ options


def cli_name(option: str) -> str:
    return "--" + option.replace("_", "-")


@pytest.mark.parametrize("kwargs, message", [
    (dict(dtype="float16"), "unknown dtype 'float16'; valid: float32, bfloat16"),
    (dict(task_data="web"), "unknown task_data 'web'; valid: auto, local, hub"),
    (dict(seq_len=1), "seq_len must be at least 2, got 1"),
    (dict(max_windows=0), "max_windows must be at least 1, got 0"),
    (dict(ppl_batch_size=0), "ppl_batch_size must be at least 1, got 0"),
    (dict(limit=-3), "limit must be at least 1, got -3"),
    (dict(task_batch_size=0), "task_batch_size must be at least 1, got 0"),
    (dict(fidelity_windows=0), "fidelity_windows must be at least 1, got 0"),
    (dict(fidelity_seq_len=1), "fidelity_seq_len must be at least 2, got 1"),
    (dict(fidelity_seed=-1), "fidelity_seed must be at least 0, got -1"),
    (dict(seq_len=True), "seq_len must be at least 2, got True"),
    (dict(dtype="{x}"), "unknown dtype '{x}'; valid: float32, bfloat16"),
])
def test_bad_options_name_the_value_and_the_valid_ones(kwargs, message):
    with pytest.raises(OptionError) as e:
        EvalOptions(**kwargs)
    assert str(e.value) == message
    (option,) = kwargs
    assert e.value.render(cli_name) == message.replace(option, cli_name(option), 1)


def test_tasks_are_resolved():
    assert EvalOptions(tasks="piqa, arc_easy,piqa").tasks == ("piqa", "arc_easy")
    assert EvalOptions(tasks=["boolq"]).tasks == ("boolq",) and EvalOptions().tasks == ()
    with pytest.raises(ValueError, match="unknown task\\(s\\) 'chess'; valid tasks: piqa"):
        EvalOptions(tasks="chess")


def test_checks_fail_before_anything_is_loaded(env, tmp_path, monkeypatch):
    model_dir, art, corpus, _ = env
    monkeypatch.setattr(stage, "load_for_eval", lambda source, device="cpu": pytest.fail(f"loaded {source}"))
    cases = [
        ("x.gguf", None, dict(ppl=True, plots=str(tmp_path)), None, "plots applies to an artifact directory"),
        ("x.gguf", None, dict(ppl=True, with_baseline=False), None, "with_baseline applies to an artifact"),
        ("x.gguf", None, dict(ppl=True), "y", "baseline applies to an artifact directory (from `lsaq quantize`), "
                                                "not to x.gguf"),
        (None, None, dict(), None, "nothing to do: pass ppl and/or tasks NAME[,NAME...]"),
        (art, None, dict(with_baseline=False), None, "nothing to do without the baseline (no fidelity): pass ppl "
                                                     "and/or tasks NAME[,NAME...] (or plots DIR)"),
        (art, tmp_path / "r.json", dict(with_baseline=False, plots=str(tmp_path / "p")), None,
         "out needs something measured: ppl and/or tasks, or the fidelity, which needs the baseline"),
        (art, None, dict(ppl=True, with_baseline=False), "y", "baseline and with_baseline contradict each other"),
        ("x.gguf", None, dict(tasks="piqa", ppl_source=str(corpus)), None, "ppl_source needs ppl"),
        (art, tmp_path / "r.md", dict(ppl=True), None, "give the JSON path"),
        (art, None, dict(ppl=True), str(tmp_path / "gone"), "does not exist here; pass baseline PATH, or "
                                                            "with_baseline"),
    ]
    for target, out, kwargs, baseline, message in cases:
        with pytest.raises(ValueError) as e:
            evaluate(target, out, options=EvalOptions(**kwargs), baseline=baseline)
        assert message in str(e.value), (kwargs, str(e.value))
    assert sorted(p.name for p in tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------ artifacts


def direct_fidelity(model_dir: Path, art: Path, windows: torch.Tensor):
    """The fidelity computed by hand from freshly loaded models, for comparison with the stage's."""
    from lsaq.eval.fidelity import fidelity
    from lsaq.models.loading import load_model
    from lsaq.quantization.reader import load_quantized

    base, quant = load_model(model_dir), load_quantized(art, dtype=torch.float32)
    return fidelity(base.model, quant.model, windows, source="-", source_hash="-")


def test_artifact_report_with_perplexity_and_fidelity(isolated, tmp_path, loads):
    from lsaq.eval.perplexity import eval_windows

    model_dir, art, corpus, _ = isolated
    options = EvalOptions(ppl=True, ppl_source=str(corpus), seq_len=32, max_windows=2, fidelity_windows=3)
    report = evaluate(art, tmp_path / "r.json", options=options)
    assert isinstance(report, EvalReport) and [s.artifact for s in loads] == [True, False]
    b, q = report.baseline["perplexity"], report.quantized["perplexity"]
    assert b["windows"] == q["windows"] == 2 and b["source_hash"] == q["source_hash"] and b["ppl"] != q["ppl"]
    (row,) = report.comparison
    assert (row["baseline"], row["quantized"]) == (b["ppl"], q["ppl"])
    f = report.fidelity
    assert (f.source, f.source_hash, f.windows, f.seq_len, f.positions) == (str(corpus), b["source_hash"], 3, 32, 96)
    assert 0 < f.kl_mean <= f.kl_p99 and 0 < f.top1_agreement <= 1
    windows = eval_windows(report_tokenizer(model_dir), str(corpus), 32)[0][:3]
    ref = direct_fidelity(model_dir, art, windows)
    assert (f.kl_mean, f.kl_p99, f.top1_agreement) == pytest.approx((ref.kl_mean, ref.kl_p99, ref.top1_agreement),
                                                                     rel=1e-9)
    assert report.settings["fidelity_windows"] == 3 and report.settings["fidelity_seed"] is None
    assert EvalReport.load(tmp_path / "r.json") == report
    md = (tmp_path / "r.md").read_text()
    assert md == render_markdown(report)
    assert "Fidelity to the float model (corpus.txt, 3 x 32 tokens, 96 positions;" in md


def test_the_walk_keeps_within_max_memory(isolated, monkeypatch):
    """A limit just above what one window and the smallest chunk need: the walk projects fewer positions at once
    in more passes, and the figures stay those of an unlimited run; a smaller limit is refused before any model
    is read."""
    from lsaq.eval.budget import MIN_CHUNK, WalkBudget, eval_need, logit_bytes

    _, art, corpus, _ = isolated
    # 128-token windows: every layer call has >= 128 positions, so the packed layers take the exact fp32 path
    options = EvalOptions(ppl=True, ppl_source=str(corpus), seq_len=32, max_windows=2, fidelity_windows=3,
                          fidelity_seq_len=128)
    calls: list[tuple] = []
    real_budget = stage.eval_budget
    monkeypatch.setattr(stage, "eval_budget", lambda *a: calls.append(a) or real_budget(*a))
    free = evaluate(art, options=options, compute_device="cpu")
    assert (free.memory.device, free.memory.dtype) == ("cpu", "float32") and free.memory.peak_host_bytes > 0
    (args,) = calls
    shape = args[1]
    need = sum(eval_need(*args[1:]).values())
    real_load = stage.load_for_eval
    monkeypatch.setattr(stage, "load_for_eval", lambda source, device="cpu": pytest.fail(f"loaded {source}"))
    with pytest.raises(ValueError) as e:
        evaluate(art, options=options, compute_device="cpu", max_memory=need - 1)
    assert str(e.value).startswith("--max-memory ") and "one step of 2 model(s)" in str(e.value) and \
        "--seq-len" in str(e.value)
    monkeypatch.setattr(stage, "load_for_eval", real_load)
    tight = evaluate(art, options=options, compute_device="cpu",
                     max_memory=need + 3 * logit_bytes(shape.vocab_size, 2))
    window = 128 * shape.hidden_size * 4
    assert real_budget(*calls[-1]) == WalkBudget(window + 2 * logit_bytes(shape.vocab_size, 2) // 6, MIN_CHUNK + 1)
    assert real_budget(*calls[-1]).pass_bytes < 3 * window  # more than one pass over the three fidelity windows
    assert tight.fidelity.kl_mean == pytest.approx(free.fidelity.kl_mean, rel=1e-6)
    assert tight.fidelity.top1_agreement == free.fidelity.top1_agreement
    assert tight.quantized["perplexity"]["ppl"] == pytest.approx(free.quantized["perplexity"]["ppl"], rel=1e-6)


def test_whole_model_steps_are_refused_past_max_memory(isolated):
    pytest.importorskip("lm_eval", reason="lm-eval (lm-evaluation-harness) is not installed")
    model_dir, _, _, _ = isolated
    with pytest.raises(OptionError, match=r"^--max-memory 512.00 MiB is less than zero-shot tasks \(lm-eval\), "
                                          r"which need the whole model in memory, needs here: .*the whole model"):
        evaluate(model_dir, options=EvalOptions(tasks="piqa"), compute_device="cpu", max_memory="512MiB")


def test_eval_budget_splits_what_the_limit_leaves():
    from lsaq.compute import cpu_compute
    from lsaq.eval.budget import MIN_CHUNK, WalkBudget, eval_budget, eval_need, logit_bytes
    from lsaq.engine.logits import CHUNK, PASS_BYTES
    from lsaq.models.configs import load_config
    from lsaq.models.families import model_shape

    shape = model_shape(load_config("llama-2-7b").config)
    cpu, f32 = cpu_compute(), torch.float32
    need = sum(eval_need(shape, 512, 1024, 2, cpu, f32).values())
    window = 512 * shape.hidden_size * 4
    assert eval_budget(None, shape, 512, 1024, 2, cpu, f32) == WalkBudget()
    assert eval_budget(need, shape, 512, 1024, 2, cpu, f32) == WalkBudget(pass_bytes=window, chunk=MIN_CHUNK)
    extra = 10 * logit_bytes(shape.vocab_size, 2)
    assert eval_budget(need + extra, shape, 512, 1024, 2, cpu, f32) == \
        WalkBudget(pass_bytes=window + (extra - 5 * logit_bytes(shape.vocab_size, 2)) // 6, chunk=MIN_CHUNK + 5)
    assert eval_budget(need + 2**40, shape, 512, 1024, 2, cpu, f32) == WalkBudget(PASS_BYTES, CHUNK)
    assert sum(eval_need(shape, 512, 1024, 1, cpu, f32).values()) < need
    with pytest.raises(ValueError, match="is less than one layer's step needs here"):
        eval_budget(need - 1, shape, 512, 1024, 2, cpu, f32)


def report_tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def test_fidelity_alone_defaults_to_local_wikitext_else_generated(isolated, tmp_path, loads, monkeypatch):
    from lsaq.calibration.sets import generate_calibration
    from lsaq.models.loading import load_model

    model_dir, art, _, empty = isolated
    options = EvalOptions(fidelity_windows=2, fidelity_seq_len=16, fidelity_seed=5)
    gen = evaluate(art, options=options)  # default options measure fidelity; no corpus: generated text
    assert [s.artifact for s in loads] == [True, False]
    f = gen.fidelity
    assert gen.comparison == () and gen.quantized["perplexity"] is None and gen.baseline["tasks"] == {}
    assert (f.source, f.windows, f.seq_len, f.positions) == ("generated", 2, 16, 32)
    base = load_model(model_dir)
    calib = generate_calibration(base.model, base.tokenizer, base.info.content_hash, samples=2, seq_len=16, seed=5)
    assert f.source_hash == calib.source_hash and gen.settings["fidelity_seed"] == 5
    ref = direct_fidelity(model_dir, art, calib.tokens)
    assert (f.kl_mean, f.top1_agreement) == pytest.approx((ref.kl_mean, ref.top1_agreement), rel=1e-9)
    assert "text generated by the float model, 2 x 16 tokens" in render_markdown(gen)
    assert evaluate(art, options=options).fidelity.kl_mean == f.kl_mean  # seeded: the same text again

    wiki = tmp_path / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"
    wiki.parent.mkdir(parents=True)
    wiki.write_text(word_text(500, seed=3))
    monkeypatch.setenv("LSAQ_SHARED", str(tmp_path / "shared"))
    local = evaluate(art, options=options).fidelity
    assert (local.source, local.windows, local.seq_len) == (str(wiki), 2, 16)
    # Without perplexity the window is DEFAULT_FIDELITY_SEQ_LEN, capped at the model's 128 positions.
    assert stage.DEFAULT_FIDELITY_SEQ_LEN == 512 and evaluate(art).fidelity.seq_len == 128


def test_no_baseline_loads_only_the_artifact(isolated, loads):
    _, art, corpus, _ = isolated
    report = evaluate(art, options=EvalOptions(ppl=True, ppl_source=str(corpus), seq_len=32, max_windows=1,
                                               with_baseline=False))
    assert [s.artifact for s in loads] == [True] and report.baseline is None and report.fidelity is None
    assert report.comparison[0]["delta"] is None and "neither deltas nor fidelity" in render_markdown(report)


def test_baseline_with_other_weights_is_refused(isolated, tmp_path):
    _, art, _, _ = isolated
    other = tiny_model_dir(tmp_path / "other", seed=1)
    with pytest.raises(OptionError, match="is not the model the artifact was made from .* pass baseline or "
                                          "with_baseline"):
        evaluate(art, options=EvalOptions(seq_len=16, fidelity_windows=1), baseline=str(other))


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None, reason="matplotlib is not installed")
def test_plots_only_loads_nothing(isolated, tmp_path, loads):
    _, art, _, _ = isolated
    report = evaluate(art, options=EvalOptions(with_baseline=False, plots=str(tmp_path / "p")))
    assert loads == [] and report.quantized is None and report.fidelity is None
    assert sorted(p.name for p in (tmp_path / "p").iterdir()) == ["memory.png", "plan_strip.png"]
    assert "Nothing was measured" in render_markdown(report)


# ------------------------------------------------------------------------------------------ plain models


def test_plain_model_gives_the_plain_record(isolated, tmp_path):
    from lsaq.eval.perplexity import perplexity
    from lsaq.models.loading import load_model

    model_dir, _, corpus, _ = isolated
    options = EvalOptions(ppl=True, ppl_source=str(corpus), seq_len=32, max_windows=2)
    record = evaluate(model_dir, tmp_path / "plain.json", options=options)
    assert isinstance(record, ModelEval)
    loaded = load_model(model_dir)
    direct = perplexity(loaded.model, loaded.tokenizer, str(corpus), seq_len=32, max_windows=2)
    # the stage walks the layers and sums NLLs in float64; the whole model sums each window's 31 in float32
    rounding = 31 * torch.finfo(torch.float32).eps * direct.nll
    assert abs(record.perplexity["nll"] - direct.nll) <= rounding and record.tasks == {}
    saved = json.loads((tmp_path / "plain.json").read_text())
    assert saved == record.to_json() and saved["schema"] == "lsaq.eval" and "artifact" not in saved
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain.json"]


def test_cli_takes_the_compute_device_and_max_memory(isolated, capsys):
    from lsaq.cli import main

    _, art, corpus, _ = isolated
    assert main(["eval", str(art), "--compute-device", "tpu"]) == 2
    assert capsys.readouterr().err.strip() == ("lsaq eval: error: compute device 'tpu' is not one of: auto, cpu or "
                                               "cuda:N (N: a CUDA device index)")
    assert main(["eval", str(art), "--max-memory", "lots"]) == 2
    assert "max memory" in capsys.readouterr().err
    assert main(["eval", str(art), "--ppl-source", str(corpus), "--fidelity-windows", "1", "--fidelity-seq-len",
                 "16", "--compute-device", "cpu", "--max-memory", "8GiB"]) == 0
    assert "evaluated on cpu (float32), peak host memory" in capsys.readouterr().out
