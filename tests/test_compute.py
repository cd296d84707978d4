"""The compute device: parsing, the ``auto`` choice with NVML replaced at its boundary (most free memory wins; a
busy GPU is waited for, then a clear error), and what one step of the walk needs."""

from __future__ import annotations

import json
import logging
from importlib import resources

import pytest
import torch

from lsaq import compute
from lsaq.compute import check_compute_device, choose_compute, cpu_compute, parse_compute_device, step_bytes
from lsaq.models.families import model_shape

GIB = 1024**3


@pytest.mark.parametrize("text, want", [("auto", "auto"), (" CPU ", "cpu"), ("cuda", "cuda:0"), ("cuda:3", "cuda:3"),
                                        ("CUDA:01", "cuda:1")])
def test_parse_compute_device(text, want):
    assert parse_compute_device(text) == want


@pytest.mark.parametrize("text", ["gpu", "cuda:", "cuda:-1", "cuda:x", "mps", "", "cpu:0"])
def test_bad_compute_device_names_the_value_and_the_choices(text):
    with pytest.raises(ValueError, match=rf"compute device {text!r} is not one of: auto, cpu or cuda:N"):
        parse_compute_device(text)


@pytest.fixture
def gpus_usable(monkeypatch):
    """torch's CUDA queries answered as an Ampere-class machine would (this machine has no GPU)."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)  # no UUIDs to match: the visible position is used


def test_cpu_is_float32_whatever_the_machine(fake_nvml, fake_ram):
    fake_nvml([("H100", 80 * GIB, 80 * GIB)])
    assert choose_compute("cpu", 10**12, cuda_available=lambda: True) == cpu_compute()
    assert cpu_compute().dtype == torch.float32 and not cpu_compute().on_gpu


def test_auto_without_a_gpu_is_the_cpu_and_says_why(fake_nvml, fake_ram):
    fake_nvml([], init_error="Driver Not Loaded")
    c = choose_compute("auto", GIB)
    assert (c.device.type, c.dtype) == ("cpu", torch.float32)
    assert "no NVIDIA GPU" in c.reason and "Driver Not Loaded" in c.reason
    fake_nvml([("A", 24 * GIB, 20 * GIB)])
    c = choose_compute("auto", GIB, cuda_available=lambda: False)
    assert c.device.type == "cpu" and "torch has no CUDA" in c.reason


def test_auto_takes_the_gpu_with_the_most_free_memory(fake_nvml, fake_ram, gpus_usable):
    fake_nvml([("A", 24 * GIB, 2 * GIB), ("B", 12 * GIB, 10 * GIB), ("C", 80 * GIB, 70 * GIB)], broken=(2,))
    c = choose_compute("auto", 4 * GIB, cuda_available=lambda: True)
    assert c.device == torch.device("cuda:1") and c.dtype == torch.bfloat16
    assert "GPU 1 B" in c.reason and c.to_json()["dtype"] == "bfloat16"
    assert choose_compute("auto", GIB, declared="float16", cuda_available=lambda: True).dtype == torch.float16


def test_auto_follows_cuda_visible_devices(fake_nvml, fake_ram, gpus_usable, monkeypatch):
    fake_nvml([("A", 24 * GIB, 2 * GIB), ("B", 12 * GIB, 10 * GIB), ("C", 24 * GIB, 20 * GIB)])
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1,0")  # torch numbers them 0 (B) and 1 (A)
    assert choose_compute("auto", GIB, cuda_available=lambda: True).device == torch.device("cuda:0")


def test_auto_waits_for_a_busy_gpu_then_takes_it(fake_ram, gpus_usable, caplog, clock):
    frees = iter([1, 1, 3, 9])

    def nvml_one_gpu():
        from lsaq.planning.detect import Detection, GpuMemory

        return Detection((GpuMemory(0, "A", "GPU-00000", 24 * GIB, next(frees) * GIB, 0),), "ok", GIB, GIB)

    with caplog.at_level(logging.WARNING, logger="lsaq.compute"):
        c = choose_compute("auto", 4 * GIB, detect=nvml_one_gpu, cuda_available=lambda: True, wait_s=60,
                           clock=clock, sleep=clock.sleep)
    assert c.device == torch.device("cuda:0") and clock.t == 3 * compute.POLL_S
    assert "waiting for a GPU" in caplog.text


def test_auto_gives_up_after_the_wait_with_what_to_do(fake_ram, gpus_usable, clock):
    from lsaq.planning.detect import Detection, GpuMemory

    found = Detection((GpuMemory(0, "A", "GPU-00000", 24 * GIB, 3 * GIB, 21 * GIB),), "ok", GIB, GIB)
    with pytest.raises(ValueError, match=r"no GPU had 8.50 GiB free .* in 30 s \(the most free: 3.00 GiB\).*"
                                         r"--compute-device cpu"):
        choose_compute("auto", 8 * GIB, detect=lambda: found, cuda_available=lambda: True, wait_s=30,
                       clock=clock, sleep=clock.sleep)
    assert clock.t == 30


def test_a_cuda_device_torch_does_not_have_is_refused():
    with pytest.raises(ValueError, match=r"compute device cuda:2: torch sees 0 CUDA device\(s\) \(no CUDA"):
        choose_compute("cuda:2", GIB, cuda_available=lambda: False)
    with pytest.raises(ValueError, match=r"compute device cuda:0: torch sees 0 CUDA device\(s\); valid: auto"):
        check_compute_device("cuda", cuda_available=lambda: True)
    assert check_compute_device(" Auto") == "auto"


def test_step_bytes_of_a_7b_at_512_positions():
    config = json.loads(resources.files("lsaq").joinpath("data/configs/llama-2-7b.json").read_text())
    shape = model_shape(config)
    layer = 4 * 4096 * 4096 + 3 * 4096 * 11008 + 2 * 4096  # q/k/v/o, gate/up/down, two norms
    resident = 2 * 32000 * 4096 + 4096  # embedding, untied head, final norm
    acts = 512 * (8 * 4096 + 3 * 11008)
    assert step_bytes(shape, 512) == 4 * (layer + resident + acts)
    assert step_bytes(shape, 512, torch.bfloat16) == 2 * (layer + resident + acts)


def test_max_memory_sizes():
    from lsaq.compute import check_max_memory

    assert check_max_memory(None) is None and check_max_memory("8GiB") == 8 * GIB and check_max_memory(5) == 5
    for bad, message in (("x", "max memory: cannot read 'x' as a size"), ("0", "max memory must be positive")):
        with pytest.raises(ValueError, match=message):
            check_max_memory(bad)


def test_what_a_step_needs_on_the_host_and_what_a_limit_leaves():
    from lsaq.compute import RUNTIME_BYTES, Compute, host_need, within_max_memory

    config = json.loads(resources.files("lsaq").joinpath("data/configs/llama-2-7b.json").read_text())
    shape = model_shape(config)
    cpu = host_need(shape, 512, 4096, cpu_compute())
    assert cpu == {"runtime": RUNTIME_BYTES, "one step (resident parts, a layer, a call's activations)":
                   step_bytes(shape, 512), "hidden states": 3 * 4096 * 4096 * 4, "buffers": 0}
    gpu = host_need(shape, 512, 4096, Compute(torch.device("cuda:0"), torch.bfloat16, "test"))
    assert gpu == {"runtime": RUNTIME_BYTES, "one layer as read": (4 * 4096**2 + 3 * 4096 * 11008 + 2 * 4096) * 4}
    assert within_max_memory(None, cpu) is None
    assert within_max_memory(sum(cpu.values()) + 7, cpu) == 7
    with pytest.raises(ValueError, match=r"--max-memory 2.00 GiB is less than one layer's step needs here: "
                                         r"[\d.]+ GiB \(runtime 512.00 MiB, one step .*\); allow at least"):
        within_max_memory(2 * GIB, cpu)


def test_auto_without_nvml_bindings_takes_the_gpu_torch_sees(fake_nvml, fake_ram, gpus_usable, monkeypatch):
    import sys
    from types import SimpleNamespace

    monkeypatch.setitem(sys.modules, "pynvml", None)  # `import pynvml` fails: nvidia-ml-py not installed
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda i: ((3 * GIB, 80 * GIB), (40 * GIB, 80 * GIB))[i])
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: SimpleNamespace(name=f"H{i}", uuid=f"u-{i}"))
    c = choose_compute("auto", 4 * GIB, cuda_available=lambda: True)
    assert c.device == torch.device("cuda:1") and "GPU 1 H1" in c.reason
    assert choose_compute("auto", 4 * GIB, cuda_available=lambda: False).device.type == "cpu"
