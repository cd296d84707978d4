"""Kernel benchmark: quantization throughput and quantized matmul timings at one weight shape.

(a) Quantization throughput in GB/s of float weight bytes, next to a plain memory copy of the same bytes.
(b) Matrix-vector (1 token) and short-prefill timings for fp32/bf16 F.linear, the raw INT8/INT4 CPU
    kernels, and the Int8Linear/Int4Linear modules on their kernel and dequantize paths, with ratios
    against the bf16 and fp32 F.linear of the same run.
(c) ``--sweep``: kernel vs dequantize path per token count, to place DEQUANT_MIN_TOKENS.

Timings are the minimum over repeats (robust to other processes on a shared machine; the load average
is printed so contention is visible). Usage: ``python benchmarks/bench_kernels.py [--out 4096 --in 4096]``.
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Callable

import torch
import torch.nn.functional as F

from lsaq.quantization.primitives import QuantizedWeight, quantize_int4, quantize_int8
from lsaq.quantization.qlinear import Int4Linear, Int8Linear


def bench_s(fn: Callable[[], object], budget_s: float = 0.6, reps: int = 5) -> float:
    """Minimum seconds per call over `reps` rounds that together take about `budget_s`."""
    fn()
    t0 = time.perf_counter()
    fn()
    once = max(time.perf_counter() - t0, 1e-7)
    inner = max(1, int(budget_s / reps / once))
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        best = min(best, (time.perf_counter() - t0) / inner)
    return best


def table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]

    def line(r: list[str]) -> str:
        return "  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(r, widths)))

    return "\n".join([line(header), "  ".join("-" * w for w in widths)] + [line(r) for r in rows])


def quant_throughput(w: torch.Tensor, budget: float) -> str:
    dst = torch.empty_like(w)
    gb = w.nbytes / 1e9
    t_copy = bench_s(lambda: dst.copy_(w), budget)
    rows = [["memcpy (Tensor.copy_)", f"{t_copy * 1e3:.2f}", f"{gb / t_copy:.2f}", "1.00"]]
    for name, fn in [
        ("quantize_int8", lambda: quantize_int8(w)),
        ("quantize_int4 per-channel", lambda: quantize_int4(w)),
        ("quantize_int4 g=128", lambda: quantize_int4(w, 128)),
    ]:
        t = bench_s(fn, budget)
        rows.append([name, f"{t * 1e3:.2f}", f"{gb / t:.2f}", f"{t_copy / t:.2f}"])
    return table(rows, [f"{w.dtype} {tuple(w.shape)}", "ms", "GB/s", "vs memcpy"])


def matmul_timings(w: torch.Tensor, tokens: list[int], budget: float) -> str:
    n, k = w.shape
    w_bf16 = w.to(torch.bfloat16)
    m8 = Int8Linear.from_quantized(QuantizedWeight.quantize(w, "int8"))
    m4 = Int4Linear.from_quantized(QuantizedWeight.quantize(w, "int4"))
    m4g = Int4Linear.from_quantized(QuantizedWeight.quantize(w, "int4", 128))
    ones = torch.ones(n, dtype=torch.bfloat16)
    unit = torch.zeros(k // m4.kernel_group_size, n, 2, dtype=torch.bfloat16) if m4.layout else None
    if unit is not None:
        unit[..., 0] = 1
    out = []
    for m in tokens:
        x32 = torch.randn(m, k)
        x16 = x32.to(torch.bfloat16)
        cases: list[tuple[str, Callable[[], object]]] = [
            ("F.linear fp32", lambda: F.linear(x32, w)),
            ("F.linear bf16", lambda: F.linear(x16, w_bf16)),
        ]
        if m8._kernel_ok():
            raw8 = torch.ops.aten._weight_int8pack_mm
            cases.append(("raw _weight_int8pack_mm bf16", lambda: raw8(x16, m8.codes, ones)))
        if unit is not None:
            g = m4.kernel_group_size
            raw4 = torch.ops.aten._weight_int4pack_mm_for_cpu
            cases.append((f"raw _weight_int4pack_mm_for_cpu bf16 g={g}", lambda: raw4(x16, m4.packed, g, unit)))
        for label, mod in [("Int8Linear", m8), ("Int4Linear per-channel", m4), ("Int4Linear g=128", m4g)]:
            for path in ("kernel", "dequant"):
                if path == "kernel" and not mod._kernel_ok():
                    continue
                for xname, x in (("bf16", x16), ("fp32", x32)):

                    def call(mod=mod, path=path, x=x) -> object:
                        mod.path = path
                        with torch.no_grad():
                            return mod(x)

                    cases.append((f"{label} {path} ({xname} in)", call))
        times = {name: bench_s(fn, budget) for name, fn in cases}
        t32, t16 = times["F.linear fp32"], times["F.linear bf16"]
        rows = [[name, f"{t * 1e3:.3f}", f"{t16 / t:.2f}x", f"{t32 / t:.2f}x"] for name, t in times.items()]
        out.append(table(rows, [f"{n}x{k}, {m} token(s)", "ms", "speed vs bf16", "speed vs fp32"]))
    for mod in (m8, m4, m4g):
        mod.path = "auto"
    return "\n\n".join(out)


def sweep(w: torch.Tensor, tokens: list[int], budget: float) -> str:
    mods = {
        "int8": Int8Linear.from_quantized(QuantizedWeight.quantize(w, "int8")),
        "int4": Int4Linear.from_quantized(QuantizedWeight.quantize(w, "int4")),
        "int4 g128": Int4Linear.from_quantized(QuantizedWeight.quantize(w, "int4", 128)),
    }
    rows = []
    for m in tokens:
        x = torch.randn(m, w.shape[1], dtype=torch.bfloat16)
        row = [str(m)]
        for mod in mods.values():
            res = []
            for path in ("kernel", "dequant"):
                mod.path = path
                with torch.no_grad():
                    runs = path == "dequant" or mod._kernel_ok()
                    res.append(bench_s(lambda: mod(x), budget) * 1e3 if runs else float("nan"))
            row += [f"{res[0]:.2f}", f"{res[1]:.2f}"]
        rows.append(row)
    header = ["tokens"] + [f"{name} {p} ms" for name in mods for p in ("kernel", "deq")]
    return table(rows, header)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=int, default=4096, help="out_features of the weight")
    ap.add_argument("--in", dest="in_", type=int, default=4096, help="in_features of the weight")
    ap.add_argument("--prefill", type=int, default=16, help="tokens of the short prefill")
    ap.add_argument("--budget", type=float, default=0.5, help="seconds spent per timed case")
    ap.add_argument("--sweep", action="store_true", help="also sweep token counts: kernel vs dequantize path")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
          f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.2f}")
    w = torch.randn(args.out, args.in_) * 0.02
    print("\n(a) quantization throughput\n" + quant_throughput(w, args.budget))
    print("\n(b) matmul\n" + matmul_timings(w, [1, args.prefill], args.budget))
    if args.sweep:
        tokens = [1, 4, 16, 32, 48, 64, 96, 128, 256]
        print("\n(c) kernel vs dequantize path (bf16 input)\n" + sweep(w, tokens, args.budget / 2))
    print(f"\nload average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
