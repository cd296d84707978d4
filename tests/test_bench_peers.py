"""The peer bench's harness (benchmarks/bench_peers.py) on the shared model, small: every row made from the same
float base, measured by the same tool on the same windows; lsaq's build no larger than the recipe it stands beside."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_peers.py"


@pytest.fixture(scope="module")
def bench():
    pytest.importorskip("llama_cpp", reason="the peer bench runs in llama.cpp (pip install 'lsaq[llama]')")
    spec = importlib.util.spec_from_file_location("bench_peers", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_peers"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def test_rows_share_base_windows_and_tool(bench, shared_gguf, wiki_valid, tmp_path):
    base = bench.llama_quantize(shared_gguf, tmp_path / "base-f32.gguf", "F32")
    windows = bench.windows_of(base, wiki_valid.read_text()[:20000], 2, 64)
    assert windows.shape == (2, 64)
    rows = bench.build_rows(base, tmp_path, ["Q8_0", "Q4_0"], [("q8_0", "q4_k")], 64)
    by_name = {r.name.split(" <= ")[-1] if r.method != "llama.cpp" else r.name: r for r in rows}
    assert set(by_name) == {"llama.cpp Q8_0", "llama.cpp Q4_0", "Q8_0", "Q4_0"}, [r.name for r in rows]
    for recipe in ("Q8_0", "Q4_0"):  # lsaq's build at each recipe's size is no larger
        assert by_name[recipe].file_bytes <= by_name[f"llama.cpp {recipe}"].file_bytes
    itself = bench.Row("base", "base", str(base), base.stat().st_size)
    digest = bench.compare(base, rows + [itself], windows)
    assert len(digest) == 64
    # the base against itself through the same tool: nothing differs, so the harness adds no noise of its own
    assert itself.kl == 0.0 and itself.top1 == 1.0 and itself.positions == 128
    for r in rows:
        assert r.positions == 128 and r.kl > 0 and 0 < r.top1 <= 1 and math.isfinite(r.ppl)
    assert by_name["llama.cpp Q8_0"].kl < by_name["llama.cpp Q4_0"].kl
    md = bench.table(rows + [itself], 134_515_008)
    assert md.count("\n") == len(rows) + 2 and "| base |" in md
