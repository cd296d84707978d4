"""The ``lsaq`` command line. Each module in :mod:`lsaq.commands` adds its subcommands via ``register``."""

from __future__ import annotations

import argparse
import importlib
import logging
import pkgutil
import sys

import lsaq.commands as commands
from lsaq.records import RecordError
from lsaq.version import __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lsaq", description="Layer-Specific Adaptive Quantization")
    parser.add_argument("--version", action="version", version=f"lsaq {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debugging details too")
    parser.add_argument("-q", "--quiet", action="store_true", help="log only warnings and errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for mod in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        importlib.import_module(f"{commands.__name__}.{mod.name}").register(sub)
    return parser


class StderrHandler(logging.StreamHandler):
    """Writes to ``sys.stderr`` as it is when a record is emitted, not as it was when the CLI started (a caller
    that swaps or closes its stderr after ``main`` returns, like a test harness, keeps working logs)."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # lsaq's own notices (which calibration source was used, which device was detected) show by default;
    # other libraries only warn.
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s",
                        handlers=[StderrHandler()])
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.getLogger("lsaq").setLevel(level)
    try:
        return int(args.func(args) or 0)
    except (ValueError, RecordError, FileNotFoundError) as e:
        # Bad input: one clear line, no traceback. Writers are atomic, so nothing half-written is left.
        print(f"lsaq {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
