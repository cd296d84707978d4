"""Live resource detection for the ``local`` device: NVIDIA GPUs through NVML, else system RAM through psutil.

``local`` budgets what is free *now*: the GPU with the most free memory (NVML, package ``nvidia-ml-py``), or,
with no GPU, no driver or no NVML, the available system RAM. Other processes' allocations are therefore
already excluded; the reserve only covers what the model's own process will add before loading weights (its
CUDA context, or the Python/torch runtime). ``CUDA_VISIBLE_DEVICES`` is honoured, since the runtime can only
use the GPUs it lists. :func:`wait_for_memory` polls until a requirement is free.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from lsaq.planning.devices import LOCAL, DeviceProfile, MemoryKind
from lsaq.units import format_bytes

log = logging.getLogger(__name__)

MIB = 1024**2
LOCAL_GPU_RESERVE = 512 * MIB  # CUDA context + cuBLAS workspace of the process that will load the model
LOCAL_RAM_RESERVE = 512 * MIB  # the Python + torch runtime itself
_TEGRA_RELEASE = Path("/etc/nv_tegra_release")  # present on Jetson (L4T): memory is unified


@dataclass(frozen=True)
class GpuMemory:
    index: int
    name: str
    uuid: str
    total: int
    free: int
    used: int


@dataclass(frozen=True)
class Detection:
    """What this machine offers: visible GPUs (if NVML works) and system RAM."""

    gpus: tuple[GpuMemory, ...]
    nvml_status: str  # "ok (...)" or why NVML gave nothing
    system_total: int
    system_available: int
    unified: bool = False  # Jetson-style shared memory
    notes: list[str] = field(default_factory=list)

    def best_gpu(self) -> GpuMemory | None:
        """The GPU with the most free memory; ties go to the lowest index."""
        return min(self.gpus, key=lambda g: (-g.free, g.index)) if self.gpus else None

    def profile(self) -> DeviceProfile:
        gpu = self.best_gpu()
        if gpu is not None:
            return DeviceProfile(
                name=LOCAL,
                memory=gpu.free,
                kind=MemoryKind.DEDICATED,
                reserve=min(LOCAL_GPU_RESERVE, gpu.free),
                notes=f"GPU {gpu.index} {gpu.name}: {format_bytes(gpu.free)} free of {format_bytes(gpu.total)}",
                source="NVML, live",
                origin=f"detected: NVML GPU {gpu.index} ({gpu.uuid})",
            )
        kind = MemoryKind.UNIFIED if self.unified else MemoryKind.SYSTEM
        return DeviceProfile(
            name=LOCAL,
            memory=self.system_available,
            kind=kind,
            reserve=min(LOCAL_RAM_RESERVE, self.system_available),
            notes=f"system RAM: {format_bytes(self.system_available)} available of {format_bytes(self.system_total)}",
            source="psutil, live",
            origin=f"detected: system RAM (no GPU: {self.nvml_status})",
        )


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _visible(gpus: list[GpuMemory]) -> list[GpuMemory]:
    """Apply ``CUDA_VISIBLE_DEVICES`` (indices or ``GPU-`` UUID prefixes; parsing stops at an invalid entry, as in CUDA)."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is None:
        return gpus
    chosen: list[GpuMemory] = []
    for token in (t.strip() for t in env.split(",")):
        if token.isdigit():
            match = [g for g in gpus if g.index == int(token)]
        elif token.startswith("GPU-"):
            match = [g for g in gpus if g.uuid.startswith(token)]
        else:
            break
        if not match:
            break
        chosen.extend(g for g in match if g not in chosen)
    return chosen


def query_nvml() -> tuple[list[GpuMemory], str]:
    """Memory of every NVML-visible GPU, and a status line; never raises (no NVML means no GPUs)."""
    try:
        import pynvml
    except ImportError as e:
        return [], f"NVML python bindings not installed (nvidia-ml-py): {e}"
    try:
        pynvml.nvmlInit()
    except Exception as e:  # NVMLError_LibraryNotFound, _DriverNotLoaded, ... and OSError on odd systems
        return [], f"NVML unavailable ({type(e).__name__}: {e})"
    try:
        try:
            driver = _text(pynvml.nvmlSystemGetDriverVersion())
        except Exception:  # noqa: BLE001 - cosmetic
            driver = "?"
        gpus, skipped = [], []
        for i in range(pynvml.nvmlDeviceGetCount()):
            try:
                h = pynvml.nvmlDeviceGetHandleByIndex(i)
                mem = pynvml.nvmlDeviceGetMemoryInfo(h)
                gpus.append(
                    GpuMemory(i, _text(pynvml.nvmlDeviceGetName(h)), _text(pynvml.nvmlDeviceGetUUID(h)),
                              int(mem.total), int(mem.free), int(mem.used))
                )
            except Exception as e:  # a GPU whose memory NVML cannot report (unified memory, lost GPU) is skipped
                skipped.append(f"GPU {i}: {type(e).__name__}: {e}")
        status = f"ok (driver {driver}, {len(gpus)} GPU(s))" + (f"; skipped {'; '.join(skipped)}" if skipped else "")
        return gpus, status
    except Exception as e:
        return [], f"NVML query failed ({type(e).__name__}: {e})"
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:  # noqa: BLE001 - nothing left to do
            pass


def system_memory() -> tuple[int, int]:
    """``(total, available)`` system RAM in bytes (psutil: available = what can be given without swapping)."""
    import psutil

    vm = psutil.virtual_memory()
    return int(vm.total), int(vm.available)


def detect() -> Detection:
    """Query NVML and psutil now."""
    gpus, status = query_nvml()
    visible = _visible(gpus)
    notes = []
    if len(visible) != len(gpus):
        notes.append(f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}: {len(visible)} of {len(gpus)} GPU(s) visible")
        if not visible and gpus:
            status = f"{status}; none visible under CUDA_VISIBLE_DEVICES"
    total, available = system_memory()
    return Detection(tuple(visible), status, total, available, unified=_TEGRA_RELEASE.exists(), notes=notes)


def detect_local(detection: Detection | None = None) -> DeviceProfile:
    """The ``local`` profile: the GPU with the most free memory, else available system RAM (logged)."""
    d = detect() if detection is None else detection
    profile = d.profile()
    if d.best_gpu() is None:
        log.warning("local device: no usable NVIDIA GPU (%s); budgeting available system RAM instead", d.nvml_status)
    log.info("local device: %s [%s]", profile.describe(), profile.origin)
    return profile


class MemoryWaitTimeout(ValueError):
    """``wait_for_memory`` ran out of time."""


def wait_for_memory(
    required: int,
    timeout_s: float,
    *,
    poll_s: float = 2.0,
    probe: Callable[[], DeviceProfile] | None = None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> DeviceProfile:
    """Poll ``probe`` (default: :func:`detect_local`) until its usable memory is at least ``required`` bytes.

    Returns the profile seen at that moment.
    Raises :class:`MemoryWaitTimeout` naming what was needed and the most seen once ``timeout_s`` has passed.
    """
    if timeout_s < 0:
        raise ValueError(f"wait timeout must not be negative, got {timeout_s}")
    probe = probe or detect_local
    deadline = clock() + timeout_s
    best = None
    while True:
        profile = probe()
        if profile.usable >= required:
            return profile
        best = profile if best is None or profile.usable > best.usable else best
        remaining = deadline - clock()
        if remaining <= 0:
            raise MemoryWaitTimeout(
                f"waited {timeout_s:g}s for {format_bytes(required)} of usable memory on {profile.name}; "
                f"the most seen was {format_bytes(best.usable)} ({best.notes}). Free memory on the device, "
                "wait longer (--wait-for-memory), or plan for less (shorter --context, smaller --batch)"
            )
        log.info("waiting for memory: %s usable, %s needed", format_bytes(profile.usable), format_bytes(required))
        sleep(min(poll_s, remaining))
