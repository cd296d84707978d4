"""A stage's memory: host memory as the kernel counts it (the process's resident high-water mark, ``VmHWM``), GPU
memory as torch's allocator counts it, the :class:`RunMemory` record every stage's result carries, and handing
freed heap memory back to the system.

:class:`PeakMemory` resets the marks when the stage starts (``/proc/self/clear_refs``; torch's peak statistics of
the compute device), so a stage run in a long-lived process (a Prefect worker, a test) reports its own peak, not
that of what ran before it. Where the host mark cannot be reset, the peak is the process's since it started
(``since_start``); where it cannot be read (not Linux), None.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

if TYPE_CHECKING:
    import ctypes

STATUS = Path("/proc/self/status")
CLEAR_REFS = Path("/proc/self/clear_refs")


def host_peak_bytes() -> int | None:
    """The process's resident high-water mark in bytes, or None where ``/proc`` does not say."""
    try:
        for line in STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # reported in kB
    except OSError:
        return None
    return None


def reset_host_peak() -> bool:
    """Lower the high-water mark to the current resident memory; False where the kernel does not allow it."""
    try:
        CLEAR_REFS.write_text("5")  # "5": reset the peak RSS (Documentation/filesystems/proc.rst)
    except OSError:
        return False
    return True


@dataclass(frozen=True)
class RunMemory:
    """Where a stage computed and the most memory it held: ``device`` (``cpu``, ``cuda:0``) and ``dtype`` of its
    compute, its peak resident host memory and, on a GPU, the peak of torch's allocations there (None: not known,
    or no GPU used). Part of a stage's record, never of what identifies its result."""

    device: str = "cpu"
    dtype: str = "float32"
    peak_host_bytes: int | None = None
    peak_device_bytes: int | None = None

    def describe(self) -> str:
        """``on cpu (float32), peak host memory 2.59 GiB`` (and the GPU's peak where one was used)."""
        from lsaq.units import format_bytes

        host = format_bytes(self.peak_host_bytes) if self.peak_host_bytes is not None else "unknown"
        gpu = f", GPU {format_bytes(self.peak_device_bytes)}" if self.peak_device_bytes is not None else ""
        return f"on {self.device} ({self.dtype}), peak host memory {host}{gpu}"

    def to_json(self) -> dict[str, Any]:
        return {"device": self.device, "dtype": self.dtype, "peak_host_bytes": self.peak_host_bytes,
                "peak_device_bytes": self.peak_device_bytes}

    @classmethod
    def from_json(cls, obj: Mapping[str, Any] | None) -> "RunMemory | None":
        if obj is None:
            return None
        host, device = obj.get("peak_host_bytes"), obj.get("peak_device_bytes")
        return cls(str(obj.get("device", "cpu")), str(obj.get("dtype", "float32")),
                   None if host is None else int(host), None if device is None else int(device))


@dataclass
class PeakMemory:
    """``with PeakMemory(device) as peak: ...`` then ``peak.host_bytes`` (the peak resident memory while the block
    ran; None where it cannot be read) and ``peak.device_bytes`` (torch's peak allocation on ``device`` when it is
    a CUDA device, else None); ``since_start`` when the host mark could not be reset first."""

    device: Any = None  # a torch.device or its name; None or the CPU: host memory only
    host_bytes: int | None = None
    device_bytes: int | None = None
    since_start: bool = False

    def _cuda(self) -> Any:
        if self.device is None or "cuda" not in str(self.device):
            return None
        import torch

        return torch.device(self.device)

    def __enter__(self) -> "PeakMemory":
        self.since_start = not reset_host_peak()
        self.watch(self.device)
        return self

    def watch(self, device: Any) -> None:
        """Also count ``device``'s allocations from now on (a stage learns its compute device inside the block)."""
        self.device = device
        cuda = self._cuda()
        if cuda is not None:
            import torch

            torch.cuda.reset_peak_memory_stats(cuda)

    def __exit__(self, *exc: object) -> None:
        self.host_bytes = host_peak_bytes()
        cuda = self._cuda()
        if cuda is not None:
            import torch

            self.device_bytes = int(torch.cuda.max_memory_allocated(cuda))

    def record(self, device: Any = "cpu", dtype: Any = "float32") -> RunMemory:
        """The :class:`RunMemory` of the block (after it ran), computed on ``device`` in ``dtype``."""
        return RunMemory(str(device), str(dtype).removeprefix("torch."), self.host_bytes, self.device_bytes)


def trim_heap() -> None:
    """Hand the C heap's free memory back to the system (glibc's ``malloc_trim``; elsewhere nothing).

    A layer's tensors are freed when it is released, but glibc raises its mmap threshold after freeing large
    blocks, so the next layer's tensors come from the heap, whose freed pages it keeps: without this, resident
    memory grows by about a layer's worth every few layers (measured: 0.72 -> 1.07 GiB over 12 layers of width
    2048; flat at 0.72 GiB with it)."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


@functools.cache
def _libc() -> "ctypes.CDLL | None":
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def available_memory() -> int:
    """Bytes of system memory that can be given to this process now without swapping (psutil's ``available``)."""
    import psutil

    return int(psutil.virtual_memory().available)


def memory_shortfall(needed: int) -> int | None:
    """None when ``needed`` bytes fit in the memory available now, else the bytes available (for the message of a
    whole-model step that is refused before it starts)."""
    available = available_memory()
    return available if needed > available else None
