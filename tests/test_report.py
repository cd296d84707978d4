"""The artifact evaluation report: deltas from synthetic runs, the typed record, Markdown, atomic writes, the CLI
on the real model."""

from __future__ import annotations

import json
import math

import pytest

from lsaq.cli import main
from lsaq.eval import report as rep
from lsaq.eval.fidelity import FidelityResult
from lsaq.methods import ImportanceRef
from lsaq.models.families import model_shape
from lsaq.models.identity import ModelRef
from lsaq.planning.devices import DeviceProfile, MemoryKind
from lsaq.planning.planner import PlanOptions, make_plan

PNG = b"\x89PNG\r\n\x1a\n"
MODEL = {"id": "tiny", "source": "/models/tiny", "revision": None, "content_hash": "c" * 64,
         "architecture": "LlamaForCausalLM", "model_type": "llama", "num_layers": 4, "config": {"big": 1}}


def tiny_plan():
    cfg = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4,
           "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 256, "tie_word_embeddings": True}
    device = DeviceProfile(name="toy", memory=420_000, kind=MemoryKind.SYSTEM, reserve=10_000)
    return make_plan(model_shape(cfg), [0.9, 0.2, 0.1, 0.5], device, PlanOptions(context=64, strategy="optimal"),
                     model=ModelRef.from_json(MODEL), importance_ref=ImportanceRef("imp123", "jaccard", 10))


def ppl(value, windows=2, seq_len=256):
    return {"ppl": value, "nll": math.log(value), "tokens": windows * (seq_len - 1), "windows": windows,
            "windows_available": 100, "seq_len": seq_len, "source": "/data/wiki.test.raw", "source_hash": "h" * 64,
            "text_tokens": 300_000, "seconds": 1.0}


def task(name, metrics, n=8, stderr=None):
    return {"task": name, "metrics": metrics, "stderr": stderr or {m: None for m in metrics}, "n": n, "n_total": 100,
            "data": "local:/data", "data_hash": "d" * 64, "seconds": 1.0, "harness": "lm_eval 0.4.13", "notes": []}


def runs(q_ppl=12.5, b_ppl=10.0):
    base = rep.run_record(MODEL, perplexity=ppl(b_ppl), seconds=3.0, dtype="float32", tasks={
        "piqa": task("piqa", {"acc": 0.5, "acc_norm": 0.625}, stderr={"acc": 0.125, "acc_norm": 0.25}),
        "lambada_openai": task("lambada_openai", {"acc": 0.25, "perplexity": 40.0}),
    })
    quant = rep.run_record(MODEL, perplexity=ppl(q_ppl), seconds=2.0, dtype="float32", artifact="/art", tasks={
        "piqa": task("piqa", {"acc": 0.375, "acc_norm": 0.75}),
        "lambada_openai": task("lambada_openai", {"acc": 0.125, "perplexity": 30.0}),
    })
    return base, quant


def test_compare_gives_exact_deltas_for_every_metric():
    base, quant = runs()
    rows = {r["key"]: r for r in rep.compare(base, quant)}
    assert list(rows) == ["perplexity", "piqa.acc", "piqa.acc_norm", "lambada_openai.acc", "lambada_openai.perplexity"]
    p = rows["perplexity"]
    assert (p["baseline"], p["quantized"], p["delta"], p["delta_pct"]) == (10.0, 12.5, 2.5, 25.0)
    assert p["n"] == 2 * 255 and not p["higher_is_better"] and p["task"] is None
    a = rows["piqa.acc"]
    assert (a["baseline"], a["quantized"], a["delta"], a["delta_pct"]) == (0.5, 0.375, -0.125, None)
    assert a["higher_is_better"] and a["n"] == 8 and a["baseline_stderr"] == 0.125 and a["quantized_stderr"] is None
    assert rows["piqa.acc_norm"]["delta"] == 0.125
    lp = rows["lambada_openai.perplexity"]
    assert (lp["delta"], lp["delta_pct"], lp["higher_is_better"]) == (-10.0, -25.0, False)
    assert rows["lambada_openai.acc"]["delta"] == -0.125


FIDELITY = FidelityResult(kl_mean=0.0123456, kl_p99=0.25, top1_agreement=0.9375, positions=512, windows=2,
                          seq_len=256, source="/data/wiki.test.raw", source_hash="h" * 64, seconds=1.5)


def test_report_record_and_markdown(tmp_path):
    plan = tiny_plan()
    base, quant = runs()
    typed = rep.build_report(quant, base, plan=plan, artifact={"path": "/art", "plan_id": plan.id},
                             settings={"dtype": "float32", "seq_len": 256}, fidelity=FIDELITY, seconds=5.0)
    report = typed.to_json()
    assert rep.EvalReport.from_json(json.loads(json.dumps(report))) == typed  # exact JSON round trip
    assert list(report) == ["schema", "version", "lsaq_version", "model", "artifact", "plan", "settings", "baseline",
                            "quantized", "comparison", "fidelity", "seconds", "memory"]
    assert report["fidelity"] == FIDELITY.to_json() and typed.fidelity == FIDELITY
    assert report["schema"] == "lsaq.eval_report" and report["version"] == 1
    assert report["model"]["content_hash"] == "c" * 64 and "config" not in report["model"]
    s = report["plan"]
    bd = plan.breakdown
    assert s["id"] == plan.id and s["device"] == {"name": "toy", "memory_bytes": 420_000, "reserve_bytes": 10_000,
                                                   "usable_bytes": 410_000}
    assert s["counts"] == plan.counts == {"fp16": 2, "int8": 2, "int4": 0} and s["avg_bits"] == plan.avg_bits
    assert (s["weights_bytes"], s["required_bytes"], s["headroom_bytes"]) == (bd.weights, bd.required, plan.headroom)
    assert s["importance"] == {"id": "imp123", "method": "jaccard", "k": 10} and s["fits"]
    assert report["baseline"]["perplexity"]["ppl"] == 10.0 and report["quantized"]["artifact"] == "/art"

    json_path, md_path = rep.write_report(typed, tmp_path / "r.json")
    assert md_path == tmp_path / "r.md" and rep.load_report(json_path) == json.loads(json.dumps(report))
    assert rep.EvalReport.load(json_path) == typed
    md = md_path.read_text()
    assert md == rep.render_markdown(report) == rep.render_markdown(typed)
    assert "| metric | baseline | quantized | delta |" in md and "toy" in md and plan.id[:12] in md
    for row in report["comparison"]:
        assert sum(1 for line in md.splitlines() if line.startswith(f"| {row['label']} (")) == 1, row["label"]
    assert "| perplexity (wiki.test.raw, 2 x 256 tokens, n=510) | 10.000 | 12.500 | +2.500 (+25.00%) |" in md
    assert "| 0.5000 ± 0.1250 | 0.3750 | -0.1250 |" in md
    assert "| 40.000 | 30.000 | -10.000 (-25.00%) |" in md
    assert "Fidelity to the float model (wiki.test.raw, 2 x 256 tokens, 512 positions;" in md
    assert "| 0.01235 | 0.25 | 93.75% |" in md


def test_record_without_fidelity_still_reads():
    """A report written before fidelity existed (no "fidelity" key) reads back with fidelity None."""
    base, quant = runs()
    old = rep.build_report(quant, base, plan=tiny_plan()).to_json()
    del old["fidelity"]
    typed = rep.EvalReport.from_json(old)
    assert typed.fidelity is None and typed.to_json() == dict(old, fidelity=None)
    assert "Fidelity" not in rep.render_markdown(typed)


def test_plain_model_record_keeps_its_shape():
    _, quant = runs()
    rec = rep.ModelEval.from_run(dict(quant, artifact=None))
    j = rec.to_json()
    assert list(j) == ["schema", "version", "lsaq_version", "model", "dtype", "perplexity", "tasks", "seconds",
                       "memory"]
    assert j["schema"] == "lsaq.eval" and j["perplexity"]["ppl"] == 12.5 and "config" not in j["model"]
    assert rep.ModelEval.from_json(json.loads(json.dumps(j))) == rec


def test_report_without_baseline():
    _, quant = runs()
    report = rep.build_report(quant, None, plan=tiny_plan()).to_json()
    assert report["baseline"] is None and report["fidelity"] is None
    assert all(r["baseline"] is None and r["delta"] is None and r["delta_pct"] is None for r in report["comparison"])
    md = rep.render_markdown(report)
    assert "| - | 12.500 | - |" in md and "--no-baseline" in md


@pytest.mark.parametrize("change, match", [
    (lambda b, q: b["perplexity"].update(windows=3), "windows"),
    (lambda b, q: b["perplexity"].update(source_hash="x"), "source_hash"),
    (lambda b, q: b.update(perplexity=None), "only one of the runs"),
    (lambda b, q: b["tasks"].pop("piqa"), "different tasks"),
    (lambda b, q: b["tasks"]["piqa"].update(n=7), "not the same examples"),
    (lambda b, q: b["tasks"]["piqa"]["metrics"].pop("acc_norm"), "different metrics"),
    (lambda b, q: q.pop("tasks"), "run record"),
])
def test_runs_of_different_material_are_refused(change, match):
    base, quant = runs()
    change(base, quant)
    with pytest.raises(ValueError, match=match):
        rep.compare(base, quant)


def test_write_is_atomic_and_all_or_nothing(tmp_path, monkeypatch):
    base, quant = runs()
    report = rep.build_report(quant, base, plan=tiny_plan()).to_json()
    out = tmp_path / "r.json"
    out.write_text("old")
    broken = dict(report, comparison=[{"label": "x"}])  # renders badly: nothing may be written
    with pytest.raises(KeyError):
        rep.write_report(broken, out)
    assert out.read_text() == "old" and not (tmp_path / "r.md").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]  # no temporary files left
    with pytest.raises(ValueError, match="give the JSON path"):
        rep.write_report(report, tmp_path / "r.md")
    rep.write_report(report, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json", "r.md"]
    assert json.loads(out.read_text())["schema"] == "lsaq.eval_report"


def test_cli_flag_errors_fail_before_loading(tmp_path, capsys):
    cases = [
        (["eval", "x.gguf", "--ppl", "--dtype", "float16"], "unknown --dtype 'float16'; valid: float32, bfloat16"),
        (["eval", "x.gguf", "--ppl", "--plots", str(tmp_path / "p")], "--plots applies to an artifact"),
        (["eval", "x.gguf", "--ppl", "--no-baseline"], "--no-baseline applies to an artifact"),
        (["eval", "x.gguf", "--ppl", "--baseline-model", "y"], "--baseline-model applies to an artifact"),
    ]
    fake = tmp_path / "art"
    fake.mkdir()
    (fake / "lsaq_plan.json").write_text("{}")
    cases += [
        (["eval", str(fake), "--no-baseline", "--plots", str(tmp_path / "p"), "--out", str(tmp_path / "r.json")],
         "--out needs something measured: --ppl and/or --tasks, or the fidelity, which needs the baseline"),
        (["eval", str(fake), "--ppl", "--no-baseline", "--baseline-model", "y"], "contradict"),
        (["eval", str(fake), "--plots", str(tmp_path / "p")], "incomplete artifact, missing"),
        (["eval", str(fake)], "incomplete artifact, missing"),  # fidelity by default: the artifact is read
        (["eval", str(fake), "--no-baseline"], "nothing to do without the baseline (no fidelity): pass --ppl and/or "
                                               "--tasks NAME[,NAME...] (or --plots DIR)"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        assert message in capsys.readouterr().err, argv
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]


# ------------------------------------------------------------------------------------ real model


@pytest.mark.model
def test_cli_evaluates_artifact_against_its_baseline(mixed_artifact, wiki_valid, tmp_path, capsys):
    art, plan = mixed_artifact
    out, plots = tmp_path / "r.json", tmp_path / "p"
    rc = main(["eval", str(art), "--ppl", "--ppl-source", str(wiki_valid), "--seq-len", "256", "--max-windows", "2",
               "--fidelity-windows", "3", "--out", str(out), "--plots", str(plots)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "| metric | baseline | quantized | delta |" in printed
    report = rep.load_report(out)
    b, q = report["baseline"]["perplexity"], report["quantized"]["perplexity"]
    assert b["windows"] == q["windows"] == 2 and b["tokens"] == q["tokens"] == 2 * 255
    assert b["source_hash"] == q["source_hash"]
    assert 5 < b["ppl"] < 200 and 5 < q["ppl"] < 200 and 0.5 < q["ppl"] / b["ppl"] < 2
    (row,) = report["comparison"]
    assert row["key"] == "perplexity" and (row["baseline"], row["quantized"]) == (b["ppl"], q["ppl"])
    assert row["delta"] == q["ppl"] - b["ppl"] and row["delta_pct"] == pytest.approx(100 * row["delta"] / b["ppl"])
    assert report["baseline"]["model"]["content_hash"] == plan.model.content_hash == report["model"]["content_hash"]
    assert report["baseline"]["artifact"] is None and report["quantized"]["artifact"] == str(art)
    assert report["plan"]["id"] == plan.id and report["plan"]["counts"] == {"fp16": 10, "int8": 10, "int4": 10}
    assert report["settings"]["dtype"] == "float32"
    # Fidelity always comes with an artifact's evaluation: here on the first 3 windows of the perplexity text.
    f = report["fidelity"]
    assert (f["source"], f["source_hash"], f["windows"], f["seq_len"]) == (str(wiki_valid), b["source_hash"], 3, 256)
    assert f["positions"] == 3 * 256 and 0 < f["kl_mean"] <= f["kl_p99"] and 0.4 < f["top1_agreement"] < 1
    md = out.with_suffix(".md").read_text()
    assert md == rep.render_markdown(report) and f"{b['ppl']:.3f}" in md and f"{q['ppl']:.3f}" in md
    assert "Fidelity to the float model (wiki.valid.raw, 3 x 256 tokens, 768 positions;" in md
    for name in ("plan_strip.png", "memory.png"):
        data = (plots / name).read_bytes()
        assert data.startswith(PNG) and len(data) > 1000, name


@pytest.mark.model
def test_cli_plots_only_and_no_baseline(mixed_artifact, wiki_valid, tmp_path, capsys, monkeypatch):
    import lsaq.eval.stage as stage

    art, _ = mixed_artifact
    loads = []
    real_load = stage.load_for_eval
    monkeypatch.setattr(stage, "load_for_eval",
                        lambda source, device="cpu": loads.append(source) or real_load(source, device))
    # Without the baseline there is no fidelity: plots alone load nothing.
    assert main(["eval", str(art), "--no-baseline", "--plots", str(tmp_path / "p")]) == 0 and loads == []
    assert sorted(p.name for p in (tmp_path / "p").iterdir()) == ["memory.png", "plan_strip.png"]
    rc = main(["eval", str(art), "--ppl", "--ppl-source", str(wiki_valid), "--seq-len", "128", "--max-windows", "1",
               "--no-baseline", "--out", str(tmp_path / "r.json")])
    assert rc == 0 and [s.artifact for s in loads] == [True]
    report = rep.load_report(tmp_path / "r.json")
    assert report["baseline"] is None and report["comparison"][0]["delta"] is None and report["fidelity"] is None
    assert "| - |" in capsys.readouterr().out
