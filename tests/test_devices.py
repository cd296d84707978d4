"""Device catalog, user device files, live detection (NVML patched), waiting for memory, ``lsaq devices``."""

from __future__ import annotations

import logging
import sys

import pytest

from lsaq.cli import main
from lsaq.planning import detect as detect_mod
from lsaq.planning.detect import MemoryWaitTimeout, detect, detect_local, wait_for_memory
from lsaq.planning.devices import DeviceProfile, MemoryKind, list_devices, load_catalog, parse_device_file
from lsaq.planning.stage import DeviceRequest, resolve_device

GIB, MIB = 1024**3, 1024**2
REQUIRED = [
    "rtx3060", "rtx3060-8gb", "rtx3070", "rtx3080", "rtx3090", "rtx4060", "rtx4060ti-16gb", "rtx4070", "rtx4080",
    "rtx4090", "t4", "l4", "a10g", "a100-40gb", "a100-80gb", "h100-80gb", "jetson-orin-nano-8gb",
    "jetson-agx-orin-32gb", "jetson-agx-orin-64gb", "cpu-8gb", "cpu-16gb", "cpu-32gb",
]


# ------------------------------------------------------------------------------------------- catalog


def test_catalog_has_every_required_profile_with_a_source():
    cat = {p.name: p for p in load_catalog()}
    assert set(REQUIRED) <= set(cat)
    for p in cat.values():
        assert p.source and p.notes and 0 <= p.reserve < p.memory and p.kind in MemoryKind
    assert cat["rtx3060"].memory == 12 * GIB and cat["rtx3060"].kind is MemoryKind.DEDICATED
    assert cat["h100-80gb"].memory == 81559 * MIB
    nano = cat["jetson-orin-nano-8gb"]
    assert nano.kind is MemoryKind.UNIFIED and abs(nano.usable - 5.2 * GIB) < 1 * MIB
    assert cat["cpu-16gb"].kind is MemoryKind.SYSTEM


def test_profile_json_roundtrip():
    p = resolve_device("rtx4090")
    assert DeviceProfile.from_json(p.to_json()) == p
    assert p.to_json()["usable_bytes"] == p.memory - p.reserve


def test_unknown_device_lists_valid_names():
    with pytest.raises(ValueError, match=r"unknown device 'rtx9090'.*rtx3060.*local"):
        resolve_device("rtx9090")


# ------------------------------------------------------------------------------------------ user files

GOOD = """
version: 1
devices:
  - name: my-gpu
    memory: 6GiB
    kind: dedicated
    reserve: 300MiB
    notes: laptop
  - {name: rtx3060, memory: 11, kind: dedicated, reserve: 0.5}
"""


def test_user_file_adds_and_replaces(tmp_path):
    f = tmp_path / "my_devices.yaml"
    f.write_text(GOOD)
    mine = resolve_device(DeviceRequest("my-gpu", device_file=f))
    assert (mine.memory, mine.reserve, mine.origin) == (6 * GIB, 300 * MIB, str(f))
    replaced = resolve_device(DeviceRequest("rtx3060", device_file=f))  # a plain number is GiB
    assert (replaced.memory, replaced.reserve) == (11 * GIB, GIB // 2)
    assert len(list_devices(f)) == len(load_catalog()) + 1


def test_json_device_file(tmp_path):
    f = tmp_path / "d.json"
    f.write_text('{"devices": [{"name": "box", "memory": "16GB", "kind": "system", "reserve": "1GB"}]}')
    assert resolve_device(DeviceRequest("box", device_file=f)).memory == 16_000_000_000


ENTRY = "name: x1, memory: 8GiB, kind: dedicated, reserve: 1GiB"


@pytest.mark.parametrize("devices, match", [
    ("[{name: x1, memory: 8GiB, kind: dedicated}]", "missing field 'reserve'"),
    ("[{name: x1, memory: -8, kind: dedicated, reserve: 1}]", "'memory' must not be negative"),
    ("[{name: x1, memory: -8GiB, kind: dedicated, reserve: 1GiB}]", "negative"),
    (f"[{{{ENTRY}, colour: red}}]", "unknown field 'colour'"),
    (f"[{{{ENTRY}}}, {{{ENTRY}}}]", "duplicate name 'x1'"),
    ("[{name: x1, memory: 8GiB, memory: 9GiB, kind: dedicated, reserve: 1GiB}]", "duplicate key 'memory'"),
    ("[{name: x1, memory: 8GiB, kind: tpu, reserve: 1GiB}]", "field 'kind'.*dedicated, unified, system"),
    ("[{name: x1, memory: 8GiB, kind: dedicated, reserve: 8GiB}]", "'reserve'.*less than memory"),
    ("[{name: x1, memory: '8', kind: dedicated, reserve: 1GiB}]", "needs a unit"),
    ("[{name: x1, memory: 8 parsecs, kind: dedicated, reserve: 1GiB}]", "unknown unit"),
    ("[{name: local, memory: 8GiB, kind: dedicated, reserve: 1GiB}]", "reserved"),
    ("[{name: My GPU, memory: 8GiB, kind: dedicated, reserve: 1GiB}]", "field 'name'"),
    ("[]", "non-empty list"),
    ("[just-a-string]", "expected a mapping"),
])
def test_malformed_device_files_name_field_and_file(tmp_path, devices, match):
    f = tmp_path / "bad.yaml"
    f.write_text(f"devices: {devices}\n")
    with pytest.raises(ValueError, match=match) as e:
        resolve_device(DeviceRequest("x1", device_file=f))
    assert str(f) in str(e.value)


@pytest.mark.parametrize("text, match", [
    ("devices: [{name: a, memory: 1GiB, kind: system, reserve: 0GiB}]\nextra: 1\n", "unknown top-level key 'extra'"),
    ("version: 2\ndevices: []\n", "version 2"),
    ("- name: a\n", "'devices' list"),
    ("devices: [unclosed\n", "not valid YAML"),
])
def test_malformed_file_structure(text, match):
    with pytest.raises(ValueError, match=match):
        parse_device_file(text, "f.yaml")


def test_missing_device_file(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        resolve_device(DeviceRequest("rtx3060", device_file=tmp_path / "nope.yaml"))


def test_catalog_requires_runtimes_and_sources():
    with pytest.raises(ValueError, match="missing field 'runtime'"):
        parse_device_file("devices: [{name: a, memory: 1GiB, kind: system, reserve: 0GiB}]", "cat", require_source=True)
    with pytest.raises(ValueError, match="missing field 'notes'"):
        parse_device_file("devices: [{name: a, memory: 1GiB, kind: system, reserve: 0GiB, runtime: llama.cpp}]", "cat",
                          require_source=True)
    boards = {p.name: p.runs.value for p in load_catalog() if p.kind is MemoryKind.SYSTEM}
    assert set(boards.values()) == {"llama.cpp"}  # boards and CPU hosts run GGUF builds


# ---------------------------------------------------------------------------------------- detection


def test_no_nvml_module_falls_back_to_system_ram(monkeypatch, fake_ram, caplog):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import raises ImportError
    with caplog.at_level(logging.WARNING):
        p = detect_local()
    assert (p.name, p.kind, p.memory) == ("local", MemoryKind.SYSTEM, 20 * GIB)
    assert p.usable == 20 * GIB - detect_mod.LOCAL_RAM_RESERVE
    assert "no usable NVIDIA GPU" in caplog.text and "not installed" in caplog.text


def test_nvml_init_failure_falls_back(monkeypatch, fake_ram, caplog, fake_nvml):
    fake_nvml([], init_error="Driver Not Loaded")
    with caplog.at_level(logging.WARNING):
        p = detect_local()
    assert p.kind is MemoryKind.SYSTEM and "Driver Not Loaded" in caplog.text and "Driver Not Loaded" in p.origin


def test_nvml_no_gpus_and_jetson_is_unified(monkeypatch, fake_ram, tmp_path, fake_nvml):
    fake_nvml([])
    tegra = tmp_path / "nv_tegra_release"
    tegra.write_text("R36")
    monkeypatch.setattr(detect_mod, "_TEGRA_RELEASE", tegra)
    assert detect_local().kind is MemoryKind.UNIFIED


def test_picks_gpu_with_most_free_memory(monkeypatch, fake_ram, fake_nvml):
    gpus = [("A", 24 * GIB, 2 * GIB), ("B", 12 * GIB, 10 * GIB), ("C", 80 * GIB, 70 * GIB)]
    fake_nvml(gpus, broken=(2,))  # C cannot report: skipped
    d = detect()
    assert [g.index for g in d.gpus] == [0, 1] and "skipped GPU 2" in d.nvml_status
    p = detect_local(d)
    assert (p.kind, p.memory, p.reserve) == (MemoryKind.DEDICATED, 10 * GIB, detect_mod.LOCAL_GPU_RESERVE)
    assert "GPU 1" in p.origin and "B" in p.notes


def test_cuda_visible_devices(monkeypatch, fake_ram, fake_nvml):
    gpus = [("A", 24 * GIB, 2 * GIB), ("B", 12 * GIB, 10 * GIB)]
    fake_nvml(gpus)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    assert detect_local().memory == 2 * GIB
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-00001")
    assert detect_local().memory == 10 * GIB
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "-1")
    assert detect_local().kind is MemoryKind.SYSTEM


def test_real_nvml_when_available():
    """Exercised for real only where NVML and a GPU exist; elsewhere the fallback must still work."""
    gpus, status = detect_mod.query_nvml()
    if not gpus:
        assert detect_local().kind in (MemoryKind.SYSTEM, MemoryKind.UNIFIED)
        pytest.skip(f"no NVML GPU here: {status}")
    p = detect_local()
    assert p.kind is MemoryKind.DEDICATED and 0 < p.memory <= max(g.total for g in gpus)


def test_local_resolves_live(monkeypatch, fake_ram):
    monkeypatch.setitem(sys.modules, "pynvml", None)
    assert resolve_device("local").memory == 20 * GIB


# ------------------------------------------------------------------------------------------ waiting


def _probe(free_values):
    it = iter(free_values)
    return lambda: DeviceProfile("local", next(it), MemoryKind.DEDICATED, 0, notes="fake")


def test_wait_for_memory_proceeds_when_free(clock):
    p = wait_for_memory(5 * GIB, 60, poll_s=2, probe=_probe([1 * GIB, 3 * GIB, 6 * GIB]), clock=clock, sleep=clock.sleep)
    assert p.memory == 6 * GIB and clock.t == 4


def test_wait_for_memory_times_out_clearly(clock):
    with pytest.raises(MemoryWaitTimeout, match=r"waited 5s for 5.00 GiB.*most seen was 3.00 GiB"):
        wait_for_memory(5 * GIB, 5, poll_s=2, probe=_probe([1 * GIB, 3 * GIB, 2 * GIB, 1 * GIB]), clock=clock, sleep=clock.sleep)
    assert clock.t == 5


def test_wait_zero_timeout_checks_once(clock):
    assert wait_for_memory(1, 0, probe=_probe([2]), clock=clock, sleep=clock.sleep).memory == 2


# ---------------------------------------------------------------------------------------------- CLI


def test_cli_devices(capsys):
    assert main(["devices"]) == 0
    out = capsys.readouterr().out
    for name in REQUIRED + ["local"]:
        assert name in out
    assert "5.20 GiB" in out  # Orin Nano usable


def test_cli_devices_detect(monkeypatch, fake_ram, capsys):
    monkeypatch.setitem(sys.modules, "pynvml", None)
    assert main(["devices", "--detect"]) == 0
    out = capsys.readouterr().out
    assert "NVML:" in out and "system RAM: 20.00 GiB available of 32.00 GiB" in out and "local ->" in out


def test_cli_bad_device_file(tmp_path, capsys):
    f = tmp_path / "bad.yaml"
    f.write_text("devices: [{name: x, memory: -1GiB, kind: dedicated, reserve: 0GiB}]\n")
    assert main(["devices", "--device-file", str(f)]) == 2
    err = capsys.readouterr().err
    assert "error" in err and str(f) in err and "memory" in err
