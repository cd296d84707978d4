"""Where a model stage computes: the compute device (``auto``, ``cpu``, ``cuda:N``) and its dtype.

``auto`` takes the NVIDIA GPU with the most free memory (NVML, as the ``local`` device budgets it) when it holds
what one step of the layer walk needs: the resident parts (embedding, final norm, LM head), one decoder layer and
its activations (:func:`step_bytes`). A GPU that is present but busy is waited for, up to a bound, with a progress
line; at the end a clear message says what was needed and what to do. Without NVML's Python bindings the free
memory is torch's view of each CUDA device. With no NVIDIA GPU (no driver, a CPU build of torch) ``auto`` is the
CPU. On a GPU the walk computes in 16 bits (bfloat16, float16 where the checkpoint declares it or the GPU lacks
bfloat16); on the CPU in float32, one layer at a time.

Containers that share one GPU still go through the global concurrency limit of their work pool: this choice only
sees the memory free at the moment it is made.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping

if TYPE_CHECKING:
    import torch

    from lsaq.planning.detect import Detection

from lsaq.models.shapes import ModelShape
from lsaq.units import format_bytes

log = logging.getLogger(__name__)

AUTO, CPU = "auto", "cpu"
CHOICES = "auto, cpu or cuda:N"
DEFAULT_WAIT_S = 600.0  # how long auto waits for a busy GPU before it says so
POLL_S = 5.0
PROGRESS_S = 30.0  # one progress line at most this often
GPU_RESERVE = 512 * 2**20  # the CUDA context and cuBLAS workspace of this process
# Activations of one layer call per position, in hidden-size units: the input and output hidden states, the
# attention's q/k/v/o and the recorded call's copy (~8 x hidden), plus the MLP's gate/up/act (3 x intermediate).
ACTIVATION_HIDDEN, ACTIVATION_INTER = 8, 3


def parse_compute_device(text: str) -> str:
    """``auto``, ``cpu`` or ``cuda:N`` (``cuda`` is ``cuda:0``); ``ValueError`` naming the value otherwise."""
    t = str(text).strip().lower()
    if t in (AUTO, CPU):
        return t
    if t == "cuda":
        return "cuda:0"
    m = re.fullmatch(r"cuda:(\d+)", t)
    if m is None:
        raise ValueError(f"compute device {text!r} is not one of: {CHOICES} (N: a CUDA device index)")
    return f"cuda:{int(m.group(1))}"


def check_compute_device(text: str, cuda_available: Callable[[], bool] | None = None) -> str:
    """:func:`parse_compute_device`, and for ``cuda:N`` that torch has that device: the cheap checks a stage makes
    before any model is read. ``ValueError`` naming the value and what is allowed."""
    spec = parse_compute_device(text)
    if spec.startswith("cuda:"):
        import torch

        cuda = (cuda_available or torch.cuda.is_available)()
        count = torch.cuda.device_count() if cuda else 0
        if int(spec.split(":")[1]) >= count:
            raise ValueError(f"compute device {spec}: torch sees {count} CUDA device(s)"
                             f"{'' if cuda else ' (no CUDA: a CPU build of torch, or no driver)'}; "
                             f"valid: {CHOICES}")
    return spec


@dataclass(frozen=True)
class Compute:
    """The device a stage computes on, its dtype, and why it was chosen (one line, for the log and the record)."""

    device: "torch.device"
    dtype: "torch.dtype"
    reason: str

    @property
    def on_gpu(self) -> bool:
        return self.device.type == "cuda"

    def to_json(self) -> dict[str, str]:
        return {"device": str(self.device), "dtype": str(self.dtype).removeprefix("torch."), "reason": self.reason}


def cpu_compute(reason: str = "asked for") -> Compute:
    """The CPU in float32."""
    import torch

    return Compute(torch.device(CPU), torch.float32, reason)


def gpu_dtype(index: int, declared: str | None = None) -> torch.dtype:
    """float16 where the checkpoint declares float16 or the GPU has no bfloat16 (before Ampere), else bfloat16."""
    import torch

    if declared == "float16":
        return torch.float16
    major, _ = torch.cuda.get_device_capability(index)
    return torch.bfloat16 if major >= 8 else torch.float16


def step_bytes(shape: ModelShape, positions: int, dtype: "torch.dtype | None" = None) -> int:
    """What one step of the walk holds on the compute device, in bytes: the embedding, LM head and final norms,
    one decoder layer's weights, and ``positions`` tokens' activations through it (estimated, see the constants),
    in ``dtype`` (default float32)."""
    item = dtype.itemsize if dtype is not None else 4
    acts = positions * (ACTIVATION_HIDDEN * shape.hidden_size + ACTIVATION_INTER * shape.intermediate_size)
    return (shape.params_per_layer + shape.resident_params + acts) * item


RUNTIME_BYTES = 512 * 2**20  # Python, torch, transformers and a tokenizer, loaded (0.26 GiB measured with no tokenizer)


def check_max_memory(value: int | str | None) -> int | None:
    """``--max-memory`` as bytes (None: no limit); ``ValueError`` naming the value unless it is a size."""
    from lsaq.units import parse_bytes

    if value is None:
        return None
    size = parse_bytes(value, what="max memory")
    if size <= 0:
        raise ValueError(f"max memory must be positive, got {value!r}")
    return size


def host_need(shape: ModelShape, positions: int, tokens: int, compute: Compute, extra: int = 0) -> dict[str, int]:
    """What the walk holds in host memory at least, by part (bytes): the runtime; on the CPU also one step
    (:func:`step_bytes` in float32: resident parts, a layer, a call's activations), three float32 copies of the
    hidden states of all ``tokens`` (the recorded inputs, a layer's inputs and its outputs) and ``extra`` (a stage's
    own buffers); on a GPU only a layer as read, before it moves there."""
    if compute.on_gpu:
        return {"runtime": RUNTIME_BYTES, "one layer as read": shape.params_per_layer * 4}
    return {"runtime": RUNTIME_BYTES, "one step (resident parts, a layer, a call's activations)":
            step_bytes(shape, positions), "hidden states": 3 * tokens * shape.hidden_size * 4, "buffers": extra}


WALK_HINT = "use fewer or shorter sequences (--samples, --seq-len, --batch-size)"


def within_max_memory(max_memory: int | None, need: Mapping[str, int], hint: str = WALK_HINT,
                      what: str = "one layer's step") -> int | None:
    """The bytes ``max_memory`` leaves beyond ``need`` (None: no limit), for what a stage can move to disk (the
    branches' hidden states); ``ValueError`` before any work when ``need`` alone passes it, saying what would do
    (``what``: what needs it; ``hint``: what the stage's own flags can change)."""
    if max_memory is None:
        return None
    total = sum(need.values())
    if total > max_memory:
        parts = ", ".join(f"{name} {format_bytes(n)}" for name, n in need.items() if n)
        raise ValueError(f"--max-memory {format_bytes(max_memory)} is less than {what} needs here: "
                         f"{format_bytes(total)} ({parts}); allow at least {format_bytes(total)}, or {hint}")
    return max_memory - total


def _torch_index(uuid: str, position: int) -> int:
    """torch's index of the NVML GPU ``uuid`` (torch may order GPUs fastest first, NVML by PCI bus); else the
    GPU's position among the visible ones."""
    import torch

    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        if str(getattr(props, "uuid", "")) and str(props.uuid) in uuid:
            return i
    return position


def with_torch_gpus(found: "Detection", cuda: bool) -> "Detection":
    """``found`` as it is when NVML saw a GPU or torch has no CUDA; else with the GPUs torch sees (its free and total
    memory per device): a machine with CUDA but without NVML's Python bindings still gets its GPU."""
    import dataclasses

    import torch

    from lsaq.planning.detect import GpuMemory

    if found.gpus or not cuda:
        return found
    gpus = []
    for i in range(torch.cuda.device_count()):
        free, total = torch.cuda.mem_get_info(i)
        props = torch.cuda.get_device_properties(i)
        gpus.append(GpuMemory(i, props.name, str(getattr(props, "uuid", "")), int(total), int(free), int(total - free)))
    return dataclasses.replace(found, gpus=tuple(gpus), nvml_status=f"{found.nvml_status}; memory as torch sees it")


def choose_compute(spec: str, need: int, *, declared: str | None = None, wait_s: float = DEFAULT_WAIT_S,
                   detect: Callable | None = None, cuda_available: Callable[[], bool] | None = None,
                   clock: Callable[[], float] = time.monotonic,
                   sleep: Callable[[float], None] = time.sleep) -> Compute:
    """The compute for ``spec`` (see :func:`parse_compute_device`) and a step of ``need`` bytes (see
    :func:`step_bytes`); ``declared``: the checkpoint's float dtype. ``detect`` (default: NVML and psutil now) and
    ``cuda_available`` (default: torch's) are the boundary a test replaces. ``ValueError`` for a device torch does
    not have or, after ``wait_s`` seconds, a GPU that never had room."""
    import torch

    from lsaq.planning.detect import detect as detect_now

    spec = check_compute_device(spec, cuda_available)
    detect = detect or detect_now
    cuda = (cuda_available or torch.cuda.is_available)()
    if spec == CPU:
        return cpu_compute()
    if spec != AUTO:
        return Compute(torch.device(spec), gpu_dtype(int(spec.split(":")[1]), declared), "asked for")
    found = with_torch_gpus(detect(), cuda)
    if not found.gpus:
        return cpu_compute(f"auto: no NVIDIA GPU ({found.nvml_status})")
    if not cuda:
        return cpu_compute(f"auto: {len(found.gpus)} NVIDIA GPU(s), but torch has no CUDA (a CPU build?)")
    deadline, said = clock() + wait_s, None
    while True:
        best = found.best_gpu()
        if best is not None and best.free - GPU_RESERVE >= need:
            index = _torch_index(best.uuid, found.gpus.index(best))
            return Compute(torch.device(f"cuda:{index}"), gpu_dtype(index, declared),
                           f"auto: GPU {best.index} {best.name}, {format_bytes(best.free)} free, a step needs "
                           f"{format_bytes(need)}")
        most = format_bytes(best.free) if best is not None else "none visible"
        remaining = deadline - clock()
        if remaining <= 0:
            raise ValueError(f"compute device auto: no GPU had {format_bytes(need + GPU_RESERVE)} free for one layer "
                             f"and its activations in {wait_s:g} s (the most free: {most}); free GPU memory, pass "
                             f"--compute-device cpu, or use fewer or shorter calibration sequences")
        if said is None or clock() - said >= PROGRESS_S:
            log.warning("compute device auto: waiting for a GPU with %s free (the most free now: %s; up to %.0f s "
                        "more)", format_bytes(need + GPU_RESERVE), most, remaining)
            said = clock()
        sleep(min(POLL_S, remaining))
        found = with_torch_gpus(detect(), cuda)


def compute_for(spec: str, config: Mapping[str, Any], positions: int, *, declared: str | None = None,
                dtype: "torch.dtype | None" = None, extra: int = 0, wait_s: float = DEFAULT_WAIT_S) -> Compute:
    """The compute for a walk of the model of HF ``config`` over ``positions`` tokens per layer call: what
    :func:`choose_compute` gives for the step's bytes (:func:`step_bytes`) plus ``extra`` (a stage's own buffers).
    ``dtype``: compute in it on any device (quantization reads float32 weights so its codes are the CPU's);
    None: 16 bits on a GPU, float32 on the CPU."""
    import torch

    from lsaq.models.families import model_shape

    spec = parse_compute_device(spec)
    if spec == CPU:
        return cpu_compute()
    need = step_bytes(model_shape(config), positions, dtype or torch.bfloat16) + extra
    chosen = choose_compute(spec, need, declared=declared, wait_s=wait_s)
    if dtype is not None and chosen.dtype != dtype:
        chosen = Compute(chosen.device, dtype, chosen.reason)
    log.info("computing on %s in %s (%s)", chosen.device, str(chosen.dtype).removeprefix("torch."), chosen.reason)
    return chosen


__all__ = ["AUTO", "CHOICES", "CPU", "Compute", "DEFAULT_WAIT_S", "RUNTIME_BYTES", "check_compute_device",
           "check_max_memory", "host_need", "within_max_memory",
           "choose_compute", "compute_for", "cpu_compute",
           "gpu_dtype", "parse_compute_device", "step_bytes"]
