"""``lsaq quantize`` (plan -> artifact directory) and ``lsaq generate`` (greedy decoding from an artifact)."""

from __future__ import annotations

import argparse
import sys
import time

from lsaq.commands.score import compute_device_arg


def register(sub: argparse._SubParsersAction) -> None:
    q = sub.add_parser("quantize", help="quantize a model following a plan into a per-device artifact directory")
    q.add_argument("--plan", required=True, help="plan JSON from `lsaq plan`")
    q.add_argument("--model", default=None, help="model to quantize (default: the one the plan was made for)")
    q.add_argument("--out", required=True, help="artifact directory to write (replaced atomically)")
    q.add_argument("--quantizer", default="rtn",
                   help="rtn: round to nearest (default); gptq: error feedback on calibration activations (same "
                        "bytes, closer to the float model; needs --calibration; for a GGUF plan, INT4 as q4_0 or q4_1)")
    q.add_argument("--calibration", default=None, metavar="DIR",
                   help="--quantizer gptq: a calibration directory from `lsaq calibrate` for this model")
    q.add_argument("--max-shard-size", default=None, metavar="SIZE",
                   help="tensor bytes per weights file, e.g. 5GB (default: transformers' 50GB); past it the weights "
                        "go into model-0000i-of-0000N.safetensors shards with model.safetensors.index.json")
    compute_device_arg(q)
    q.set_defaults(func=run_quantize)

    g = sub.add_parser("generate", help="greedy generation from an artifact: lsaq's packed runtime, or llama.cpp for "
                                        "a GGUF build")
    g.add_argument("artifact", help="artifact directory from `lsaq quantize`")
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=int, default=40)
    g.add_argument("--dtype", default="bfloat16", help="activation dtype: bfloat16 (default) or float32")
    g.set_defaults(func=run_generate)


def run_quantize(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from lsaq.planning.planner import Plan
    from lsaq.quantization.stage import quantize

    start = time.perf_counter()
    plan = Plan.load(args.plan)
    bars: list[tqdm] = []  # opened at the first quantized layer: a refused argument prints only its message

    def step(_layer: int) -> None:
        if not bars:
            bars.append(tqdm(total=plan.shape.num_layers, desc="quantizing", unit="layer", file=sys.stderr))
        bars[0].update(1)

    try:
        art = quantize(plan, args.out, model=args.model, quantizer=args.quantizer, calibration=args.calibration,
                       max_shard_size=args.max_shard_size, compute_device=args.compute_device,
                       max_memory=args.max_memory, progress=step)
    finally:
        for bar in bars:
            bar.close()
    policy = plan.options.policy
    if art.gguf:
        print(f"wrote {art.path} ({plan.mix}, {art.quantizer}; GGUF, INT4 as {plan.options.gguf_int4.value}; embedding "
              f"{policy.embed.value}, head {policy.head_precision.value}; {art.file_bytes / 2**20:.1f} MiB on disk) in "
              f"{time.perf_counter() - start:.1f}s {art.memory.describe()}")
        print(f"loads in: {', '.join(art.runtimes)} (model.gguf; ollama: `ollama create NAME -f {art.path}/Modelfile`)")
        return 0
    shards = sum(name.endswith(".safetensors") for name in art.files)
    print(f"wrote {art.path} ({plan.mix}, {art.quantizer}; embedding {policy.embed.value}, "
          f"head {policy.head_precision.value}; {art.dtype}; {art.file_bytes / 2**20:.1f} MiB on disk in "
          f"{shards} weights file{'s' if shards > 1 else ''}) in {time.perf_counter() - start:.1f}s "
          f"{art.memory.describe()}")
    print(f"loads in: {', '.join(art.runtimes)}")
    return 0


def run_generate(args: argparse.Namespace) -> int:
    from pathlib import Path

    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if (Path(args.artifact) / "model.gguf").is_file():  # llama.cpp, without torch in the process
        from lsaq.quantization.gguf_runtime import generate_gguf

        gen = generate_gguf(args.artifact, args.prompt, args.max_new_tokens)
        print(args.prompt + gen.text)
        print(f"\n{gen.tokens} tokens in {gen.seconds:.2f}s = {gen.tokens_per_second:.1f} tokens/s (llama.cpp); peak "
              f"resident memory {gen.peak_rss_bytes / 2**20:.0f} MiB", file=sys.stderr)
        return 0
    import psutil
    import torch

    from lsaq.quantization.reader import load_quantized

    dtypes = {"bfloat16": torch.bfloat16, "float32": torch.float32}
    if args.dtype not in dtypes:
        raise ValueError(f"unknown --dtype {args.dtype!r}; valid: {', '.join(dtypes)}")
    loaded = load_quantized(args.artifact, dtype=dtypes[args.dtype])
    tok = loaded.tokenizer
    ids = tok(args.prompt, return_tensors="pt")
    with torch.inference_mode():
        start = time.perf_counter()
        out = loaded.model.generate(**ids, max_new_tokens=args.max_new_tokens, do_sample=False,
                                    pad_token_id=tok.pad_token_id or tok.eos_token_id)
        seconds = time.perf_counter() - start
    new = out[0, ids["input_ids"].shape[1]:]
    print(args.prompt + tok.decode(new, skip_special_tokens=True))
    rss = psutil.Process().memory_info().rss / 2**20
    print(f"\n{len(new)} tokens in {seconds:.2f}s = {len(new) / seconds:.1f} tokens/s; resident memory {rss:.0f} MiB",
          file=sys.stderr)
    return 0
