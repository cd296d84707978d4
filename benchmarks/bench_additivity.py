"""Is measured per-layer loss additive? Predicted (summed single-layer KL) vs measured KL of whole plans.

On the shared SmolLM2-135M: measure the layer-loss record (INT8 and per-channel INT4 probes) on calibration windows
of WikiText-2 valid's first half, time it against one float forward pass over the same tokens, then for random
plans with 0..30 INT4 layers (the rest INT8 or FP16) and for the ``measured`` optimum at several byte budgets,
compare the predicted loss with the KL of the whole plan (every chosen layer quantized at once, round-to-nearest)
on held-out windows from the second half. Prints a table and the Pearson/Spearman correlations.

``--quantizer gptq``: the record measures GPTQ's codes, and whole plans use the same codes (each layer GPTQ-quantized
on the float model's activations, :func:`lsaq.quantization.sequential.float_input_gptq`), so the check is the
planner's assumption that single-layer costs add up, for GPTQ's much smaller costs.

    .venv/bin/python benchmarks/bench_additivity.py [--samples 4] [--seq-len 128] [--plans 24] [--quantizer gptq]
"""

from __future__ import annotations

import argparse
import contextlib
import random
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

from lsaq.calibration.sets import CalibrationSet, tokenize_windows
from lsaq.importance.cost import measure_layer_loss
from lsaq.importance.sensitivity import quantized_layer
from lsaq.importance.similarity import spearman
from lsaq.models.families import model_shape
from lsaq.models.loading import load_model
from lsaq.models.parts import decoder_parts
from lsaq.paths import shared_dir
from lsaq.planning.planner import PlanOptions, budget_for
from lsaq.planning.solvers import min_loss_assign, predicted_loss
from lsaq.precision import Precision
from lsaq.quantization.sequential import float_input_gptq

MODEL = "models/smollm2-135m-instruct-q4_1/SmolLM2-135M-Instruct.Q4_1.gguf"
WIKI = "data/wikitext-2-raw/wiki.valid.raw"


def plan_kl(model, parts, precisions, tokens, ref, bank=None) -> float:
    """Mean KL(float || plan) over ``tokens [N, L]`` with every layer at its precision (RTN round trip, or the codes
    of ``bank[layer][(precision, None)]``)."""
    with contextlib.ExitStack() as stack:
        for i, (layer, p) in enumerate(zip(parts.layers, precisions)):
            if p is not Precision.FP16:
                stack.enter_context(quantized_layer(layer, p, weights=bank[i][p, None] if bank else None))
        with torch.inference_mode():
            lp = F.log_softmax(model(input_ids=tokens).logits.float(), -1)
    return float((ref.exp() * (ref - lp)).sum(-1).mean())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--plans", type=int, default=24, help="random plans")
    ap.add_argument("--quantizer", default="rtn", help="rtn or gptq")
    args = ap.parse_args()
    root = shared_dir()
    if root is None or not (root / MODEL).is_file():
        print("needs the shared model and WikiText-2 (LSAQ_SHARED or ../shared)", file=sys.stderr)
        return 2
    loaded = load_model(root / MODEL)
    model, parts = loaded.model, decoder_parts(loaded.model)
    text = (root / WIKI).read_text()
    half = len(text) // 2
    windows = tokenize_windows(loaded.tokenizer, text[:half], args.seq_len)
    g = torch.Generator().manual_seed(0)
    calib = CalibrationSet.from_tokens(windows[torch.randperm(len(windows), generator=g)[:args.samples]])
    held = tokenize_windows(loaded.tokenizer, text[half:], args.seq_len)[:args.samples]

    record = measure_layer_loss(model, loaded.info, calib, ("int8", "int4"), quantizer=args.quantizer)
    bank = None
    if args.quantizer == "gptq":  # the codes the record measured, for whole plans
        bank = float_input_gptq(parts, calib.tokens, [(Precision.INT8, None), (Precision.INT4, None)])
    print(f"layer loss: {record.num_layers} layers x {len(record.probes)} probes on {args.samples} x {args.seq_len} "
          f"tokens in {record.seconds:.1f}s; one float forward pass {record.forward_seconds:.2f}s; "
          f"ratio {record.cost_ratio:.1f} forward passes")
    table = record.table()
    with torch.inference_mode():
        ref = F.log_softmax(model(input_ids=held).logits.float(), -1)

    shape = model_shape(loaded.info.config)
    costs = [budget_for(shape, PlanOptions()).layer_costs] * shape.num_layers
    full, low = sum(c[Precision.FP16] for c in costs), sum(c[Precision.INT4] for c in costs)
    rng = random.Random(0)
    rows = []
    for _ in range(args.plans):  # random plans across the whole range of INT4 counts
        n4 = rng.randint(0, shape.num_layers)
        rest = [rng.choice((Precision.FP16, Precision.INT8)) for _ in range(shape.num_layers - n4)]
        precisions = [Precision.INT4] * n4 + rest
        rng.shuffle(precisions)
        rows.append(("random", precisions))
    for frac in (0.3, 0.5, 0.7, 0.9):  # the measured optimum at byte budgets between all-INT4 and all-FP16
        assign, _ = min_loss_assign(table, costs, int(low + frac * (full - low)), list(Precision))
        rows.append((f"measured@{frac:.1f}", assign))
    start = time.perf_counter()
    pred, actual = [], []
    print(f"{'plan':<14} {'int4':>4} {'int8':>4} {'predicted':>10} {'measured':>10}")
    for name, precisions in rows:
        p, a = predicted_loss(table, precisions), plan_kl(model, parts, precisions, held, ref, bank)
        pred.append(p)
        actual.append(a)
        print(f"{name:<14} {precisions.count(Precision.INT4):>4} {precisions.count(Precision.INT8):>4} "
              f"{p:>10.4f} {a:>10.4f}")
    print(f"{len(rows)} whole-plan evaluations in {time.perf_counter() - start:.1f}s")
    print(f"Pearson {np.corrcoef(pred, actual)[0, 1]:.3f}, Spearman {spearman(pred, actual):.3f}; "
          f"measured / predicted: median {np.median(np.array(actual) / np.maximum(pred, 1e-12)):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
