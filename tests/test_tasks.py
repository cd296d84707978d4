"""Zero-shot tasks: local loaders, the HellaSwag text parser, and the harness run offline on the real model."""

from __future__ import annotations

import collections
import json
import os

import pytest

from lsaq.cli import main
from lsaq.eval.tasks import TASK_NAMES, TASKS, load_local_docs, parse_hellaswag, resolve_tasks
from lsaq.paths import shared_dir

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

MODEL_REL = "models/smollm2-135m-instruct-q4_1/SmolLM2-135M-Instruct.Q4_1.gguf"
# Official example counts of the splits the harness evaluates.
COUNTS = {"piqa": 1838, "arc_easy": 2376, "arc_challenge": 1172, "hellaswag": 10042, "winogrande": 1267,
          "boolq": 3270, "lambada_openai": 5153}
LIMIT = 20


def _shared(rel: str):
    root = shared_dir()
    if root is None or not (root / rel).exists():
        pytest.skip(f"shared material {rel} not found (set LSAQ_SHARED or put ../shared beside the checkout)")
    return root / rel


@pytest.fixture(scope="module")
def real():
    """The shared SmolLM2-135M, loaded once for this module."""
    from lsaq.models.loading import load_model

    return load_model(_shared(MODEL_REL))


@pytest.fixture(scope="module")
def lm_eval():
    return pytest.importorskip("lm_eval", reason="lm-eval (lm-evaluation-harness) is not installed")


def test_resolve_tasks():
    assert resolve_tasks("piqa, arc_easy,piqa") == ["piqa", "arc_easy"]
    assert resolve_tasks("all") == list(TASK_NAMES) and len(TASK_NAMES) == 7
    with pytest.raises(ValueError, match="unknown task.*'mmlu'.*valid tasks: piqa, arc_easy"):
        resolve_tasks(["piqa", "mmlu"])
    with pytest.raises(ValueError, match="no task given"):
        resolve_tasks(" , ")


def test_cli_unknown_task_fails_before_loading(capsys):
    assert main(["eval", "--tasks", "piqa,nope"]) == 2
    err = capsys.readouterr().err
    assert "unknown task(s) 'nope'" in err and "lambada_openai" in err
    assert main(["eval", "--tasks", "piqa", "--limit", "0"]) == 2
    assert "--limit must be at least 1" in capsys.readouterr().err


@pytest.mark.parametrize("name", TASK_NAMES)
def test_local_loaders_read_every_example(name):
    _shared("data/" + TASKS[name].files[0])
    docs, digest = load_local_docs(name)
    assert len(docs) == COUNTS[name] and len(digest) == 64


def test_hellaswag_parser_reads_all_items():
    docs = parse_hellaswag(_shared("data/hellaswag/hellaswag_val_full.txt"))
    assert len(docs) == 10042
    assert collections.Counter(d["label"] for d in docs) == {"0": 2515, "1": 2485, "2": 2584, "3": 2458}
    assert all(len(d["endings"]) == 4 and all(d["endings"]) for d in docs)
    first = docs[0]
    assert (first["activity_label"], first["ctx_a"], first["ctx_b"]) == ("Roof shingle removal",
                                                                        "A man is sitting on a roof.", "he")
    # ActivityNet items have an unfinished lower-case ctx_b; WikiHow items none.
    assert sum(bool(d["ctx_b"]) for d in docs) == 3243
    assert all(d["ctx"] == (d["ctx_a"] + " " + d["ctx_b"] if d["ctx_b"] else d["ctx_a"]) for d in docs)


def test_hellaswag_parser_rejects_bad_files(tmp_path):
    good = ["Label: A man walks. he", "2", "a", "b", "c", "d"]
    (tmp_path / "ok.txt").write_text("\n".join(good) + "\n")
    assert parse_hellaswag(tmp_path / "ok.txt")[0]["ctx_b"] == "he"
    (tmp_path / "short.txt").write_text("\n".join(good[:5]) + "\n")
    with pytest.raises(ValueError, match="not a positive multiple of 6"):
        parse_hellaswag(tmp_path / "short.txt")
    (tmp_path / "gold.txt").write_text("\n".join(good[:1] + ["7"] + good[2:]) + "\n")
    with pytest.raises(ValueError, match=r"gold.txt:2: gold ending index must be 0-3"):
        parse_hellaswag(tmp_path / "gold.txt")
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="multiple of 6"):
        parse_hellaswag(tmp_path / "empty.txt")


def test_missing_local_data_is_a_clear_error(tmp_path, lm_eval):
    from lsaq.eval.harness import build_task

    with pytest.raises(ValueError, match="local data not found under .*missing piqa/valid.jsonl"):
        build_task("piqa", data="local", data_dir=tmp_path)
    with pytest.raises(ValueError, match="unknown data source 'web'"):
        build_task("piqa", data="web")


@pytest.mark.model
@pytest.mark.slow
def test_every_task_runs_offline_and_is_reproducible(real, lm_eval):
    from lsaq.eval import evaluate_tasks

    _shared("data/piqa/valid.jsonl")
    results = evaluate_tasks(real.model, real.tokenizer, "all", limit=LIMIT, batch_size=8)
    assert list(results) == list(TASK_NAMES)
    assert "tie_weights" not in vars(real.model)  # the temporary no-op is gone again
    for name, r in results.items():
        assert r.n == LIMIT and r.n_total == COUNTS[name], name
        assert r.data.startswith("local:") and r.data_hash and r.harness.startswith("lm_eval ")
        assert set(TASKS[name].metrics) <= set(r.metrics), (name, r.metrics)
        for metric in ("acc", "acc_norm"):
            if metric in r.metrics:
                assert 0.0 <= r.metrics[metric] <= 1.0, (name, metric)
                assert r.stderr[metric] is not None
    assert results["lambada_openai"].metrics["perplexity"] > 1.0
    json.dumps({n: r.to_json() for n, r in results.items()})  # the report is JSON-serialisable
    # The same model, data and limit give the same numbers (the cheapest task re-run, to keep the suite short).
    again = evaluate_tasks(real.model, real.tokenizer, ["winogrande"], limit=LIMIT, batch_size=8)
    assert again["winogrande"].metrics == results["winogrande"].metrics


@pytest.mark.model
def test_cli_reports_tasks(real, lm_eval, tmp_path, monkeypatch, capsys):
    import lsaq.eval.stage as stage

    _shared("data/winogrande/dev.jsonl")
    monkeypatch.setattr(stage, "load_for_eval",
                        lambda source, device="cpu": stage.EvalModel.resident(source, real))
    out = tmp_path / "report.json"
    assert main(["eval", "--tasks", "winogrande", "--limit", "4", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "winogrande" in printed and "4/1267" in printed
    report = json.loads(out.read_text())
    assert report["perplexity"] is None and report["tasks"]["winogrande"]["n"] == 4
