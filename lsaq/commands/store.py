"""``lsaq publish`` (artifact -> store), ``lsaq ls`` (what a store holds) and ``lsaq download`` (verified).

The store is ``--store URI``, else ``$LSAQ_STORE``, else a local directory in lsaq's cache; an S3 store takes its
endpoint from ``--endpoint-url`` or ``AWS_ENDPOINT_URL_S3`` and its credentials from the standard AWS chain.
"""

from __future__ import annotations

import argparse
import sys

from lsaq.units import format_bytes, parse_bytes

MAX_WAIT_S = 7 * 24 * 3600  # --wait-for-memory: a week at most
STORE_HELP = "store: a directory, file:///path or s3://bucket/prefix (default: $LSAQ_STORE, else <lsaq cache>/store)"


def add_store_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--store", default=None, help=STORE_HELP)
    p.add_argument("--endpoint-url", default=None,
                   help="S3-compatible endpoint, e.g. http://127.0.0.1:9000 (default: AWS_ENDPOINT_URL_S3, else AWS)")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("publish", help="publish an artifact directory to the store as one build (atomic)")
    p.add_argument("artifact", help="artifact directory from `lsaq quantize`")
    p.add_argument("--report", default=None,
                   help="`lsaq eval` report of the artifact (report.json; its .md goes along; default: the "
                        "report.json inside the artifact directory, if any)")
    p.add_argument("--plots", default=None, help="folder of *.png plots to publish with the build (default: the "
                                                 "artifact's plots/ folder, if any)")
    add_store_args(p)
    p.set_defaults(func=run_publish)

    ls = sub.add_parser("ls", help="list the store's builds with their headline figures, newest first")
    ls.add_argument("--model", default=None, help="only this model (slug, hub id, path, or 'default')")
    ls.add_argument("--device", default=None, help="only this device (slug or profile name)")
    add_store_args(ls)
    ls.set_defaults(func=run_ls)

    d = sub.add_parser("download", help="download a build into a directory, verifying every file's sha256")
    d.add_argument("--model", required=True, help="model (slug, hub id, path, or 'default'; see `lsaq ls`)")
    d.add_argument("--device", required=True,
                   help="device (slug or profile name; see `lsaq ls`), or 'local': the most faithful build that "
                        "fits the memory free here now (freest NVIDIA GPU, else available RAM)")
    d.add_argument("--to", required=True, help="directory to create (must not exist or be empty)")
    d.add_argument("--build", default=None, help="build id (default: the latest complete build)")
    d.add_argument("--force", action="store_true", help="replace --to if it exists")
    d.add_argument("--max-memory", default=None, metavar="SIZE",
                   help="--device local: use at most this much memory (e.g. 300MiB), whatever is free")
    d.add_argument("--wait-for-memory", type=float, default=None, metavar="SECONDS",
                   help="--device local: first wait up to SECONDS for the smallest build to fit")
    d.add_argument("--runtime", default=None,
                   help="--device local: only builds this runtime runs (transformers, vllm, llama.cpp); default: "
                        "any runtime installed here (a GGUF build needs llama-cpp-python)")
    add_store_args(d)
    d.set_defaults(func=run_download)


def open_from_args(args: argparse.Namespace):
    from lsaq.store.stage import open_store

    return open_store(args.store, endpoint_url=args.endpoint_url)


def fail(command: str, e: Exception) -> int:
    """One clear line for a store failure (its messages name objects and endpoints, never credentials)."""
    print(f"lsaq {command}: error: {e}", file=sys.stderr)
    return 2


def run_publish(args: argparse.Namespace) -> int:
    from lsaq.store.backend import StoreError
    from lsaq.store.stage import publish

    try:
        store = open_from_args(args)
        result = publish(store, args.artifact, report=args.report, plots=args.plots)
    except StoreError as e:
        return fail("publish", e)
    m = result.manifest
    print(f"{publish_state(result)}: {m.model_slug} {m.revision} on {m.device_slug}, build {m.build_id} "
          f"({len(m.files)} files, {format_bytes(m.file_bytes)}; {format_bytes(result.uploaded_bytes)} uploaded in "
          f"{result.seconds:.1f}s)")
    print(result.uri)
    return 0


def publish_state(result) -> str:
    """What a publish did, in words: created the build, found it already there, or lost the race to create it to a
    concurrent publish of the same files (after uploading some of them itself: the same bytes)."""
    if result.created:
        return "published"
    if result.uploaded_bytes == 0:
        return "already published (identical build; nothing uploaded)"
    return "published first by a concurrent run (identical build; what this run uploaded is the same bytes)"


def headline(m) -> list[str]:
    """One row of `lsaq ls`."""
    bits = m.avg_bits.get("quantizable_linears")  # the plan's average over the linears it chose precisions for
    ev = "-"
    if m.evaluation:
        parts = []
        ppl = (m.evaluation.get("metrics") or {}).get("perplexity")
        if ppl and ppl.get("quantized") is not None:
            parts.append(f"ppl {ppl['quantized']:.2f}")
        fid = m.evaluation.get("fidelity")
        if fid and fid.get("kl_mean") is not None:
            parts.append(f"KL {fid['kl_mean']:.4f}, top1 {fid['top1_agreement']:.3f}")
        ev = "; ".join(parts) or "-"
    return [m.model_slug, m.revision, m.device_slug, m.build_id, m.published_at.replace("+00:00", "Z"),
            f"{bits:.2f}" if isinstance(bits, (int, float)) else "?", str(m.context), format_bytes(m.weights_bytes),
            format_bytes(m.required_bytes), ev]


def run_ls(args: argparse.Namespace) -> int:
    from lsaq.store.backend import StoreError
    from lsaq.store.stage import list_builds

    try:
        store = open_from_args(args)
        builds = list_builds(store, model=args.model, device=args.device)
    except StoreError as e:
        return fail("ls", e)
    if not builds:
        print(f"{store.uri}: no builds" + (" match" if args.model or args.device else ""))
        return 0
    rows = [["model", "revision", "device", "build", "published", "avg bits", "context", "weights", "memory needed",
             "evaluation"]] + [headline(m) for m in builds]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    print(f"{store.uri}: {len(builds)} build{'s' if len(builds) != 1 else ''}")
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    return 0


def run_download(args: argparse.Namespace) -> int:
    from lsaq.planning.devices import LOCAL
    from lsaq.runtime import Runtime
    from lsaq.store.backend import StoreError
    from lsaq.store.select import describe, download_local
    from lsaq.store.stage import download

    local = args.device == LOCAL
    if not local and (args.max_memory is not None or args.wait_for_memory is not None or args.runtime is not None):
        raise ValueError(f"--max-memory, --wait-for-memory and --runtime apply to --device {LOCAL}, not "
                         f"{args.device!r}")
    if args.runtime is not None:
        Runtime.parse(args.runtime)  # an unknown runtime is named before the store is read
    if local and args.build is not None:
        raise ValueError(f"--device {LOCAL} chooses the build; give a device name with --build {args.build}")
    limit = parse_bytes(args.max_memory, what="--max-memory") if args.max_memory is not None else None
    if limit == 0:
        raise ValueError("--max-memory must be positive, got '0'")
    wait = args.wait_for_memory
    if wait is not None and not 0 <= wait <= MAX_WAIT_S:
        raise ValueError(f"--wait-for-memory must be 0 to {MAX_WAIT_S} seconds, got {wait:g}")
    try:
        store = open_from_args(args)
        if local:
            chosen, result = download_local(store, args.to, args.model, max_memory=limit, wait_seconds=wait,
                                            force=args.force, runtime=args.runtime)
            capped = f" ({chosen.available.notes})" if limit is not None else ""
            print(f"{chosen.available.describe()}{capped}: chose {describe(chosen.build)}")
        else:
            result = download(store, args.to, model=args.model, device=args.device, build=args.build,
                              force=args.force)
    except StoreError as e:
        return fail("download", e)
    m = result.manifest
    print(f"downloaded build {m.build_id} ({m.model_slug} {m.revision} on {m.device_slug}; {len(m.files)} files, "
          f"{format_bytes(m.file_bytes)}, every sha256 verified) into {result.path} in {result.seconds:.1f}s")
    return 0
