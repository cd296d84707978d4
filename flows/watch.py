"""The watch flow: rebuild what changed. Scheduled (cron) beside ``lsaq/build``.

For every model of a watch config (:mod:`tasks.watch`) it finds the current revision (the hub's commit when
online, the weights' content hash for local files), compares it with the builds in the store and starts
``lsaq/build`` (``run_deployment``) only for the devices with no build of that revision and no unfinished build
run. An unchanged model is a no-op; a model that cannot be reached is reported and skipped; the others go on.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from prefect import flow
from prefect.artifacts import create_table_artifact
from prefect.futures import wait

from lsaq.store.stage import default_store_uri
from tasks.watch import ModelCheck, check_model, in_flight, read_watch_config, trigger_build

BUILD_DEPLOYMENT = "lsaq/build"


@flow(name="lsaq-watch", persist_result=False)
def watch(config: str, store: str | None = None, deployment: str = BUILD_DEPLOYMENT,
          build_parameters: dict[str, Any] | None = None) -> list[ModelCheck]:
    """Check every model of the watch ``config`` against ``store`` and trigger ``deployment`` for what is stale.

    ``build_parameters``: extra parameters for each triggered build (``context``, ``samples``, ...).
    """
    targets = read_watch_config(config)
    store = store or default_store_uri()
    checks = [check_model.submit(t, store) for t in targets]
    wait(checks)
    results = []
    for target, future in zip(targets, checks):
        check = future.result()
        if check.error is None and check.stale:
            busy = in_flight(target, deployment)
            check = dataclasses.replace(check, stale=tuple(d for d in check.stale if d not in busy), in_flight=busy)
        if check.error is None and check.stale:
            state = trigger_build(target, check, store, deployment, build_parameters, return_state=True)
            check = state.result() if state.is_completed() else dataclasses.replace(
                check, error=f"could not start {deployment}: {state.message}")
        results.append(check)
    create_table_artifact(key="lsaq-watch", description=f"models checked against {store}", table=[
        {"model": c.model, "revision": c.revision or "-", "built": ", ".join(c.built) or "-",
         "stale": ", ".join(c.stale) or "-", "building": ", ".join(c.in_flight) or "-",
         "run": c.triggered or "-", "error": c.error or "-"} for c in results])
    return results
