"""What a cheaper layer-loss measurement costs in accuracy: the KL at every N-th position only (``--kl-stride``).

    .venv/bin/python benchmarks/bench_measure_cost.py [--samples 4] [--seq-len 512] [--strides 1,4,16]

On the default model and WikiText-2 validation text, measures the layer-loss record (probes int8, int4) at each
stride and reports, against stride 1 measured in the same run: time (and in float forward passes over the same
tokens), the Spearman correlation of each probe's per-layer losses, their median relative error, and what it does
to plans: for budgets of 4.5 to 7.5 average bits, the measured strategy's plan from the strided record, scored by
the full record (its "regret": extra predicted loss over the full record's own optimum).

Top-k or chunked-vocabulary KL is not offered: the quantized model's log-probabilities need the normaliser over the
whole vocabulary, so every logit is computed anyway; only fewer positions make the LM head cheaper.
"""

from __future__ import annotations

import argparse
import math
import time

from lsaq.calibration.sets import load_calibration
from lsaq.importance.cost import measure_layer_loss
from lsaq.importance.similarity import spearman
from lsaq.models.families import model_shape
from lsaq.models.loading import load_model
from lsaq.planning.devices import DeviceProfile, MemoryKind
from lsaq.planning.planner import PlanOptions, Strategy, budget_for
from lsaq.planning.solvers import predicted_loss
from lsaq.planning.stage import plan

BUDGETS = (4.5, 5.5, 6.5, 7.5)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--strides", default="1,4,16")
    args = ap.parse_args()
    strides = [int(s) for s in args.strides.split(",")]
    assert strides[0] == 1, "the first stride is the reference: 1"
    loaded = load_model(args.model)
    shape = model_shape(loaded.info.config)
    calib = load_calibration(loaded.tokenizer, None, samples=args.samples, seq_len=args.seq_len, seed=1)
    records = {}
    for stride in strides:
        t0 = time.perf_counter()
        records[stride] = measure_layer_loss(loaded.model, loaded.info, calib, ("int8", "int4"), stride=stride)
        print(f"stride {stride}: {time.perf_counter() - t0:.1f}s", flush=True)
    full = records[1]
    options = PlanOptions(context=2048, strategy=Strategy.MEASURED)
    fixed = budget_for(shape, options).fixed
    print(f"\nlayer loss on {args.samples} x {args.seq_len} tokens, probes int8/int4; one float forward pass "
          f"{full.forward_seconds:.2f}s")
    print("| stride | seconds | forward passes | time vs stride 1 | spearman int8 / int4 | median rel. error "
          "int8 / int4 | plan regret at " + " / ".join(f"{b}" for b in BUDGETS) + " bits |")
    print("|---|---|---|---|---|---|---|")
    for stride, rec in records.items():
        rho = [spearman([r[k] for r in rec.loss], [r[k] for r in full.loss]) for k in (0, 1)]
        rel = [sorted(abs(a[k] - b[k]) / b[k] for a, b in zip(rec.loss, full.loss))[shape.num_layers // 2]
               for k in (0, 1)]
        regrets = []
        for bits in BUDGETS:
            capacity = math.floor(bits * shape.num_layers * shape.linear_params_per_layer / 8)
            device = DeviceProfile(name=f"{bits}-bits", memory=fixed + capacity, kind=MemoryKind.SYSTEM, reserve=0,
                                   notes="bench")
            best = plan(device, loss=full, options=options)
            cheap = plan(device, loss=rec, options=options)
            regret = predicted_loss(full.table(), cheap.precisions) / best.predicted_loss - 1
            regrets.append(f"{100 * regret:+.1f}%")
        print(f"| {stride} | {rec.seconds:.1f} | {rec.cost_ratio:.1f} | {rec.seconds / full.seconds:.2f}x | "
              f"{rho[0]:+.3f} / {rho[1]:+.3f} | {100 * rel[0]:.1f}% / {100 * rel[1]:.1f}% | {' / '.join(regrets)} |")


if __name__ == "__main__":
    main()
