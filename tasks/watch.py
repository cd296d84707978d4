"""The watch flow's parts: its config (models and their devices), what is stale in the store, and triggering builds.

The config is a small YAML (or JSON) file::

    version: 1
    models:
      - model: HuggingFaceTB/SmolLM2-135M-Instruct   # a hub id, a local directory or .gguf; omit for the default
        revision: main                               # hub only: a branch, tag or commit (default: main)
        devices: [rtx3060, rpi-zero-2w]

A device is stale when the store holds no complete build of the model's *current* revision for it: the model
changed (a new hub commit, other local weights) or that device was never built. A stale device that a run of the
build deployment is already building (scheduled, pending or running) is left to that run, so a watch that runs
again before a build ends does not start it twice.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from prefect import task
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    DeploymentFilter,
    DeploymentFilterId,
    FlowRunFilter,
    FlowRunFilterState,
    FlowRunFilterStateType,
)
from prefect.client.schemas.objects import StateType
from prefect.deployments import run_deployment
from prefect.exceptions import ObjectNotFound

from lsaq.models.revision import ModelUnreachableError, current_revision
from lsaq.store.download import device_matches, list_builds
from lsaq.store.keys import model_slug, revision_slug, slugify
from tasks.storage import backend

CONFIG_VERSION = 1
MODEL_KEYS = ("model", "revision", "devices")


@dataclass(frozen=True)
class WatchTarget:
    """One model to keep built, for these devices."""

    model: str | None
    devices: tuple[str, ...]
    revision: str | None = None

    @property
    def label(self) -> str:
        return self.model or "default"


def read_watch_config(path: str | Path) -> tuple[WatchTarget, ...]:
    """The targets of a watch config; ``ValueError`` naming the file, the entry and the bad field."""
    path = Path(path)
    try:
        obj = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ValueError(f"watch config {path}: cannot read it ({e})") from e
    if not isinstance(obj, dict) or obj.get("version") != CONFIG_VERSION or not isinstance(obj.get("models"), list):
        raise ValueError(f"watch config {path}: expected 'version: {CONFIG_VERSION}' and a 'models' list")
    targets = []
    for i, entry in enumerate(obj["models"]):
        where = f"watch config {path}, models[{i}]"
        if not isinstance(entry, dict) or set(entry) - set(MODEL_KEYS):
            raise ValueError(f"{where}: expected a mapping of {', '.join(MODEL_KEYS)}, got {entry!r}")
        devices = entry.get("devices")
        if not isinstance(devices, list) or not devices or not all(isinstance(d, str) and d for d in devices):
            raise ValueError(f"{where}: 'devices' must be a non-empty list of device names")
        for name in ("model", "revision"):
            if entry.get(name) is not None and not isinstance(entry[name], str):
                raise ValueError(f"{where}: '{name}' must be a string")
        targets.append(WatchTarget(entry.get("model"), tuple(devices), entry.get("revision")))
    return tuple(targets)


@dataclass(frozen=True)
class ModelCheck:
    """One target checked against the store: its current revision, the devices to build, or why it was skipped."""

    model: str
    revision: str | None = None  # the store's revision segment (hub commit or sha256-...)
    hub_revision: str | None = None
    stale: tuple[str, ...] = ()
    built: tuple[str, ...] = ()
    error: str | None = None
    triggered: str | None = None  # the flow run of lsaq/build started for the stale devices
    in_flight: tuple[str, ...] = ()  # stale devices that a build run not yet finished is building


def stale_devices(store: str, slug: str, revision: str, devices: tuple[str, ...]) -> tuple[str, ...]:
    """The ``devices`` without a complete build of ``slug`` at ``revision`` in the store."""
    builds = [m for m in list_builds(backend(store), model=slug) if m.revision == revision]
    return tuple(d for d in devices if not any(device_matches(m, d) for m in builds))


@task(name="check-model", task_run_name="check {target.label}", retries=0)
def check_model(target: WatchTarget, store: str) -> ModelCheck:
    """The target's current revision and which of its devices have no build of it; an unreachable model is
    reported in the record (``error``), never raised, so the other models are still checked."""
    try:
        now = current_revision(target.model, revision=target.revision)
    except ModelUnreachableError as e:
        return ModelCheck(model=target.label, error=str(e))
    slug, rev = model_slug(now), revision_slug(now)
    stale = stale_devices(store, slug, rev, target.devices)
    return ModelCheck(model=target.label, revision=rev, hub_revision=now.revision, stale=stale,
                      built=tuple(d for d in target.devices if d not in stale))


@task(name="trigger-build", task_run_name="trigger {check.model}", retries=0)
def trigger_build(target: WatchTarget, check: ModelCheck, store: str, deployment: str,
                  parameters: dict[str, Any] | None = None) -> ModelCheck:
    """Start the ``deployment`` (``lsaq/build``) for the stale devices, pinned to the revision that was checked;
    returns the check with the flow run's id. Does not wait for the build."""
    params = {"model": target.model, "devices": list(check.stale), "store": store, **(parameters or {})}
    if check.hub_revision is not None:
        params["revision"] = check.hub_revision
    run = run_deployment(name=deployment, parameters=params, timeout=0,
                         tags=["lsaq-watch", f"model:{slugify(check.model)[:40]}"])
    return dataclasses.replace(check, triggered=str(run.id))


UNFINISHED = [StateType.SCHEDULED, StateType.PENDING, StateType.RUNNING, StateType.PAUSED, StateType.CANCELLING]


def devices_in(parameters: dict[str, Any], model: str | None) -> tuple[str, ...]:
    """The devices a build run with these ``parameters`` builds, if it builds ``model`` (None: the default)."""
    if parameters.get("model") != model:
        return ()
    return tuple(d for d in [parameters.get("device"), *(parameters.get("devices") or [])] if d)


@task(name="find-running-builds", task_run_name="builds of {target.label} in flight", retries=0)
def in_flight(target: WatchTarget, deployment: str) -> tuple[str, ...]:
    """The devices of ``target`` that an unfinished flow run of ``deployment`` is building (none when the
    deployment does not exist: triggering it reports that)."""
    with get_client(sync_client=True) as client:
        try:
            found = client.read_deployment_by_name(deployment)
        except ObjectNotFound:
            return ()
        runs = client.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[found.id])),
            flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=UNFINISHED))))
    busy = {d for r in runs for d in devices_in(r.parameters, target.model)}
    return tuple(d for d in target.devices if d in busy)
