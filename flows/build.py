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

from flows.options import (
    DEFAULT_GROUP_SIZE,
    DEFAULT_MEASURE_SAMPLES,
    DEFAULT_QUANTIZER,
    DEFAULT_STRATEGY,
    BuildOptions,
)
from lsaq.methods import DEFAULT_K, DEFAULT_METHOD
from lsaq.planning.planner import InfeasiblePlanError
from lsaq.precision import Quantizer
from tasks.dispatch import dispatch_device
from tasks.records import DeviceOutcome, RunSummary
from tasks.stages import MEASURED_LOSS, bind, request_label
from tasks.summary import BuildFailed, outcome, summarize


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
    compute_device: str = "auto",
    runtime: str | None = None,
    gguf_int4: str = "q4_k",
    gguf_int8: str = "q8_0",
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
    than ``samples``): it costs about 85-95 forward passes over them (README, study). ``compute_device``: where
    the importance run, quantization and evaluation compute on the machine that runs them (``auto``: the NVIDIA
    GPU with the most free memory that holds a layer, else the CPU; ``cpu``; ``cuda:N``). ``runtime``: what runs
    every build (``transformers``, ``vllm``, ``llama.cpp``), instead of each device's own (``lsaq devices``).
    ``gguf_int4``/``gguf_int8``: how a llama.cpp build (one GGUF file) stores INT4 (``q4_k``, the default,
    ``q5_k``, ``q3_k``, ``q4_1``, ``q4_0``) and INT8 (``q8_0``, the default, or ``q6_k``); K-quants are quantized by
    llama.cpp's own quantizer whatever ``quantizer`` says, ``q4_0``/``q4_1`` with ``q8_0`` keep ``quantizer``'s codes.
    """
    # Every option is checked before anything runs: a bad value fails the flow with one line naming it.
    checked = BuildOptions(
        model=model, device=device, devices=tuple(devices) if devices is not None else None, budget=budget,
        device_file=device_file, context=context, strategy=strategy, method=method, k=k, samples=samples,
        seq_len=seq_len, calib=calib, seed=seed, batch_size=batch_size, ppl=ppl, eval_tasks=eval_tasks,
        eval_limit=eval_limit, fidelity_windows=fidelity_windows, revision=revision, store=store, work=work,
        dispatch=dispatch, quantizer=quantizer, group_size=group_size, measure_samples=measure_samples,
        compute_device=compute_device, runtime=runtime, gguf_int4=gguf_int4, gguf_int8=gguf_int8,
    ).check()
    requests, options, group_size, quantizer = checked.requests, checked.plan, checked.group_size, checked.quantizer
    store, work = checked.store, checked.work
    # strategy 'measured' plans from each layer's measured loss per precision (lsaq.measure), not from a ranking
    method = MEASURED_LOSS if checked.measured else checked.ranking
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
    importance = t.score(ident, scored_on, method, k, batch_size, store, work, quantizer, group_size,
                         compute_device)

    if dispatch:
        runs = {r: dispatch_device.submit(dispatch, request_label(r), checked.child_params(r, ident.revision))
                for r in targets}
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
        # a GGUF build with INT4 in K-quants takes llama.cpp's codes (round to nearest, scales it searches)
        device_options = options.for_device(target.device)
        keeps = not device_options.gguf or device_options.gguf_formats.holds_codes
        codes = quantizer if keeps else Quantizer.RTN.value
        artifact = t.quantize.submit(ident, plan, store, work, codes,
                                     calibration if codes != Quantizer.RTN.value else None, compute_device)
        report = t.evaluate.submit(ident, plan, artifact, checked.evaluation, store, work, compute_device)
        chains.append((plan, artifact, report, t.publish.submit(ident, plan, artifact, report, store, work)))
    wait([f for chain in chains for f in chain])
    built = [outcome(target.slug, chain) for target, chain in zip(targets.values(), chains)]
    if dispatch:  # the device was built (or found Cached) by its own run, not by these cache reads
        built = [replace(o, state="Completed", flow_run=run.result().name) if o.build else o
                 for o, run in zip(built, (runs[r] for r in targets))]
    summary = summarize(ident, importance, store, [*built, *outcomes.values()], calibration)
    if summary.failed:
        raise BuildFailed(summary)
    return summary

