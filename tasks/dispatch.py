"""Scale-out: one device's build as its own flow run of a deployment (a Docker or Kubernetes pool, say).

The parent run of :func:`flows.build.build` computes the importance once; then, given ``dispatch``, it starts
``lsaq/build`` (or the named deployment) once per device and waits for them. Each child runs the whole flow for its
one device on whatever worker picks it up; its identity, calibration and importance are ``Cached`` from the
shared store, so only that device's plan, quantization, evaluation and publication run there. The children share
nothing with the parent but the store and the Prefect server.
"""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.deployments import run_deployment

from tasks.records import DispatchedRun

POLL_S = 2  # how often the parent looks at a child run's state


class DispatchFailed(RuntimeError):
    """A device's flow run did not complete (it failed, crashed or was cancelled)."""


@task(name="dispatch", task_run_name="dispatch {device} to {deployment}", cache_policy=NO_CACHE, retries=0)
def dispatch_device(deployment: str, device: str, parameters: dict[str, Any]) -> DispatchedRun:
    """Run ``deployment`` with ``parameters`` (one device's build) as a child flow run and wait for it to end;
    :class:`DispatchFailed` naming the run when it did not complete."""
    run = run_deployment(name=deployment, parameters=parameters, timeout=None, poll_interval=POLL_S,
                         tags=["lsaq", "dispatched"])
    state = run.state
    if state is None or not state.is_completed():
        name = state.name if state else "no state"
        raise DispatchFailed(f"flow run {run.name!r} ({run.id}) of {deployment} ended {name}"
                             f"{': ' + state.message if state and state.message else ''}")
    return DispatchedRun(device=device, deployment=deployment, flow_run=str(run.id), name=run.name,
                         state=state.name)
