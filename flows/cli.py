"""``lsaq-build``: run the build flow from a shell and print where the builds are.

Parses the flow's parameters into one :class:`~flows.options.BuildOptions`, checks them before Prefect is imported
(a bad value: one line naming it, exit code 2), calls :func:`flows.build.build` once (on Prefect's local API unless
``PREFECT_API_URL`` names a server) and prints one row per device.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from flows.options import (
    DEFAULT_GROUP_SIZE,
    DEFAULT_MEASURE_SAMPLES,
    DEFAULT_QUANTIZER,
    DEFAULT_STRATEGY,
    BuildOptions,
)
from lsaq.choices import OptionError

PREFECT_ENV = {
    # lsaq's own notices (which calibration source, which device) go through Prefect's handlers, like its own logs;
    # set before Prefect is imported, which configures logging once.
    "PREFECT_LOGGING_EXTRA_LOGGERS": "lsaq",
    # Without PREFECT_API_URL the run starts Prefect's temporary local server; on a fresh PREFECT_HOME its database
    # migrations took 15-25 s on 2 busy cores here, past Prefect's 20 s default, and the run failed before starting.
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
}

# flags whose name is not "--" + the option's name with dashes
FLAGS = {"devices": "--device (repeated)", "device": "--device"}


def local_paths(out: str) -> tuple[str, str]:
    """``(store, work)`` under one output directory (``--out``, as ``make run`` uses)."""
    root = Path(out).resolve()
    return str(root / "store"), str(root / "work")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lsaq-build", description=__doc__.splitlines()[0])
    p.add_argument("--model", help="local directory, .gguf or hub id (default: the embedded default model)")
    p.add_argument("--device", action="append", dest="devices", metavar="NAME",
                   help="a device profile (repeat for several; see `lsaq devices`)")
    p.add_argument("--budget", help="an explicit memory budget, e.g. 300MiB")
    p.add_argument("--device-file", help="a YAML file of extra device profiles")
    p.add_argument("--context", type=int, default=4096, help="context length every plan reserves (default 4096)")
    p.add_argument("--strategy", default=DEFAULT_STRATEGY,
                   help=f"measured, lsaq, optimal, or fp16/int8/int4 (default {DEFAULT_STRATEGY})")
    p.add_argument("--quantizer", default=DEFAULT_QUANTIZER,
                   help=f"gptq or rtn (same bytes; default {DEFAULT_QUANTIZER})")
    p.add_argument("--group-size", default=DEFAULT_GROUP_SIZE,
                   help="INT4 group size, or 'auto' (the default): with --strategy measured, per device, per-channel "
                        "or the largest size dividing every input width, whichever measures better; else per-channel")
    p.add_argument("--measure-samples", type=int, default=DEFAULT_MEASURE_SAMPLES,
                   help=f"calibration sequences --strategy measured measures the layer loss on "
                        f"(default {DEFAULT_MEASURE_SAMPLES})")
    p.add_argument("--compute-device", default="auto", metavar="DEVICE",
                   help="where importance, quantization and evaluation compute: auto (default: the NVIDIA GPU "
                        "with the most free memory that holds a layer, else the CPU), cpu, or cuda:N")
    p.add_argument("--runtime", default=None,
                   help="what runs every build: transformers, vllm or llama.cpp (a GGUF file); default: each "
                        "device's own (lsaq devices)")
    p.add_argument("--gguf-int4", default="q4_k",
                   help="how GGUF builds store INT4: q4_k (default), q5_k, q3_k (llama.cpp's quantizer), or "
                        "q4_0/q4_1, which keep --quantizer's codes (GPTQ's)")
    p.add_argument("--gguf-int8", default="q8_0",
                   help="how GGUF builds store INT8: q8_0 (default; keeps --quantizer's codes) or q6_k")
    p.add_argument("--method", default="cosine", help="importance method: cosine, jaccard or sensitivity")
    p.add_argument("--k", type=int, default=1)
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--calib", help="calibration source (a text/JSONL file, a dataset name, or generated)")
    p.add_argument("--ppl", action="store_true", help="also measure perplexity in each build's evaluation")
    p.add_argument("--fidelity-windows", type=int, default=8)
    p.add_argument("--store", help="store URI (default $LSAQ_STORE or the local store)")
    p.add_argument("--work", help="this machine's scratch directory")
    p.add_argument("--out", help="put the store and scratch directories under OUT (instead of --store/--work)")
    return p


def flag(option: str) -> str:
    """The command-line flag of a :class:`BuildOptions` field."""
    return FLAGS.get(option, "--" + option.replace("_", "-"))


def check_prefect_home() -> None:
    """Without ``PREFECT_API_URL`` the run starts Prefect's temporary server on a database under ``PREFECT_HOME``
    (default ``~/.prefect``): refuse one Prefect could not create, instead of its traceback after the start timeout."""
    if os.environ.get("PREFECT_API_URL"):
        return
    home = Path(os.environ.get("PREFECT_HOME") or "~/.prefect").expanduser()
    if home.exists():
        if not home.is_dir() or not os.access(home, os.W_OK | os.X_OK):
            raise ValueError(f"PREFECT_HOME {str(home)!r} is not a writable directory; point PREFECT_HOME at one "
                             f"(or PREFECT_API_URL at a Prefect server)")
    elif not home.parent.is_dir() or not os.access(home.parent, os.W_OK | os.X_OK):
        raise ValueError(f"PREFECT_HOME {str(home)!r} cannot be created: {str(home.parent)!r} is not a writable "
                         f"directory; create it or point PREFECT_HOME elsewhere (or PREFECT_API_URL at a server)")


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if args.out and (args.store or args.work):
        p.error("give --out, or --store and --work, not both")
    store, work = local_paths(args.out) if args.out else (args.store, args.work)
    options = BuildOptions(model=args.model, devices=tuple(args.devices) if args.devices else None,
                           budget=args.budget, device_file=args.device_file, context=args.context,
                           strategy=args.strategy, method=args.method, k=args.k, samples=args.samples,
                           seq_len=args.seq_len, calib=args.calib, ppl=args.ppl,
                           fidelity_windows=args.fidelity_windows, store=store, work=work, quantizer=args.quantizer,
                           group_size=args.group_size, measure_samples=args.measure_samples,
                           compute_device=args.compute_device, runtime=args.runtime, gguf_int4=args.gguf_int4,
                           gguf_int8=args.gguf_int8)
    try:
        options.check()  # before Prefect starts: a bad value is one line, not a flow run's traceback
        check_prefect_home()
    except OptionError as e:
        print(f"lsaq-build: error: {e.render(flag)}", file=sys.stderr)
        return 2
    except ValueError as e:
        print(f"lsaq-build: error: {e}", file=sys.stderr)
        return 2

    for name, value in PREFECT_ENV.items():
        os.environ.setdefault(name, value)
    from flows.build import build  # Prefect: imported once the options are known to be good
    from tasks.summary import BuildFailed, format_table

    logging.getLogger("lsaq").setLevel(logging.INFO)
    try:
        summary = build(**options.params())
    except BuildFailed as e:
        print(format_table(e.summary))
        print(f"lsaq-build: {e}", file=sys.stderr)
        return 1
    except ValueError as e:
        print(f"lsaq-build: error: {e}", file=sys.stderr)
        return 2
    print(f"{summary.model} {summary.revision}; importance {summary.importance}")
    print(format_table(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
