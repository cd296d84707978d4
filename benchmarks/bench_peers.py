"""lsaq's GGUF builds beside llama.cpp's own recipes, every row measured by the same tool on the same windows.

    .venv/bin/python benchmarks/bench_peers.py [--model GGUF] [--text FILE] [--windows 32] [--seq-len 512]
                                               [--recipes Q8_0,Q6_K,Q5_K_M,Q4_K_M,Q4_0,Q3_K_M] [--out DIR]

1. The float base: llama.cpp's quantizer writes the model in F32 (``LLAMA_FTYPE_ALL_F32``; from the shared Q4_1
   file that is its exact dequantization). Every other row is made from this file.
2. llama.cpp's recipes: ``llama_model_quantize`` (llama-quantize's library call) of the base, one file each.
3. lsaq's builds: for each recipe's file size, the largest lsaq plan (lsaq strategy, uniform importance unless
   ``--importance``) whose GGUF is no larger, for each of lsaq's GGUF format choices (``--lsaq-formats``);
   ``lsaq quantize`` of the base.
4. Every row, the base included, runs in llama-cpp-python (``logits_all``) on the same windows of ``--text``:
   KL(base || row) and top-1 agreement per position, perplexity of the next token; and its file size.

Writes ``peers.json``, ``peers.md`` (the table) and ``peers.png`` (the plot) in ``--out``. No importance matrix:
llama-cpp-python's quantize call takes one only as a C++ map pointer, and llama.cpp's ``llama-imatrix`` tool is
not built here.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch

RECIPES = ("Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_0", "Q3_K_M")
# lsaq's GGUF choices tried at every size: (INT8 as, INT4 as)
LSAQ_FORMATS = (("q8_0", "q4_k"), ("q6_k", "q4_k"), ("q8_0", "q3_k"))


@dataclasses.dataclass
class Row:
    """One build measured against the base: file bytes and the statistics over every scored position."""

    name: str
    method: str  # the plot's line: "llama.cpp" or "lsaq INT8/INT4 formats"
    path: str
    file_bytes: int
    q4_1_share: float = math.nan  # share of the weights stored as Q4_1: the shared model's own format
    kl: float = math.nan
    top1: float = math.nan
    ppl: float = math.nan
    positions: int = 0

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def llama_quantize(src: Path, dst: Path, ftype: str) -> Path:
    """llama.cpp's quantizer (``llama_model_quantize``) of ``src`` into ``dst`` as ``ftype`` (``Q4_K_M``, ...,
    ``F32``); requantizing a quantized source is allowed (the base is made from the shared Q4_1 file)."""
    import llama_cpp

    name = "LLAMA_FTYPE_ALL_F32" if ftype == "F32" else f"LLAMA_FTYPE_MOSTLY_{ftype}"
    if not hasattr(llama_cpp, name):
        raise ValueError(f"llama.cpp has no recipe {ftype!r}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, name)
    params.allow_requantize = True
    dst.parent.mkdir(parents=True, exist_ok=True)
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize {src} -> {ftype} failed ({rc})")
    return dst


def lsaq_plan_within(info, weights_limit: int, int8: str, int4: str, context: int,
                     importance: list[float] | None = None):
    """The lsaq plan of the model ``info`` (:func:`source_info`; llama.cpp runtime, INT8 as ``int8``, INT4 as
    ``int4``, the embedding INT8, else INT4 where all-INT4 layers with an INT8 embedding are too large) with the
    most weight bytes up to ``weights_limit`` (a file size less the GGUF's metadata), or None when nothing is that
    small."""
    for embed in ("int8", "int4"):
        plan = _largest_plan(info, weights_limit, int8, int4, context, importance, embed)
        if plan is not None:
            return plan
    return None


def _largest_plan(info, weights_limit: int, int8: str, int4: str, context: int,
                  importance: list[float] | None, embed: str):
    """:func:`lsaq_plan_within` for one embedding precision, by bisection on the device budget."""
    from lsaq.models.families import model_shape
    from lsaq.models.identity import ModelRef
    from lsaq.planning.devices import DeviceProfile, MemoryKind
    from lsaq.planning.memory import WeightPolicy
    from lsaq.planning.planner import InfeasiblePlanError, PlanOptions, make_plan

    shape = model_shape(info.config)
    options = PlanOptions(context=context, runtime="llama.cpp", gguf_int8=int8, gguf_int4=int4,
                          policy=WeightPolicy(embed=embed))
    weights = importance or [1.0] * shape.num_layers

    def plan_at(memory: int):
        device = DeviceProfile(name="peer", memory=memory, kind=MemoryKind.SYSTEM, reserve=0, notes="bench")
        try:
            return make_plan(shape, weights, device, options, model=ModelRef.from_info(info))
        except InfeasiblePlanError:
            return None

    lo, hi, best = 1 << 20, 1 << 40, None
    while hi - lo > 1 << 16:
        mid = (lo + hi) // 2
        plan = plan_at(mid)
        if plan is None or plan.breakdown.weights <= weights_limit:  # too small a device, or within the size
            lo, best = mid, plan or best
        else:
            hi = mid
    return best


def source_info(source: Path):
    """The identity record of ``source`` (a GGUF is converted to a float checkpoint once, in lsaq's cache)."""
    from lsaq.models.loading import empty_model, locate_model, model_info

    located = locate_model(str(source))
    return model_info(located, empty_model(located.load_dir))


def metadata_bytes(gguf: Path) -> int:
    """Bytes of ``gguf`` besides its tensors' data (header, metadata, tokenizer, tensor infos, alignment)."""
    from gguf import GGUFReader

    reader = GGUFReader(str(gguf))
    return Path(gguf).stat().st_size - sum(int(t.n_bytes) for t in reader.tensors)


def windows_of(base: Path, text: str, count: int, seq_len: int) -> torch.Tensor:
    """The first ``count`` non-overlapping windows ``[count, seq_len]`` of ``text`` in the base's own tokenizer
    (llama.cpp's, no BOS): the same token ids go to every row."""
    from lsaq.quantization.gguf_runtime import open_gguf

    with open_gguf(base, context=seq_len) as llm:
        ids = llm.tokenize(text.encode(), add_bos=False, special=False)
    n = min(count, len(ids) // seq_len)
    if n < 1:
        raise ValueError(f"the text holds {len(ids)} tokens: not one window of {seq_len}")
    return torch.tensor(ids[: n * seq_len], dtype=torch.int64).view(n, seq_len)


def compare(base: Path, rows: list[Row], windows: torch.Tensor) -> str:
    """Fill every row's KL, top-1 and perplexity against ``base`` over ``windows`` (all rows open at once, one
    window at a time, each from an empty cache) and return the windows' sha256 (what every row saw)."""
    from lsaq.eval.gguf import GgufModel
    from lsaq.quantization.gguf_runtime import load_gguf

    seq_len = windows.shape[1]
    models = [GgufModel(load_gguf(r.path, context=seq_len, logits_all=True, batch=seq_len)) for r in rows]
    ref = GgufModel(load_gguf(base, context=seq_len, logits_all=True, batch=seq_len))
    sums = [np.zeros(3) for _ in rows]  # per row: KL, top-1 agreements, NLL
    try:
        for ids in windows:
            want = torch.log_softmax(ref.window(ids).double(), -1)  # [T, V]
            for i, model in enumerate(models):
                got = torch.log_softmax(model.window(ids).double(), -1)
                kl = (want.exp() * (want - got)).sum(-1)
                agree = (want.argmax(-1) == got.argmax(-1)).double()
                nll = -got[:-1].gather(-1, ids[1:, None]).squeeze(-1)
                sums[i] += (float(kl.sum()), float(agree.sum()), float(nll.sum()))
    finally:
        for m in [ref, *models]:
            m.llm.close()
    positions = windows.numel()
    for r, (kl, agree, nll) in zip(rows, sums):
        r.kl, r.top1, r.positions = kl / positions, agree / positions, positions
        r.ppl = math.exp(nll / (positions - windows.shape[0]))
    return hashlib.sha256(windows.numpy().tobytes()).hexdigest()


def q4_1_share(gguf: str | Path) -> float:
    """The share of ``gguf``'s weight elements stored as Q4_1. The shared model was distributed as Q4_1 (blocks of
    32 with a scale and a minimum), so a Q4_1 tensor can recover its source blocks almost exactly: rows with a
    large share are favoured by that alignment, not by their choice of precisions alone."""
    from gguf import GGMLQuantizationType, GGUFReader

    tensors = GGUFReader(str(gguf)).tensors
    q4_1 = sum(int(t.n_elements) for t in tensors if t.tensor_type == GGMLQuantizationType.Q4_1)
    return q4_1 / sum(int(t.n_elements) for t in tensors)


def table(rows: list[Row], params: int) -> str:
    """Markdown: one line per row, by file size; rows with weights in Q4_1 marked."""
    lines = ["| build | MB | bits/weight | Q4_1 share | KL | top-1 | perplexity |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in sorted(rows, key=lambda r: -r.file_bytes):
        mark = " (Q4_1-aligned)" if r.q4_1_share > 0 else ""
        lines.append(f"| {r.name}{mark} | {r.file_bytes / 1e6:.1f} | {8 * r.file_bytes / params:.2f} | "
                     f"{100 * r.q4_1_share:.1f}% | {r.kl:.4f} | {100 * r.top1:.1f}% | {r.ppl:.3f} |")
    return "\n".join(lines)


def report(out: Path, rows: list[Row], windows: torch.Tensor, digest: str, params: int, text: str) -> str:
    """Write ``peers.md`` (the table), ``peers.json`` and ``peers.png`` (KL against file bits per weight, one line
    per method) in ``out``; return the table."""
    from lsaq.plots import plot_ppl_vs_bits

    for r in rows:
        r.q4_1_share = q4_1_share(r.path)
    md = table(rows, params)
    (out / "peers.md").write_text(md + "\n")
    (out / "peers.json").write_text(json.dumps({"windows": list(windows.shape), "windows_sha256": digest,
                                                 "text": text, "params": params,
                                                 "rows": [r.to_json() for r in rows]}, indent=1))
    plot_ppl_vs_bits([{"method": r.method, "avg_bits": 8 * r.file_bytes / params, "kl": r.kl} for r in rows],
                     out / "peers.png", key="kl", ylabel="KL divergence from the float model",
                     title=f"KL vs file bits per weight ({windows.shape[0]} x {windows.shape[1]} tokens)")
    return md


def build_rows(base: Path, out: Path, recipes: list[str], formats: list[tuple[str, str]], context: int,
               importance: list[float] | None = None) -> list[Row]:
    """llama.cpp's ``recipes`` of ``base`` and, at each one's file size, lsaq's largest build of each INT8/INT4
    GGUF format pair that is no larger (``lsaq quantize`` of ``base``)."""
    from lsaq.quantization.stage import quantize

    info, metadata = source_info(base), metadata_bytes(base)  # lsaq's GGUF metadata counted as the base's
    rows = []
    for recipe in recipes:
        path = llama_quantize(base, out / f"llama-{recipe}.gguf", recipe)
        rows.append(Row(f"llama.cpp {recipe}", "llama.cpp", str(path), path.stat().st_size))
    for recipe, peer in zip(recipes, list(rows)):
        for int8, int4 in formats:
            size, gguf = peer.file_bytes, None
            while gguf is None or gguf.stat().st_size > peer.file_bytes:  # lsaq's metadata is a little larger
                if gguf is not None:
                    size -= gguf.stat().st_size - peer.file_bytes
                plan = lsaq_plan_within(info, size - metadata, int8, int4, context, importance)
                if plan is None:
                    break
                art = quantize(plan, out / f"lsaq-{recipe}-{int8}-{int4}", model=str(base))
                gguf = next(Path(art.path).glob("*.gguf"))
            if plan is not None:
                rows.append(Row(f"lsaq {int8}/{int4} {plan.mix}, embedding {plan.options.policy.embed.value} "
                                f"<= {recipe}", f"lsaq {int8}/{int4}", str(gguf), gguf.stat().st_size))
    return rows


def main(argv: list[str] | None = None) -> int:
    from lsaq.models.families import model_shape
    from lsaq.paths import shared_dir

    shared = shared_dir() or Path("../shared")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path,
                    default=shared / "models/smollm2-135m-instruct-q4_1/SmolLM2-135M-Instruct.Q4_1.gguf")
    ap.add_argument("--text", type=Path, default=shared / "data/wikitext-2-raw/wiki.test.raw")
    ap.add_argument("--windows", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--recipes", default=",".join(RECIPES))
    ap.add_argument("--lsaq-formats", default=",".join(f"{a}/{b}" for a, b in LSAQ_FORMATS),
                    help="INT8/INT4 GGUF formats of lsaq's builds, comma-separated")
    ap.add_argument("--importance", type=Path, help="an importance record (lsaq score); default: uniform")
    ap.add_argument("--out", type=Path, default=Path("peers-out"))
    args = ap.parse_args(argv)

    out = args.out
    base = llama_quantize(args.model, out / "base-f32.gguf", "F32")
    windows = windows_of(base, args.text.read_text(), args.windows, args.seq_len)
    importance = json.loads(args.importance.read_text())["importance"] if args.importance else None
    formats = [tuple(pair.split("/")) for pair in args.lsaq_formats.split(",")]
    rows = build_rows(base, out, args.recipes.split(","), formats, args.seq_len, importance)
    digest = compare(base, rows, windows)
    params = model_shape(source_info(base).config).num_params
    print(report(out, rows, windows, digest, params, str(args.text)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
