"""``lsaq devices`` and ``lsaq plan``: device profiles, live detection, and per-device precision plans."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


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
    p.add_argument("--strategy", default="lsaq", help="lsaq (default), optimal, or a uniform baseline fp16/int8/int4")
    p.add_argument("--allowed", default="fp16,int8,int4", help="precisions a layer may get (default fp16,int8,int4)")
    p.add_argument("--group-size", type=int, default=None, help="INT4 group size (default: per-channel scales)")
    p.add_argument("--embed-precision", default="fp16", help="token embedding (and tied head): fp16 (default), int8, int4")
    p.add_argument("--head-precision", default=None, help="untied LM head: fp16, int8, int4 (default: as the embedding)")
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
    rows = [(p.name, p.kind.value if p.kind else "-", format_bytes(p.memory), format_bytes(p.reserve),
             format_bytes(p.usable), p.notes) for p in list_devices(args.device_file)]
    rows.append(("local", "live", "-", "-", "-", "this machine, detected when used (lsaq devices --detect)"))
    head = ("name", "kind", "memory", "reserve", "usable", "notes")
    widths = [max(len(r[i]) for r in rows + [head]) for i in range(5)]
    for r in [head] + rows:
        print("  ".join(f"{c:<{w}}" if i in (0, 1) else f"{c:>{w}}" for i, (c, w) in enumerate(zip(r, widths))) + "  " + r[5])
    return 0


# ---------------------------------------------------------------------------------------------- plan


def _shipped_configs() -> dict[str, Path]:
    from importlib import resources

    root = resources.files("lsaq").joinpath("data/configs")
    return {Path(str(f)).stem: Path(str(f)) for f in root.iterdir() if str(f).endswith(".json")}


def load_config(spec: str) -> tuple[dict[str, Any], str, str]:
    """``(config dict, model id, source path)`` for a shipped name, a config.json, or a model directory."""
    path = Path(spec).expanduser()
    if path.is_dir():
        path = path / "config.json"
    shipped = _shipped_configs()
    if not path.is_file():
        if spec not in shipped:
            raise ValueError(f"--config {spec!r} is neither a file, a model directory nor a shipped config; "
                             f"shipped configs: {', '.join(sorted(shipped))}")
        path = shipped[spec]
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"--config {path}: not a readable JSON config ({e})") from e
    if not isinstance(config, dict):
        raise ValueError(f"--config {path}: expected a JSON object")
    return config, (spec if spec in shipped and not Path(spec).exists() else str(path)), str(path)


def load_importance(path: str) -> tuple[list[float], dict[str, Any], Any]:
    """``(values, reference, ModelInfo or None)`` from an importance record or a bare JSON list."""
    from lsaq.importance.scoring import LayerImportance
    from lsaq.records import canonical_json, sha256_hex

    try:
        obj = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ValueError(f"--importance {path}: no such file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"--importance {path}: not valid JSON ({e})") from e
    if isinstance(obj, dict) and "schema" in obj:
        rec = LayerImportance.load(path)
        return list(rec.importance), {"id": rec.id, "method": rec.method, "k": rec.k, "source": str(path)}, rec.model
    values = obj.get("importance") if isinstance(obj, dict) else obj
    if not isinstance(values, list) or not values or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        raise ValueError(f"--importance {path}: expected an lsaq importance record, a JSON list of numbers, "
                         "or an object with an 'importance' list")
    values = [float(v) for v in values]
    return values, {"id": sha256_hex(canonical_json(values)), "method": "vector", "k": None, "source": str(path)}, None


def _model_identity(config: dict[str, Any], model_id: str, source: str, info: Any) -> dict[str, Any]:
    from lsaq.records import canonical_json, sha256_hex

    ident = {
        "id": model_id, "source": source, "revision": None, "content_hash": None,
        "config_hash": sha256_hex(canonical_json(config)),
        "architecture": (config.get("architectures") or [None])[0], "model_type": config.get("model_type"),
    }
    if info is not None:  # the weights the importance was measured on
        ident.update(id=info.id, source=info.source, revision=info.revision, content_hash=info.content_hash,
                     architecture=info.architecture)
    return ident


def build_options(args: argparse.Namespace):
    from lsaq.planning.memory import WeightPolicy
    from lsaq.planning.planner import PlanOptions

    allowed = tuple(s.strip() for s in args.allowed.split(",") if s.strip())
    policy = WeightPolicy(group_size=args.group_size, embed=args.embed_precision, head=args.head_precision)
    return PlanOptions(context=args.context, batch=args.batch, strategy=args.strategy, allowed=allowed, policy=policy)


def run_plan(args: argparse.Namespace) -> int:
    from lsaq.planning.devices import LOCAL, budget_profile, resolve_device
    from lsaq.planning.planner import budget_for, make_plan
    from lsaq.models.families import model_shape

    options = build_options(args)  # bad option values fail before any file is read
    if (args.device is None) == (args.budget is None):
        raise ValueError("give exactly one of --device NAME (see `lsaq devices`) or --budget SIZE (e.g. 6GiB)")
    if args.wait_for_memory is not None and args.device != LOCAL:
        raise ValueError("--wait-for-memory only applies to --device local (memory is polled on this machine)")
    values, ref, info = load_importance(args.importance) if args.importance else (None, None, None)
    if args.config is not None:
        config, model_id, source = load_config(args.config)
    elif info is not None:
        config, model_id, source = info.config, info.id, info.source
    else:
        raise ValueError("give --config (a shipped name such as llama-2-7b, or a config.json) or an --importance "
                         "record from `lsaq score`; a bare importance list carries no model")
    shape = model_shape(config)
    if values is None:
        values, ref = [1.0] * shape.num_layers, {"id": "none", "method": "uniform", "k": None}
        print(f"note: no --importance given: all {shape.num_layers} layers weigh 1.0 (earlier layers win ties)")
    model = _model_identity(config, model_id, source, info if args.config is None else None)
    if args.budget is not None:
        device = budget_profile(args.budget)
    elif args.device == LOCAL and args.wait_for_memory is not None:
        from lsaq.planning.detect import wait_for_memory

        levels = [options.strategy.uniform] if options.strategy.uniform else list(options.allowed)
        need = budget_for(shape, options).min_required(levels, shape.num_layers)
        device = wait_for_memory(need, args.wait_for_memory)
    else:
        device = resolve_device(args.device, args.device_file)
    if args.compare:
        print(format_comparison(shape, values, device, options, model, ref))
        print()
    plan = make_plan(shape, values, device, options, model=model, importance_ref=ref)
    print(format_plan(plan))
    if args.out:
        plan.save(args.out)
        print(f"wrote {args.out} (plan {plan.id[:12]})")
    return 0


# ------------------------------------------------------------------------------------------ tables


def format_plan(plan) -> str:
    from lsaq.methods import ranking
    from lsaq.units import format_bytes

    o, bd, m = plan.options, plan.breakdown, plan.model
    rank = {layer: r for r, layer in enumerate(ranking(plan.importance), 1)}
    group = f"int4 group size {o.policy.group_size}" if o.policy.group_size else "int4 per-channel"
    lines = [
        f"plan: {m['id']} ({m['model_type']}, {plan.shape.num_layers} layers) on {plan.device.describe()}",
        f"strategy {o.strategy.value}, context {o.context} x batch {o.batch}, allowed {'/'.join(p.value for p in o.allowed)}, "
        f"{group}, embedding {o.policy.embed.value}, head {o.policy.head_precision.value if plan.shape.lm_head else 'tied'}",
        f"importance: {plan.importance_ref.get('method')} [{str(plan.importance_ref.get('id'))[:12]}]",
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
        + (f", LP bound {plan.solver.upper_bound:.4f}" if plan.solver.upper_bound is not None else ""),
    ]
    return "\n".join(lines)


def comparison_rows(shape, values, device, options, model, ref) -> list[dict[str, Any]]:
    """Every strategy on the same inputs: fits, counts, bytes, average bits, objective (or the minimum needed)."""
    from lsaq.planning.planner import PlanOptions, Strategy, budget_for, make_plan

    rows = []
    for s in Strategy:
        opts = PlanOptions(options.context, options.batch, s, options.allowed, options.policy, options.kv_bytes, options.quality)
        try:
            plan = make_plan(shape, values, device, opts, model=model, importance_ref=ref)
        except ValueError:
            levels = [s.uniform] if s.uniform else list(options.allowed)
            rows.append({"strategy": s.value, "fits": False, "required": budget_for(shape, opts).min_required(levels, shape.num_layers)})
            continue
        bd = plan.breakdown
        rows.append({"strategy": s.value, "fits": True, "counts": plan.counts, "weights": bd.weights, "required": bd.required,
                     "headroom": plan.headroom, "bits": plan.avg_bits["quantizable_linears"],
                     "bits_all": plan.avg_bits["all_weights"], "objective": plan.objective / (sum(values) or 1)})
    return rows


def format_comparison(shape, values, device, options, model, ref) -> str:
    from lsaq.units import format_bytes

    lines = [f"strategies for {model['id']} on {device.describe()}, context {options.context} x batch {options.batch}:",
             "| strategy | fits | fp16/int8/int4 | avg bits (linears / all) | weights | needs (weights+KV+workspace) | headroom | objective |",
             "|---|---|---|---|---|---|---|---|"]
    for r in comparison_rows(shape, values, device, options, model, ref):
        if not r["fits"]:
            lines.append(f"| {r['strategy']} | no | - | - | - | at least {format_bytes(r['required'])} | "
                         f"{format_bytes(device.usable - r['required'])} | - |")
            continue
        c = r["counts"]
        lines.append(f"| {r['strategy']} | yes | {c['fp16']}/{c['int8']}/{c['int4']} | {r['bits']:.2f} / {r['bits_all']:.2f} | "
                     f"{format_bytes(r['weights'])} | {format_bytes(r['required'])} | {format_bytes(r['headroom'])} | {r['objective']:.4f} |")
    return "\n".join(lines)
