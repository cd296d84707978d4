"""Host memory as the kernel counts it: a block's peak resident memory, and the heap handed back."""

from __future__ import annotations

import mmap
import sys

import pytest

from lsaq.resources import PeakMemory, RunMemory, host_peak_bytes, reset_host_peak, trim_heap

MIB = 2**20
pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="VmHWM and clear_refs are Linux's")


@pytest.fixture(autouse=True)
def resettable():
    if not reset_host_peak():
        pytest.skip("this kernel does not let a process reset its peak RSS (/proc/self/clear_refs)")


def touched(mib: int) -> mmap.mmap:
    """``mib`` MiB of fresh anonymous memory with every page written: resident, whatever the heap held before."""
    m = mmap.mmap(-1, mib * MIB)
    for offset in range(0, mib * MIB, mmap.PAGESIZE):
        m[offset] = 1
    return m


def test_the_peak_covers_what_the_block_touched_and_not_what_came_before():
    touched(96).close()  # before the blocks: not theirs
    with PeakMemory() as quiet:
        pass
    with PeakMemory() as busy:
        touched(128).close()
    assert not quiet.since_start and not busy.since_start
    assert busy.host_bytes >= quiet.host_bytes + 127 * MIB


def test_a_reset_lowers_the_mark_to_what_is_resident():
    held = touched(64)
    touched(160).close()
    high = host_peak_bytes()
    assert reset_host_peak()
    assert host_peak_bytes() <= high - 159 * MIB
    held.close()
    trim_heap()  # never fails, whatever the C library


def test_the_record_of_a_block_and_its_json():
    with PeakMemory("cpu") as peak:
        touched(32).close()
    rec = peak.record("cpu", "torch.float32")
    assert rec.device == "cpu" and rec.dtype == "float32" and rec.peak_device_bytes is None
    assert rec.peak_host_bytes == peak.host_bytes >= 32 * MIB
    assert RunMemory.from_json(rec.to_json()) == rec and RunMemory.from_json(None) is None
    on_gpu = RunMemory("cuda:0", "bfloat16", 3 * 2**30, 2 * 2**30)
    assert RunMemory.from_json(on_gpu.to_json()) == on_gpu
