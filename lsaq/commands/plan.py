"""``lsaq devices`` and ``lsaq plan``: device profiles, live detection, and per-device precision plans."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    d = sub.add_parser("devices", help="list device profiles (catalog and --device-file), or --detect this machine")
    d.add_argument("--device-file", default=None, help="YAML/JSON file with extra device profiles")
    d.add_argument("--detect", action="store_true", help="show what NVML and psutil see on this machine now")
    d.set_defaults(func=run_devices)

    p = sub.add_parser("plan", help="choose FP16/INT8/INT4 per decoder layer so the model fits a device")
    p.add_argument("--importance", default=None,
                   help="importance record from `lsaq score`, or a JSON list of per-layer importances "
                        "(omitted: every layer equally important, earlier layers win ties)")
    p.add_argument("--config", default=None,
                   help="model config: a shipped name (llama-2-7b, llama-2-13b, llama-3-8b, llama-3-70b, mistral-7b), "
                        "a config.json or a model directory (default: the importance record's model)")
    p.add_argument("--device", default=None, help="device profile name, or `local` for this machine (see `lsaq devices`)")
    p.add_argument("--budget", default=None, help="explicit budget instead of a device, all of it usable (no reserve): 6GiB, 180MiB, 6GB, 6e9")
    p.add_argument("--device-file", default=None, help="YAML/JSON file with extra device profiles")
    p.add_argument("--context", type=int, default=4096, help="context length the KV cache must hold (default 4096)")
    p.add_argument("--batch", type=int, default=1, help="sequences held at once (default 1)")
    p.add_argument("--strategy", default="lsaq",
                   help="lsaq (default), optimal, measured (needs --loss), or a uniform baseline fp16/int8/int4")
    p.add_argument("--loss", default=None, metavar="JSON",
                   help="a layer-loss record from `lsaq measure`: --strategy measured minimises its summed loss")
    p.add_argument("--allowed", default="fp16,int8,int4", help="precisions a layer may get (default fp16,int8,int4)")
    p.add_argument("--group-size", default=None,
                   help="INT4 group size (default: per-channel scales), or 'auto' with --strategy measured: "
                        "per-channel or the largest size dividing every input width, whichever the record predicts "
                        "better")
    p.add_argument("--embed-precision", default="fp16", help="token embedding: fp16 (default), int8, int4; on a tied model, quantizing either side unties them "
                        "(both matrices stored)")
    p.add_argument("--head-precision", default=None, help="LM head: fp16, int8, int4 (default: as the embedding)")
    p.add_argument("--runtime", default=None,
                   help="what runs the build: transformers, vllm, llama.cpp (a GGUF file); default: the device's")
    p.add_argument("--gguf-int4", default="q4_k",
                   help="INT4 in a GGUF build: q4_k (rows of 256; else q4_1, default), q4_1, q4_0, q5_k (else q5_1), "
                        "q3_k (else q4_0)")
    p.add_argument("--gguf-int8", default="q8_0",
                   help="INT8 in a GGUF build: q8_0 (default), q6_k (rows of 256; else q8_0)")
    p.add_argument("--wait-for-memory", type=float, default=None, metavar="SECONDS",
                   help="with --device local: poll until the plan's minimum requirement is free, up to SECONDS")
    p.add_argument("--compare", action="store_true", help="also print every strategy side by side (fits or not)")
    p.add_argument("--out", default=None, help="write the plan JSON here")
    p.set_defaults(func=run_plan)


# ------------------------------------------------------------------------------------------- devices


def run_devices(args: argparse.Namespace) -> int:
    from lsaq.planning.devices import list_devices
    from lsaq.units import format_bytes

    if args.detect:
        from lsaq.planning.detect import detect

        d = detect()
        print(f"NVML: {d.nvml_status}")
        for note in d.notes:
            print(f"  {note}")
        for g in d.gpus:
            print(f"  GPU {g.index} {g.name}: {format_bytes(g.free)} free of {format_bytes(g.total)} ({g.uuid})")
        print(f"system RAM: {format_bytes(d.system_available)} available of {format_bytes(d.system_total)}"
              + (" (Jetson: unified memory)" if d.unified else ""))
        prof = d.profile()
        print(f"local -> {prof.describe()} [{prof.origin}]")
        return 0
    rows = [(p.name, p.kind.value if p.kind else "-", p.runs.value, format_bytes(p.memory), format_bytes(p.reserve),
             format_bytes(p.usable), p.notes) for p in list_devices(args.device_file)]
    rows.append(("local", "live", "transformers", "-", "-", "-",
                 "this machine, detected when used (lsaq devices --detect)"))
    head = ("name", "kind", "runtime", "memory", "reserve", "usable", "notes")
    widths = [max(len(r[i]) for r in rows + [head]) for i in range(6)]
    for r in [head] + rows:
        print("  ".join(f"{c:<{w}}" if i in (0, 1, 2) else f"{c:>{w}}" for i, (c, w) in enumerate(zip(r, widths)))
              + "  " + r[6])
    return 0


# ---------------------------------------------------------------------------------------------- plan


def build_options(args: argparse.Namespace):
    from lsaq.planning.memory import WeightPolicy
    from lsaq.precision import AUTO_GROUP, parse_group_size
    from lsaq.planning.planner import PlanOptions

    allowed = tuple(s.strip() for s in args.allowed.split(",") if s.strip())
    group = parse_group_size(args.group_size)
    policy = WeightPolicy(group_size=None if group == AUTO_GROUP else group, embed=args.embed_precision,
                          head=args.head_precision)
    return PlanOptions(context=args.context, batch=args.batch, strategy=args.strategy, allowed=allowed, policy=policy,
                       runtime=args.runtime, gguf_int4=args.gguf_int4, gguf_int8=args.gguf_int8)


def run_plan(args: argparse.Namespace) -> int:
    from lsaq.precision import AUTO_GROUP, parse_group_size
    from lsaq.planning.stage import DeviceRequest, compare_strategies, plan

    options = build_options(args)  # bad option values fail before any file is read
    device = DeviceRequest(name=args.device, budget=args.budget, device_file=args.device_file,
                           wait_seconds=args.wait_for_memory)
    inputs = {"importance": args.importance, "config": args.config, "options": options, "loss": args.loss}
    auto = parse_group_size(args.group_size) == AUTO_GROUP
    result = None
    if args.compare:  # every strategy; the chosen one's plan is reused, so inputs and device are read once
        comparison = compare_strategies(device, **inputs)
        print(format_comparison(comparison))
        print()
        result = None if auto else next(r.plan for r in comparison.rows if r.strategy is options.strategy)
        if result is not None and args.out:
            result.save(args.out)
    if result is None:  # no comparison, or the chosen strategy does not fit: plan() says what would help
        result = plan(device, **inputs, out=args.out, group_size=AUTO_GROUP if auto else None)
    print(format_plan(result))
    if args.out:
        print(f"wrote {args.out} (plan {result.id[:12]})")
    return 0


# ------------------------------------------------------------------------------------------ tables


def format_plan(plan) -> str:
    from lsaq.methods import ranking
    from lsaq.units import format_bytes

    o, bd, m = plan.options, plan.breakdown, plan.model
    rank = {layer: r for r, layer in enumerate(ranking(plan.importance), 1)}
    untied = o.policy.unties(plan.shape)
    head = (o.policy.head_precision.value + (" (untied: both stored)" if untied else "")
            if plan.shape.lm_head or untied else "tied")
    group = f"int4 group size {o.policy.group_size}" if o.policy.group_size else "int4 per-channel"
    if o.gguf:
        group = f"GGUF for llama.cpp, int8 {o.gguf_int8.value}, int4 {o.gguf_int4.value}"
    elif o.runtime is not None and o.runtime.value != "transformers":
        group += f", runtime {o.runtime.value}"
    lines = [
        f"plan: {m.name} ({m.model_type}, {plan.shape.num_layers} layers) on {plan.device.describe()}",
        f"strategy {o.strategy.value}, context {o.context} x batch {o.batch}, allowed {'/'.join(p.value for p in o.allowed)}, "
        f"{group}, embedding {o.policy.embed.value}, head {head}",
        f"importance: {plan.importance_ref.method} [{plan.importance_ref.id[:12]}]",
        "",
        f"{'layer':>5} {'rank':>4} {'importance':>10}  {'precision':<9} {'bytes':>12}",
    ]
    for i, (p, w, n) in enumerate(zip(plan.precisions, plan.importance, bd.layers)):
        lines.append(f"{i:>5} {rank[i]:>4} {w:>10.4f}  {p.value:<9} {format_bytes(n):>12}")
    comps = [("decoder linears", bd.layer_linears), ("decoder norms", bd.layer_norms), ("embeddings", bd.embeddings),
             ("lm head", bd.lm_head), ("final norm", bd.final_norm), ("= weights", bd.weights),
             ("kv cache", bd.kv_cache), ("workspace", bd.workspace), ("reserve", bd.reserve), ("= total", bd.total)]
    lines += [""] + [f"{name:<16} {format_bytes(n):>12} {n:>16,}" for name, n in comps]
    bits, c = plan.avg_bits, plan.counts
    lines += [
        f"{'device memory':<16} {format_bytes(plan.device.memory):>12} {plan.device.memory:>16,}",
        f"{'headroom':<16} {format_bytes(plan.headroom):>12} {plan.headroom:>16,}",
        f"layers: fp16 {c['fp16']}, int8 {c['int8']}, int4 {c['int4']}; avg bits/weight {bits['quantizable_linears']:.3f} "
        f"(decoder linears), {bits['all_weights']:.3f} (all weights)",
        f"objective {plan.objective:.4f} of {sum(plan.importance):.4f} ({plan.solver.method})"
        + (f", LP bound {plan.solver.upper_bound:.4f}" if plan.solver.upper_bound is not None else "")
        + (f"; predicted loss {plan.predicted_loss:.4g} nats (measured, summed)" if plan.loss is not None else ""),
    ]
    return "\n".join(lines)


def format_comparison(comparison) -> str:
    """Markdown table of a :class:`lsaq.planning.stage.Comparison`."""
    from lsaq.units import format_bytes

    o = comparison.options
    lines = [f"strategies for {comparison.model.name} on {comparison.device.describe()}, context {o.context} x batch {o.batch}:",
             "| strategy | fits | fp16/int8/int4 | avg bits (linears / all) | weights | needs (weights+KV+workspace) | headroom | objective |",
             "|---|---|---|---|---|---|---|---|"]
    for r in comparison.rows:
        if r.plan is None:
            lines.append(f"| {r.strategy.value} | no | - | - | - | at least {format_bytes(r.required)} | "
                         f"{format_bytes(r.headroom)} | - |")
            continue
        p, c = r.plan, r.plan.counts
        lines.append(f"| {r.strategy.value} | yes | {c['fp16']}/{c['int8']}/{c['int4']} | "
                     f"{p.avg_bits['quantizable_linears']:.2f} / {p.avg_bits['all_weights']:.2f} | "
                     f"{format_bytes(p.breakdown.weights)} | {format_bytes(r.required)} | {format_bytes(r.headroom)} | "
                     f"{p.objective / (sum(p.importance) or 1):.4f} |")
    return "\n".join(lines)
