"""``lsaq-serve``: serve the deployments from one machine, without a work pool.

Creates ``lsaq/build`` (run it with ``prefect deployment run lsaq/build --param device=rtx3060 --watch``) and,
given a watch config, ``lsaq-watch/scheduled`` on a cron schedule; then runs their flow runs in this process
until stopped (Ctrl-C / SIGTERM). ``PREFECT_API_URL`` names the server. The store every run uses is ``--store``
(else ``$LSAQ_STORE`` where the runs execute, else the local store).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

# lsaq's own notices go through Prefect's handlers (and so to the UI); set before Prefect configures logging.
os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "lsaq")

from prefect import serve  # noqa: E402

from flows.build import build  # noqa: E402
from flows.watch import watch  # noqa: E402

DEFAULT_CRON = "0 3 * * *"  # every night at 03:00 (the server's time zone: UTC unless configured)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lsaq-serve", description=__doc__.splitlines()[0])
    p.add_argument("--store", help="store URI for every run (default: $LSAQ_STORE where the run executes)")
    p.add_argument("--watch-config", metavar="YAML",
                   help="serve lsaq-watch/scheduled too, checking the models of this config (see tasks/watch.py)")
    p.add_argument("--cron", default=DEFAULT_CRON, help=f"the watch schedule (default {DEFAULT_CRON!r})")
    p.add_argument("--limit", type=int, default=None, help="at most this many flow runs at once in this process")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.getLogger("lsaq").setLevel(logging.INFO)
    defaults = {"store": args.store} if args.store else {}
    deployments = [build.to_deployment(name="build", parameters=defaults, tags=["lsaq"],
                                       description="Build a model for one or more devices (see flows/build.py)")]
    if args.watch_config:
        deployments.append(watch.to_deployment(
            name="scheduled", cron=args.cron, tags=["lsaq"], parameters={"config": args.watch_config, **defaults},
            description="Rebuild the models of the watch config whose revision changed"))
    serve(*deployments, limit=args.limit)
    return 0


if __name__ == "__main__":
    sys.exit(main())
