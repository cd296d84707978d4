"""The options of one build run, as one frozen record, checked as a whole before anything starts.

:class:`BuildOptions` has one field per parameter of the build flow (:func:`flows.build.build`, deployed as
``lsaq/build``); :meth:`BuildOptions.check` reads every one of them into the typed records the stages take
(:class:`CheckedBuild`) or raises an :class:`~lsaq.choices.OptionError` naming the bad value and what is allowed.
``lsaq-build`` calls it before Prefect is imported, so a bad value is one line in about a second; the flow calls
it first thing, so a deployment run with bad parameters fails with the same line before any task runs.

Neither torch nor Prefect is imported.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lsaq.compute import AUTO, check_compute_device
from lsaq.choices import OptionError, literal
from lsaq.eval.options import EvalOptions
from lsaq.methods import DEFAULT_K, DEFAULT_METHOD, Method
from lsaq.models.weights import check_model_spec
from lsaq.paths import cache_dir
from lsaq.planning.memory import WeightPolicy
from lsaq.precision import AUTO_GROUP
from lsaq.planning.devices import DeviceProfile
from lsaq.planning.planner import PlanOptions, Strategy
from lsaq.planning.stage import DeviceRequest, check_group_request, resolve_device
from lsaq.precision import Quantizer
from lsaq.models.hf_gguf import converter
from lsaq.planning.ggml import Int4Format, Int8Format
from lsaq.planning.vllm import check_vllm_policy
from lsaq.runtime import Runtime
from lsaq.store.stage import default_store_uri, open_store

# The production defaults, set by the quality-per-byte study (README): measure each layer's loss with GPTQ's codes,
# plan the least summed loss that fits, INT4 per-channel or in groups by measured loss. `make run` passes the
# cheaper demo settings (strategy lsaq with the cosine ranking, round to nearest) to stay within minutes on a CPU.
DEFAULT_STRATEGY = Strategy.MEASURED.value
DEFAULT_QUANTIZER = Quantizer.GPTQ.value
DEFAULT_GROUP_SIZE = AUTO_GROUP
DEFAULT_MEASURE_SAMPLES = 8

# (option, smallest value) of the integer options; eval_limit may also be None
_COUNTS = (("context", 1), ("k", 1), ("samples", 1), ("seq_len", 2), ("seed", 0), ("batch_size", 1),
           ("fidelity_windows", 1), ("measure_samples", 1), ("eval_limit", 1))
# EvalOptions' names for the build's evaluation options
_EVAL_NAMES = {"tasks": "eval_tasks", "limit": "eval_limit"}


@dataclass(frozen=True)
class BuildOptions:
    """Every option of a build run; the fields and defaults are the build flow's parameters (see its docstring)."""

    model: str | None = None
    device: str | None = None
    devices: tuple[str, ...] | None = None
    budget: str | None = None
    device_file: str | None = None
    context: int = 4096
    strategy: str = DEFAULT_STRATEGY
    method: str = DEFAULT_METHOD.value
    k: int = DEFAULT_K
    samples: int = 32
    seq_len: int = 512
    calib: str | None = None
    seed: int = 0
    batch_size: int = 4
    ppl: bool = False
    eval_tasks: str = ""
    eval_limit: int | None = None
    fidelity_windows: int = 8
    revision: str | None = None
    store: str | None = None
    work: str | None = None
    dispatch: str | None = None
    quantizer: str = DEFAULT_QUANTIZER
    group_size: int | str | None = DEFAULT_GROUP_SIZE
    measure_samples: int = DEFAULT_MEASURE_SAMPLES
    compute_device: str = AUTO
    runtime: str | None = None  # None: each device's own
    gguf_int4: str = Int4Format.Q4_K.value  # how GGUF builds store INT4; q4_0/q4_1 keep the quantizer's codes
    gguf_int8: str = Int8Format.Q8_0.value  # how GGUF builds store INT8; q8_0 keeps the quantizer's codes

    def params(self) -> dict[str, Any]:
        """The flow's keyword parameters (``devices`` as a list, as Prefect passes it)."""
        out = dataclasses.asdict(self)
        out["devices"] = list(self.devices) if self.devices is not None else None
        return out

    def check(self) -> "CheckedBuild":
        """Every option read into the records the stages take, or an :class:`OptionError` naming the first bad
        one. Cheap: nothing is loaded, nothing is written; named devices are looked up (``local`` is measured), a
        local model's weights files are checked from their headers."""
        for name, low in _COUNTS:
            value = getattr(self, name)
            if name == "eval_limit" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise OptionError(f"{{{name}}} must be an integer of at least {low}, got {literal(repr(value))}")
        for name in ("model", "device", "budget", "device_file", "calib", "revision", "store", "work", "dispatch",
                     "runtime"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise OptionError(f"{{{name}}} must be a non-empty string, got {literal(repr(value))}")
        if not isinstance(self.ppl, bool):
            raise OptionError(f"{{ppl}} must be true or false, got {literal(repr(self.ppl))}")
        try:
            strategy = Strategy.parse(self.strategy)
            ranking = Method.parse(self.method)  # checked whatever the strategy: a bad value is a mistake either way
            quantizer = Quantizer.parse(self.quantizer)
            group_size = check_group_request(self.group_size, strategy)
            check_compute_device(self.compute_device)
            runtime = Runtime.parse(self.runtime) if self.runtime is not None else None
            gguf_int4, gguf_int8 = Int4Format.parse(self.gguf_int4), Int8Format.parse(self.gguf_int8)
        except ValueError as e:
            raise OptionError(literal(e)) from None
        plan = PlanOptions(context=self.context, strategy=strategy, runtime=runtime, gguf_int4=gguf_int4,
                           gguf_int8=gguf_int8)
        if isinstance(group_size, int):
            plan = plan.with_policy(WeightPolicy(group_size=group_size))
        try:
            evaluation = EvalOptions(ppl=self.ppl, tasks=self.eval_tasks, limit=self.eval_limit,
                                     fidelity_windows=self.fidelity_windows)
        except OptionError as e:
            raise OptionError(e.render(lambda n: "{" + _EVAL_NAMES.get(n, n) + "}")) from None
        except ValueError as e:  # an unknown lm-eval task, named with the valid ones
            raise OptionError(f"{{eval_tasks}}: {literal(e)}") from None
        if self.model is not None:
            try:
                check_model_spec(self.model)  # a local checkpoint's headers; a hub id is resolved by the flow
            except ValueError as e:
                raise OptionError(literal(e)) from None
        resolved = self._requests()
        self._check_gguf_source(resolved, runtime)
        if any((runtime or profile.runs) is Runtime.VLLM for _, profile in resolved):
            try:
                check_vllm_policy(plan.policy)
            except ValueError as e:
                raise OptionError(literal(e)) from None
        requests = tuple(request for request, _ in resolved)
        store = self.store or default_store_uri()
        try:
            store = open_store(store).uri  # the URI as the store names it: a local path absolute, `..` resolved
        except ValueError as e:
            raise OptionError(f"{{store}}: {literal(e)}") from None
        work = self.work or str(cache_dir() / "work")
        if Path(work).exists() and not Path(work).is_dir():
            raise OptionError(f"{{work}} {literal(repr(work))} exists and is not a directory")
        return CheckedBuild(options=self, requests=requests, plan=plan, group_size=group_size,
                            ranking=ranking.value, quantizer=quantizer.value, evaluation=evaluation,
                            store=store, work=os.path.abspath(work))

    def _check_gguf_source(self, resolved: list[tuple[DeviceRequest, DeviceProfile]], runtime: Runtime | None) -> None:
        """A device that runs llama.cpp gets a GGUF build; from a safetensors model that takes llama.cpp's converter
        (:func:`lsaq.models.hf_gguf.converter`): without it the build is refused here, before the importance run,
        naming the device and what to do."""
        if self.model is None or Path(self.model).suffix == ".gguf":  # None: the embedded model, a GGUF
            return
        for request, profile in resolved:
            if request.name is not None and (runtime or profile.runs).gguf:
                try:
                    converter()
                except ValueError as e:
                    raise OptionError(f"device {literal(request.name)} runs llama.cpp: {literal(e)}; or build for "
                                      "{runtime} transformers") from None
                return

    def _requests(self) -> list[tuple[DeviceRequest, DeviceProfile]]:
        """``device``, ``devices`` and ``budget`` together, each once, in order, each with the profile it names."""
        if self.devices is not None and (isinstance(self.devices, str)
                                         or not all(isinstance(d, str) and d.strip() for d in self.devices)):
            raise OptionError(f"{{devices}} must be a list of device names, got {literal(repr(self.devices))}")
        names = ([self.device] if self.device else []) + list(self.devices or [])
        if not names and self.budget is None:
            raise OptionError("no device: give {device} (a name from `lsaq devices`), {devices} or {budget} (a size, "
                              "e.g. 6GiB)")
        if len(set(names)) != len(names):
            raise OptionError(f"a device is named twice in {literal(names)}")
        if self.device_file is not None and not Path(self.device_file).is_file():
            raise OptionError(f"{{device_file}} {literal(repr(self.device_file))} is not a file")
        requests = [DeviceRequest(name=n, device_file=self.device_file) for n in names]
        requests += [DeviceRequest(budget=self.budget)] if self.budget is not None else []
        resolved = []
        for request in requests:
            try:  # an unknown name lists the known ones; a budget is parsed and bounded
                resolved.append((request, resolve_device(request)))
            except ValueError as e:
                raise OptionError(literal(e)) from None
        return resolved


@dataclass(frozen=True)
class CheckedBuild:
    """:class:`BuildOptions` read into what the stages take. ``ranking``: the importance method's value (what a
    dispatched child is given); ``store``/``work``: with their defaults filled in."""

    options: BuildOptions
    requests: tuple[DeviceRequest, ...]
    plan: PlanOptions
    group_size: int | str | None
    ranking: str
    quantizer: str
    evaluation: EvalOptions
    store: str
    work: str

    @property
    def measured(self) -> bool:
        """Strategy ``measured``: plans minimise each layer's measured loss instead of following a ranking."""
        return self.plan.strategy is Strategy.MEASURED

    def child_params(self, request: DeviceRequest, revision: str | None) -> dict[str, Any]:
        """The parameters of a flow run that builds ``request`` alone: every option as this run got it (a hub model
        pinned to ``revision``, the commit this run resolved), but ``work``, a child's own machine's scratch."""
        return dataclasses.replace(self.options, device=request.name, devices=None, budget=request.budget,
                                   revision=revision or self.options.revision, store=self.store, work=None,
                                   dispatch=None, method=self.ranking, quantizer=self.quantizer,
                                   group_size=self.group_size).params()


__all__ = ["DEFAULT_GROUP_SIZE", "DEFAULT_MEASURE_SAMPLES", "DEFAULT_QUANTIZER", "DEFAULT_STRATEGY", "BuildOptions",
           "CheckedBuild"]
