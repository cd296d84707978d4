"""The build flow: one importance run fans out to a verified, published build for every device.

``build`` (deployed as ``lsaq/build``) resolves the model's identity and every device first (bad names, bad
options and budgets no plan fits fail here, before any model is loaded), then calibrates and scores once, then per
device plans, quantizes, evaluates and publishes, devices concurrently. Every task is cached by content in the
store (:mod:`tasks.storage`), so a rerun, another device or another machine sharing the store reuses what exists.
One device that fails (a budget too small among several devices) does not stop the others; the flow fails at the
end naming it, after the others are published.

Scale-out: with ``dispatch`` (a deployment of this flow, e.g. ``lsaq/build-k8s``) each device's build runs as its
own flow run of that deployment (:mod:`tasks.dispatch`), so a Docker or Kubernetes pool builds devices in parallel
containers that share the store; the parent then collects each device's records, ``Cached`` from the store.
Without it every device is built in this process.
"""

from __future__ import annotations

from dataclasses import replace

from prefect import flow
from prefect.futures import PrefectFuture, wait

from lsaq.eval.stage import EvalOptions
from lsaq.methods import DEFAULT_K, DEFAULT_METHOD, Method
from lsaq.paths import cache_dir
from lsaq.planning.memory import AUTO_GROUP, WeightPolicy
from lsaq.planning.planner import InfeasiblePlanError, PlanOptions, Strategy
from lsaq.planning.stage import DeviceRequest, check_group_request
from lsaq.quantization.sequential import Quantizer
from lsaq.store.stage import default_store_uri
from tasks.dispatch import dispatch_device
from tasks.records import DeviceOutcome, RunSummary
from tasks.stages import MEASURED_LOSS, bind, request_label
from tasks.summary import BuildFailed, outcome, summarize

# The production defaults, set by the quality-per-byte study (README): measure each layer's loss with GPTQ's codes,
# plan the least summed loss that fits, INT4 per-channel or in groups by measured loss. `make run` passes the
# cheaper demo settings (strategy lsaq with the cosine ranking, round to nearest) to stay within minutes on a CPU.
DEFAULT_STRATEGY = Strategy.MEASURED.value
DEFAULT_QUANTIZER = Quantizer.GPTQ.value
DEFAULT_GROUP_SIZE = AUTO_GROUP
DEFAULT_MEASURE_SAMPLES = 8


def device_requests(device: str | None, devices: list[str] | None, budget: str | None,
                    device_file: str | None) -> list[DeviceRequest]:
    """The devices a run builds for: ``device``, ``devices`` and ``budget`` together, each once, in order."""
    names = ([device] if device else []) + list(devices or [])
    if not names and budget is None:
        raise ValueError("give a device (device=NAME or devices=[...], see `lsaq devices`) or a budget (budget=6GiB)")
    if len(set(names)) != len(names):
        raise ValueError(f"a device is named twice in {names}")
    requests = [DeviceRequest(name=n, device_file=device_file) for n in names]
    return requests + ([DeviceRequest(budget=budget)] if budget is not None else [])


def one_device(request: DeviceRequest) -> dict[str, str | None]:
    """The device parameters of a flow run that builds ``request`` alone."""
    return {"device": request.name, "devices": None, "budget": request.budget}


@flow(name="lsaq", persist_result=False)
def build(
    model: str | None = None,
    device: str | None = None,
    devices: list[str] | None = None,
    budget: str | None = None,
    device_file: str | None = None,
    context: int = 4096,
    strategy: str = DEFAULT_STRATEGY,
    method: str = DEFAULT_METHOD.value,
    k: int = DEFAULT_K,
    samples: int = 32,
    seq_len: int = 512,
    calib: str | None = None,
    seed: int = 0,
    batch_size: int = 4,
    ppl: bool = False,
    eval_tasks: str = "",
    eval_limit: int | None = None,
    fidelity_windows: int = 8,
    revision: str | None = None,
    store: str | None = None,
    work: str | None = None,
    dispatch: str | None = None,
    quantizer: str = DEFAULT_QUANTIZER,
    group_size: int | str | None = DEFAULT_GROUP_SIZE,
    measure_samples: int = DEFAULT_MEASURE_SAMPLES,
) -> RunSummary:
    """Build ``model`` (default: the embedded one) for every device (``device``, ``devices``, ``budget``).

    ``context``/``strategy``: plan options (``strategy="measured"`` measures every layer's loss at each precision
    instead of ranking with ``method``, and minimises the summed loss per device); ``method``/``k``/``samples``/
    ``seq_len``/``calib``/``seed``: the importance run; ``ppl``/``eval_tasks``/``eval_limit``/
    ``fidelity_windows``: what each build's evaluation measures besides fidelity to the float model. ``store``:
    where results go (default ``$LSAQ_STORE`` or the local store); ``work``: this machine's scratch directory
    (default ``<lsaq cache>/work``). ``dispatch``: a deployment of this flow to run each device's build as its own
    flow run (see the module docstring). ``quantizer``: ``rtn`` (round to nearest) or ``gptq`` (error feedback on
    the calibration set's activations; same bytes). ``group_size``: INT4 in groups of that size (it must divide
    every input width), or ``"auto"`` with strategy ``measured``: each device's plan weighs per-channel against the
    largest group size that divides every width, by measured loss and bytes. ``measure_samples``: strategy
    ``measured`` measures the layer loss on this many calibration sequences (their own calibration set when fewer
    than ``samples``): it costs about 85-95 forward passes over them (README, study).
    """
    # Every option is checked before anything runs: a bad value fails the flow with the stage's own message.
    requests = device_requests(device, devices, budget, device_file)
    options = PlanOptions(context=context, strategy=Strategy.parse(strategy))
    group_size = check_group_request(group_size, options.strategy)
    if isinstance(measure_samples, bool) or not isinstance(measure_samples, int) or measure_samples < 1:
        raise ValueError(f"measure_samples must be a positive integer, got {measure_samples!r}")
    if isinstance(group_size, int):
        options = options.with_policy(WeightPolicy(group_size=group_size))
    # strategy 'measured' plans from each layer's measured loss per precision (lsaq.measure), not from a ranking
    ranking = Method.parse(method).value  # checked whatever the strategy: a bad value is a mistake either way
    method = MEASURED_LOSS if options.strategy is Strategy.MEASURED else ranking
    quantizer = Quantizer.parse(quantizer).value
    evaluation = EvalOptions(ppl=ppl, tasks=eval_tasks, limit=eval_limit, fidelity_windows=fidelity_windows)
    store = store or default_store_uri()
    work = work or str(cache_dir() / "work")
    t = bind(store)

    ident = t.identify(model, revision)
    resolved = [t.resolve_device.submit(ident, r, options) for r in requests]
    wait(resolved)
    targets, outcomes = {}, {}
    for request, future in zip(requests, resolved):
        state = future.state
        error = None if state.is_completed() else state.result(raise_on_failure=False)
        if error is None:
            targets[request] = future.result()
        elif isinstance(error, InfeasiblePlanError) and len(requests) > 1:
            outcomes[request] = DeviceOutcome(request_label(request), state.name,
                                              stage="resolve-device", message=str(error))
        else:
            raise error  # an unknown device, a bad option, or the only device does not fit: nothing is built
    if not targets:
        raise BuildFailed(summarize(ident, None, store, list(outcomes.values())))

    calibration = t.calibrate(ident, calib, samples, seq_len, seed, store, work)
    scored_on = calibration  # the measured layer loss costs ~90 forward passes: on a smaller set of its own
    if method == MEASURED_LOSS and measure_samples < samples:
        scored_on = t.calibrate(ident, calib, measure_samples, seq_len, seed, store, work)
    importance = t.score(ident, scored_on, method, k, batch_size, store, work, quantizer, group_size)

    if dispatch:
        # Every option a child needs, as this run got it (but `work`: a child's scratch is its own machine's), a hub
        # model pinned to the commit this run resolved.
        shared = dict(model=model, device_file=device_file, context=context, strategy=strategy, method=ranking, k=k,
                      samples=samples, seq_len=seq_len, calib=calib, seed=seed, batch_size=batch_size, ppl=ppl,
                      eval_tasks=eval_tasks, eval_limit=eval_limit, fidelity_windows=fidelity_windows,
                      revision=ident.revision or revision, store=store, quantizer=quantizer, group_size=group_size,
                      measure_samples=measure_samples)
        runs = {r: dispatch_device.submit(dispatch, request_label(r), {**shared, **one_device(r)}) for r in targets}
        wait(list(runs.values()))
        for request, future in runs.items():
            if not future.state.is_completed():
                error = future.state.result(raise_on_failure=False)
                outcomes[request] = DeviceOutcome(request_label(request), future.state.name, stage="dispatch",
                                                  message=str(error))
                del targets[request]

    # In process; after a dispatch every task here is Cached from the store (the children computed them).
    chains: list[tuple[PrefectFuture, ...]] = []
    for target in targets.values():
        plan = t.plan.submit(ident, importance, target, options, store, work, group_size)
        artifact = t.quantize.submit(ident, plan, store, work, quantizer,
                                     calibration if quantizer != Quantizer.RTN.value else None)
        report = t.evaluate.submit(ident, plan, artifact, evaluation, store, work)
        chains.append((plan, artifact, report, t.publish.submit(ident, plan, artifact, report, store, work)))
    wait([f for chain in chains for f in chain])
    built = [outcome(target.slug, chain) for target, chain in zip(targets.values(), chains)]
    if dispatch:  # the device was built (or found Cached) by its own run, not by these cache reads
        built = [replace(o, state="Completed", flow_run=run.result().name) if o.build else o
                 for o, run in zip(built, (runs[r] for r in targets))]
    summary = summarize(ident, importance, store, [*built, *outcomes.values()])
    if summary.failed:
        raise BuildFailed(summary)
    return summary

