"""What the build flow's caching saves: a first build, one more device on the same importance, a full rerun.

In one run, on a fresh store, scratch and lsaq cache (temporary directories; the model is the shared SmolLM2 GGUF
when present, else the embedded default), on Prefect's local API (started before timing):

1. the flow for one device (everything computed: identity, calibration, importance, plan, quantize, evaluate,
   publish);
2. the flow for that device and one more (calibration and importance cached; the new device's stages run);
3. the same two-device flow again (every task cached).

Reported: each run's wall time and the ratios run 2 / run 1 (target <= 0.4) and run 3 / run 1 (target <= 0.1),
then where each run's time goes: per stage the task runs' wall time (from Prefect's task run records), the rest
of the flow (Prefect's own overhead: flow and task orchestration, cache lookups), and one model load measured
apart (every quantize and evaluate pays one or two).

    .venv/bin/python benchmarks/bench_pipeline.py [--devices beaglebone-black rpi-zero-2w]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections import defaultdict
from pathlib import Path

# A fresh lsaq cache (GGUF conversion, generated text, locks): set before lsaq and the tasks are imported.
CACHE = tempfile.mkdtemp(prefix="lsaq-bench-cache-")
os.environ["LSAQ_CACHE"] = CACHE
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="lsaq-bench-prefect-"))


def model_path() -> str:
    """The shared GGUF when present (no download), else the embedded default fetched into the fresh cache."""
    from lsaq.models.default import default_model_path
    from lsaq.paths import shared_dir

    shared = shared_dir()
    gguf = shared / "models/smollm2-135m-instruct-q4_1/SmolLM2-135M-Instruct.Q4_1.gguf" if shared else None
    return str(gguf) if gguf is not None and gguf.is_file() else str(default_model_path())


def stage_times(flow_run_id) -> dict[str, float]:
    """Stage -> summed wall seconds of its task runs in one flow run."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    out: dict[str, float] = defaultdict(float)
    for r in runs:
        if r.start_time and r.end_time:
            out[r.name.split()[0]] += (r.end_time - r.start_time).total_seconds()
    return dict(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", nargs=2, default=["beaglebone-black", "rpi-zero-2w"], metavar="DEVICE")
    args = ap.parse_args()

    from prefect import flow

    from flows.build import build
    from lsaq.models.loading import load_model

    @flow(name="lsaq-bench-warmup")
    def warmup() -> None:
        """Starts Prefect's local API before anything is timed."""

    warmup()
    model = model_path()
    work = tempfile.mkdtemp(prefix="lsaq-bench-")
    store, scratch = str(Path(work) / "store"), str(Path(work) / "work")
    first, second = args.devices
    runs = [("first build: " + first, [first]), ("one more device: " + second, [first, second]),
            ("full rerun", [first, second])]
    results = []
    for label, devices in runs:
        start = time.perf_counter()
        state = build(model=model, devices=devices, store=store, work=scratch, strategy="lsaq", quantizer="rtn",
                      return_state=True)  # make run's demo settings
        seconds = time.perf_counter() - start
        if not state.is_completed():
            raise SystemExit(f"{label}: the flow ended {state.name}: {state.message}")
        results.append((label, seconds, stage_times(state.state_details.flow_run_id)))

    start = time.perf_counter()
    load_model(model)
    load_s = time.perf_counter() - start

    base = results[0][1]
    print(f"model {model}; store {store}; lsaq cache {CACHE}")
    print(f"{'run':34s} {'wall s':>8s} {'/ first':>8s}  target")
    for (label, seconds, _), target in zip(results, ("", "<= 0.4", "<= 0.1")):
        print(f"{label:34s} {seconds:8.1f} {seconds / base:8.3f}  {target}")
    stages = ["identify", "resolve", "calibrate", "score", "plan", "quantize", "evaluate", "publish"]
    print("\nwhere the time goes (task run wall seconds, summed over devices; devices overlap, so the rest of the")
    print("flow is the wall time minus the critical path's stages: Prefect's orchestration and cache lookups)")
    print(f"{'run':34s} " + " ".join(f"{s:>9s}" for s in stages) + f" {'other':>9s}")
    for label, seconds, times in results:
        serial = sum(times.get(s, 0.0) for s in stages if s not in ("plan", "quantize", "evaluate", "publish"))
        per_device = sum(times.get(s, 0.0) for s in ("plan", "quantize", "evaluate", "publish"))
        other = max(0.0, seconds - serial - per_device)  # the model slot serializes quantize/evaluate
        print(f"{label:34s} " + " ".join(f"{times.get(s, 0.0):9.2f}" for s in stages) + f" {other:9.2f}")
    print(f"\none model load (float32, from the converted checkpoint): {load_s:.2f} s; each quantize loads the model "
          "once, each evaluate twice (artifact and float baseline)")


if __name__ == "__main__":
    main()
