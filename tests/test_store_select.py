"""On-device selection (``lsaq download --device local``): the most faithful build that fits the memory free now."""

from __future__ import annotations

import pytest

from lsaq.cli import main
from lsaq.models.identity import ModelRef
from lsaq.planning.detect import MemoryWaitTimeout
from lsaq.planning.devices import DeviceProfile, MemoryKind
from lsaq.records import sha256_hex
from lsaq.store.backend import ObjectNotFoundError
from lsaq.store.manifest import BuildManifest, build_id, record_bytes
from lsaq.store.select import NoBuildFitsError, cap, select_build, select_local
from lsaq.store.stage import open_store

MiB = 2**20
MODEL = ModelRef(id="default", model_type="llama", num_layers=2, content_hash="ab" * 32)


def put_build(store, device: str, required_mib: int, kl: float | None, *, revision: str = "sha256-abababababababab",
              published_at: str = "2026-11-29T10:00:00+00:00", model_slug: str = "tiny",
              runtimes: tuple[str, ...] = ("lsaq",)) -> BuildManifest:
    """A small but complete build (its files really stored, its manifest last), with the figures selection reads."""
    data = f"{device}-{required_mib}-{kl}".encode()
    files = {"model.safetensors": (len(data), sha256_hex(data))}
    plan_id = sha256_hex(device.encode())
    fid = None if kl is None else {"kl_mean": kl, "kl_p99": kl * 5, "top1_agreement": 1 - kl, "positions": 64}
    m = BuildManifest(build_id=build_id(plan_id, files), model_slug=model_slug, revision=revision, device_slug=device,
                      model=MODEL, device={"name": device, "usable_bytes": required_mib * MiB}, plan_id=plan_id,
                      strategy="lsaq", context=512, batch=1, avg_bits={"all_weights": 8.0}, weights_bytes=len(data),
                      required_bytes=required_mib * MiB, dtype="bfloat16", runtimes=runtimes, files=files,
                      evaluation=None if fid is None else {"fidelity": fid, "metrics": {}},
                      published_at=published_at)
    store.put_bytes(f"{m.prefix}/model.safetensors", data)
    store.put_bytes(m.key, record_bytes(m.to_json()))
    return m


def local(usable_mib: int) -> DeviceProfile:
    return DeviceProfile(name="local", memory=usable_mib * MiB, kind=MemoryKind.SYSTEM, reserve=0,
                         notes="test", origin="detected: test")


@pytest.fixture
def store(tmp_path):
    s = open_store(tmp_path / "store")
    put_build(s, "big", 400, 0.001)
    put_build(s, "mid", 300, 0.02)
    put_build(s, "small", 200, 0.3)
    put_build(s, "unevaluated", 250, None)
    return s


@pytest.mark.parametrize("usable, chosen", [(1000, "big"), (399, "mid"), (300, "mid"), (299, "small"),
                                            (200, "small")])
def test_the_most_faithful_build_that_fits_is_chosen(store, usable, chosen):
    """Known quality first: at 299 MiB the evaluated 200 MiB build beats the unevaluated 250 MiB one."""
    assert select_build(store, "tiny", available=local(usable)).build.device_slug == chosen


def test_none_fits_lists_every_build_and_what_is_free(store):
    with pytest.raises(NoBuildFitsError) as e:
        select_build(store, "tiny", available=local(100))
    msg = str(e.value)
    assert "100.00 MiB usable" in msg
    assert msg.index("small") < msg.index("unevaluated") < msg.index("mid") < msg.index("big")  # by need
    assert "needs 200.00 MiB (KL 0.3000)" in msg and "not evaluated" in msg


def test_only_the_newest_revision_competes(store):
    put_build(store, "small", 200, 0.0001, revision="sha256-cdcdcdcdcdcdcdcd", published_at="2026-11-29T12:00:00+00:00")
    picked = select_build(store, "tiny", available=local(1000)).build
    assert picked.revision == "sha256-cdcdcdcdcdcdcdcd" and picked.device_slug == "small"


def test_unknown_model_and_limits(store):
    with pytest.raises(ObjectNotFoundError, match="no complete build of model 'other'"):
        select_build(store, "other", available=local(1000))
    assert cap(local(1000), 300 * MiB).usable == 300 * MiB and cap(local(100), 300 * MiB).usable == 100 * MiB
    assert select_local(store, "tiny", max_memory=310 * MiB, probe=lambda: local(1000)).build.device_slug == "mid"


def test_only_builds_a_runtime_here_runs_compete(store):
    """The most faithful build is a GGUF: picked where llama.cpp is installed (or asked for), passed over where not."""
    put_build(store, "gguf", 300, 0.0001, runtimes=("llama.cpp",))

    def pick(**kw):
        return select_local(store, "tiny", probe=lambda: local(1000), **kw).build.device_slug

    assert pick(installed=frozenset({"lsaq"})) == "big"
    assert pick(installed=frozenset({"lsaq", "llama.cpp"})) == "gguf"
    assert pick(runtime="llama.cpp", installed=frozenset({"lsaq"})) == "gguf"  # asked for: the user runs it elsewhere
    assert pick(runtime="transformers") == "big"  # lsaq's packed runtime or stock transformers
    with pytest.raises(NoBuildFitsError, match=r"^no build of tiny runs in vllm: its builds run in llama.cpp, lsaq$"):
        pick(runtime="vllm")
    only_gguf = open_store(store.uri + "/only-gguf")
    put_build(only_gguf, "g", 10, 0.1, runtimes=("llama.cpp",))
    with pytest.raises(NoBuildFitsError, match=r"^no build of tiny runs in lsaq \(installed here\): its builds run in "
                                               r"llama.cpp \(llama.cpp: pip install 'lsaq\[llama\]'\)$"):
        select_local(only_gguf, "tiny", probe=lambda: local(1000), installed=frozenset({"lsaq"}))


def test_waiting_for_memory_polls_until_the_smallest_build_fits(store):
    seen = iter([100, 150, 260, 260])
    picked = select_local(store, "tiny", wait_seconds=60, probe=lambda: local(next(seen)))
    assert picked.build.device_slug == "small" and picked.available.usable == 260 * MiB
    with pytest.raises(MemoryWaitTimeout):
        select_local(store, "tiny", wait_seconds=0, probe=lambda: local(100))
    with pytest.raises(NoBuildFitsError, match="waiting would not help"):
        select_local(store, "tiny", wait_seconds=60, max_memory=150 * MiB, probe=lambda: local(1000))


def test_download_device_local_from_the_command_line(store, tmp_path, capsys):
    # A limit below what this machine has free makes the choice deterministic.
    rc = main(["download", "--model", "tiny", "--device", "local", "--max-memory", "310MiB", "--to",
               str(tmp_path / "got"), "--store", store.uri])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "chose mid" in out and (tmp_path / "got" / "model.safetensors").read_bytes() == b"mid-300-0.02"
    assert main(["download", "--model", "tiny", "--device", "local", "--max-memory", "10MiB", "--to",
                 str(tmp_path / "none"), "--store", store.uri]) == 2
    assert "no build of tiny fits the 10.00 MiB usable" in capsys.readouterr().err
    assert not (tmp_path / "none").exists()
    assert main(["download", "--model", "tiny", "--device", "mid", "--max-memory", "1GiB", "--to",
                 str(tmp_path / "x"), "--store", store.uri]) == 2
    assert "apply to --device local" in capsys.readouterr().err
    assert main(["download", "--model", "tiny", "--device", "local", "--runtime", "ollama", "--to",
                 str(tmp_path / "y"), "--store", store.uri]) == 2
    assert "unknown runtime 'ollama'; valid runtimes: transformers, vllm, llama.cpp" in capsys.readouterr().err
    put_build(store, "gguf", 300, 0.0001, runtimes=("llama.cpp",))
    assert main(["download", "--model", "tiny", "--device", "local", "--runtime", "llama.cpp", "--max-memory",
                 "310MiB", "--to", str(tmp_path / "gguf"), "--store", store.uri]) == 0
    assert "chose gguf" in capsys.readouterr().out
