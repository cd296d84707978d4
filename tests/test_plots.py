"""Plots: valid PNGs from synthetic plans and series, atomic writes, clear errors for bad input."""

from __future__ import annotations

import json
import struct
import sys
from importlib import resources

import pytest

from lsaq import plots
from lsaq.methods import ImportanceRef
from lsaq.models.families import model_shape
from lsaq.models.identity import ModelRef
from lsaq.planning.planner import PlanOptions, make_plan
from lsaq.planning.stage import resolve_device

pytest.importorskip("matplotlib")

PNG = b"\x89PNG\r\n\x1a\n"


def png_size(path) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR, after checking the signature."""
    data = path.read_bytes()
    assert data.startswith(PNG) and len(data) > 1000 and data[12:16] == b"IHDR", path
    return struct.unpack(">II", data[16:24])


@pytest.fixture(scope="module")
def plan():
    """Llama-3-8B (shipped config) on an RTX 3060 at context 4096: a mixed FP16/INT8 plan."""
    cfg = json.loads(resources.files("lsaq").joinpath("data/configs/llama-3-8b.json").read_text())
    imp = [1.0 / (1 + i) for i in range(32)]
    return make_plan(model_shape(cfg), imp, resolve_device("rtx3060"), PlanOptions(strategy="optimal"),
                     model=ModelRef(id="llama-3-8b", model_type="llama", num_layers=32), importance_ref=ImportanceRef("x", "jaccard", 10))


def test_plan_strip_and_memory(plan, tmp_path):
    assert plan.counts["fp16"] > 0 and plan.counts["int8"] > 0
    w, h = png_size(plots.plot_plan_strip(plan, tmp_path / "strip.png"))
    assert w > h > 100
    assert png_size(plots.plot_memory(plan, tmp_path / "sub" / "memory.png")) > (300, 300)
    parts = plots.memory_parts(plan)
    assert list(parts) == list(plots.MEMORY_PARTS) and sum(parts.values()) == plan.breakdown.total
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["memory.png", "strip.png", "sub"]  # no temp files


def test_importance(tmp_path):
    series = {"jaccard": [0.93, 0.6, 0.2, 0.3, 0.61], "cosine": [0.05, 0.01, 0.004, 0.006, 0.02],
              "sensitivity": [3.0, 1.0, 0.5, 0.7, 2.0]}
    out = plots.plot_importance(series, tmp_path / "imp.png", title="three methods")
    assert out == tmp_path / "imp.png" and png_size(out)[0] > 0
    with pytest.raises(ValueError, match="same, non-zero number of layers"):
        plots.plot_importance({"a": [1.0, 2.0], "b": [1.0]}, tmp_path / "x.png")
    with pytest.raises(ValueError, match="same, non-zero number of layers"):
        plots.plot_importance({"a": []}, tmp_path / "x.png")
    with pytest.raises(ValueError, match="at least one series"):
        plots.plot_importance({}, tmp_path / "x.png")
    with pytest.raises(ValueError, match=r"series 'a'\[1\] must be a finite number"):
        plots.plot_importance({"a": [1.0, float("nan")]}, tmp_path / "x.png")
    with pytest.raises(ValueError, match="ending in .png"):
        plots.plot_importance(series, tmp_path / "imp.svg")
    assert not (tmp_path / "x.png").exists()


def test_method_groups():
    names = ["lsaq", "random-0", "random-1", "random-2", "int4-0", "lsaq", "random"]
    assert plots.method_groups(names) == {
        "lsaq": ["lsaq"], "random-*": ["random-0", "random-1", "random-2"], "int4-0": ["int4-0"], "random": ["random"],
    }


def test_ppl_vs_bits(tmp_path):
    rows = [{"method": m, "avg_bits": b, "ppl": p} for m, b, p in [
        ("lsaq", 16.0, 20.0), ("lsaq", 8.5, 20.5), ("lsaq", 4.6, 24.0),
        ("cosine", 4.6, 26.0), ("cosine", 8.5, 21.0), ("cosine", 16.0, 20.0),
    ]]
    for seed in range(3):
        rows += [{"method": f"random-{seed}", "avg_bits": b + 0.01 * seed, "ppl": p + seed}
                 for b, p in [(4.6, 30.0), (8.5, 22.0), (16.0, 20.0)]]
    rows.append({"method": "uneven-0", "avg_bits": 6.0, "ppl": 25.0})
    rows += [{"method": "uneven-1", "avg_bits": b, "ppl": 25.0} for b in (5.0, 7.0)]
    out = plots.plot_ppl_vs_bits(rows, tmp_path / "ppl.png", baseline_ppl=19.5, title="SmolLM2")
    assert png_size(out)[0] > 0
    bad = [
        ([], "at least one row"),
        ([{"method": "a", "ppl": 1.0}], "row 0 lacks avg_bits"),
        ([{"method": "", "avg_bits": 4.0, "ppl": 1.0}], "non-empty string"),
        ([{"method": "a", "avg_bits": 4.0, "ppl": 0.0}], "positive for a log scale"),
        ([{"method": "a", "avg_bits": float("inf"), "ppl": 1.0}], "finite number"),
    ]
    for rows_, match in bad:
        with pytest.raises(ValueError, match=match):
            plots.plot_ppl_vs_bits(rows_, tmp_path / "bad.png")
    with pytest.raises(ValueError, match="baseline_ppl must be positive"):
        plots.plot_ppl_vs_bits(rows, tmp_path / "bad.png", baseline_ppl=-1.0)
    assert not (tmp_path / "bad.png").exists()


def test_missing_matplotlib_says_how_to_install(monkeypatch, plan, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    with pytest.raises(ModuleNotFoundError, match="pip install"):
        plots.plot_memory(plan, tmp_path / "m.png")
    assert not (tmp_path / "m.png").exists()
