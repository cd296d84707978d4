"""Wall time of LSAQ jaccard scoring against a plain forward pass and the forward + (L+1) lens lower bound.

    .venv/bin/python benchmarks/bench_importance.py [--model PATH] [--samples 8] [--seq-len 512]

All three are measured in the same run on the same tokens. The lower bound is what any exact implementation
must do: one forward pass, plus L+1 projections of [tokens, hidden] through final norm and LM head. Target:
scoring within 1.3x of it. Peak RSS is the process high-water mark (model + one logits chunk + activations).
"""

from __future__ import annotations

import argparse
import resource
import time

import torch

from lsaq.calibration.sets import load_calibration
from lsaq.importance.scoring import score_samples
from lsaq.models.loading import load_model
from lsaq.models.parts import decoder_parts


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model path (default: the embedded SmolLM2-135M)")
    ap.add_argument("--calib", default=None)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--k", type=int, default=10)
    args = ap.parse_args()

    loaded = load_model(args.model)
    model, parts = loaded.model, decoder_parts(loaded.model)
    calib = load_calibration(loaded.tokenizer, args.calib, samples=args.samples, seq_len=args.seq_len)
    batches = list(calib.tokens.split(args.batch_size))
    n_layers, weight = len(parts.layers), parts.lm_head.weight  # [V, H]
    chunk = 1024

    def forward() -> None:
        with torch.inference_mode():
            for ids in batches:
                model(input_ids=ids, use_cache=False)

    def lens_projections() -> None:
        # L+1 projections of every position through final norm + LM head, into one reused [chunk, V] buffer.
        buf = torch.empty(chunk, weight.shape[0])
        with torch.inference_mode():
            for ids in batches:
                h = torch.randn(ids.numel(), weight.shape[1])
                for _ in range(n_layers + 1):
                    for s in range(0, h.shape[0], chunk):
                        z = parts.final_norm(h[s : s + chunk])
                        torch.mm(z, weight.t(), out=buf[: z.shape[0]])

    def scoring() -> None:
        score_samples(model, calib, "jaccard", args.k, batch_size=args.batch_size)

    forward()  # warm-up: first-call allocations and kernel selection
    t_forward = timed(forward)
    t_lens = timed(lens_projections)
    t_score = timed(scoring)
    lower = t_forward + t_lens
    tokens = calib.tokens.numel()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"model {loaded.info.id} ({loaded.info.architecture}, {n_layers} layers), {args.samples}x{args.seq_len} "
          f"= {tokens} tokens, batch {args.batch_size}, k={args.k}, torch threads {torch.get_num_threads()}")
    print(f"{'what':<34} {'seconds':>8} {'tok/s':>8} {'ratio':>7}")
    for name, t in [
        ("plain forward", t_forward),
        (f"{n_layers + 1} lens projections", t_lens),
        ("lower bound (forward + lens)", lower),
        ("jaccard scoring (lsaq)", t_score),
    ]:
        print(f"{name:<34} {t:>8.2f} {tokens / t:>8.0f} {t / t_forward:>6.2f}x")
    print(f"scoring / lower bound = {t_score / lower:.3f} (target <= 1.3)")
    print(f"scoring / plain forward = {t_score / t_forward:.2f}")
    print(f"peak RSS = {rss:.0f} MiB")


if __name__ == "__main__":
    main()
