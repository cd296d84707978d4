"""Nothing left behind after a kill: a process killed with SIGKILL mid-write (quantize, download, publish to a
local store and to S3) leaves temporary data that the next run of the same command removes, and the rerun
succeeds; the temporaries' naming and sweeping (lsaq.atomic) on their own."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import tiny_llama_dir, tiny_plan

from lsaq import atomic
from lsaq.cli import main
from lsaq.precision import Precision

ROOT = Path(__file__).resolve().parents[1]


def dead_pid() -> int:
    """The id of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_dead_processes_temporaries_are_swept_and_no_others(tmp_path):
    target = tmp_path / "model.safetensors"
    mine = atomic.temp_file(target)
    assert mine.name.startswith(f".model.safetensors.lsaq-{atomic.host_tag()}-{os.getpid()}-")
    assert mine.name.endswith(".tmp") and mine.stat().st_size == 0
    dead = tmp_path / f".model.safetensors.lsaq-{atomic.host_tag()}-{dead_pid()}-x1.tmp"
    dead.write_bytes(b"half")
    dead_dir = tmp_path / f".model.safetensors.lsaq-{atomic.host_tag()}-{dead_pid()}-x2.tmp"
    (dead_dir / "sub").mkdir(parents=True)
    (dead_dir / "sub" / "f").write_bytes(b"x")
    kept = [tmp_path / f".model.safetensors.lsaq-0badc0de-{dead_pid()}-x3.tmp",  # another machine's
            tmp_path / ".model.safetensors.abc123.tmp",  # not named by lsaq.atomic
            tmp_path / f".other.lsaq-{atomic.host_tag()}-{dead_pid()}-x4.tmp",  # another target's
            tmp_path / f".model.safetensors.lsaq-{atomic.host_tag()}-1-x5.tmp"]  # a running process's (init)
    for path in kept:
        path.write_bytes(b"keep")
    assert atomic.stale_temporaries(target) == sorted([dead, dead_dir])
    assert atomic.sweep(target) == sorted([dead, dead_dir])
    assert sorted(tmp_path.iterdir()) == sorted([mine, *kept])
    assert atomic.running(os.getpid()) and not atomic.running(dead_pid()) and not atomic.running(0)


def test_atomic_dir_replaces_and_leaves_nothing_beside(tmp_path):
    from lsaq.records import atomic_dir, atomic_write_bytes

    out = tmp_path / "out"
    for content in (b"one", b"two"):
        with atomic_dir(out) as tmp:
            (tmp / "f").write_bytes(content)
        assert (out / "f").read_bytes() == content
    atomic_write_bytes(tmp_path / "r.json", b"{}")
    with atomic_dir(tmp_path / "r.json") as tmp:  # a file in the way is replaced too (download --force)
        (tmp / "f").write_bytes(b"three")
    assert (tmp_path / "r.json" / "f").read_bytes() == b"three"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "r.json"]


# ------------------------------------------------------------------------------------------ kill -9 and rerun

# Runs lsaq's command line with SIGKILL sent to itself at one point of a write (argv[1]); the rest is the command.
KILLED = r'''
import os, signal, sys
point = sys.argv[1]
def die(*_, **__):
    os.kill(os.getpid(), signal.SIGKILL)
if point == "quantize":  # the weights written, the config not yet
    import lsaq.quantization.artifact as m
    real = m.atomic_write_json
    m.atomic_write_json = lambda path, obj: die() if path.name == "config.json" else real(path, obj)
elif point == "download":  # every file fetched and verified, the manifest not yet written
    import lsaq.store.download as m
    m.atomic_write_bytes = die
elif point == "publish-local":  # half of the weights copied into the store
    from lsaq.store.local import LocalBackend
    real = LocalBackend._write
    def write(self, tmp, data=None, source=None):
        if source is not None and source.name == "model.safetensors":
            with open(tmp, "wb") as out:
                out.write(source.read_bytes()[: source.stat().st_size // 2])
            die()
        return real(self, tmp, data, source)
    LocalBackend._write = write
elif point == "publish-s3":  # the first part of the weights' multipart upload stored
    from lsaq.store import s3
    real_init = s3.S3Backend.__init__
    def init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        self.client.meta.events.register("after-call.s3.UploadPart", die)
    s3.S3Backend.__init__ = init
from lsaq.cli import main
sys.exit(main(sys.argv[2:]))
'''


def killed(point: str, argv: list[str]) -> None:
    """Run ``lsaq ARGV`` in a process killed at ``point``; it must have died of SIGKILL."""
    proc = subprocess.run([sys.executable, "-c", KILLED, point, *argv], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == -9, (proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])


def hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A tiny checkpoint, a plan for it, and its artifact published to a local store."""
    from lsaq.models.loading import load_model
    from lsaq.store.stage import open_store, publish

    root = tmp_path_factory.mktemp("leftovers")
    model = tiny_llama_dir(root / "model")
    plan = tiny_plan(load_model(model).info, [Precision.FP16, Precision.INT8, Precision.INT4])
    plan.save(root / "plan.json")
    assert main(["quantize", "--plan", str(root / "plan.json"), "--model", str(model), "--out", str(root / "art"),
                 "--compute-device", "cpu"]) == 0
    publish(open_store(root / "store"), root / "art")
    return root


def test_quantize_killed_then_rerun(built, tmp_path):
    argv = ["quantize", "--plan", str(built / "plan.json"), "--model", str(built / "model"), "--out",
            str(tmp_path / "art"), "--compute-device", "cpu"]
    killed("quantize", argv)
    (left,) = hidden(tmp_path)
    assert (tmp_path / left / "model.safetensors").is_file() and not (tmp_path / "art").exists()
    assert main(argv) == 0
    assert hidden(tmp_path) == [] and (tmp_path / "art" / "config.json").is_file()


def test_download_killed_then_rerun(built, tmp_path):
    argv = ["download", "--store", str(built / "store"), "--model", str(built / "model"), "--device", "test-1gib",
            "--to", str(tmp_path / "dl")]
    killed("download", argv)
    assert len(hidden(tmp_path)) == 1 and not (tmp_path / "dl").exists()
    assert main(argv) == 0
    assert hidden(tmp_path) == [] and (tmp_path / "dl" / "model.safetensors").is_file()


def test_local_publish_killed_then_rerun(built, tmp_path, capsys):
    store = tmp_path / "store"
    killed("publish-local", ["publish", str(built / "art"), "--store", str(store)])
    partial = [p for p in store.rglob(".model.safetensors.*.tmp")]
    assert len(partial) == 1 and not list(store.rglob("manifest.json"))
    assert main(["publish", str(built / "art"), "--store", str(store)]) == 0
    assert "published:" in capsys.readouterr().out
    assert not [p for p in store.rglob(".*") if p.is_file()] and len(list(store.rglob("manifest.json"))) == 1


def test_s3_publish_killed_then_rerun_leaves_no_multipart_upload(mixed_artifact, s3_env, moto_s3, tmp_path,
                                                                  monkeypatch, capsys):
    import boto3

    art, _ = mixed_artifact
    monkeypatch.setenv("LSAQ_CACHE", str(tmp_path / "cache"))  # the registry of uploads, shared with the child
    bucket = s3_env.removeprefix("s3://").split("/")[0]
    client = boto3.client("s3", endpoint_url=moto_s3.env["AWS_ENDPOINT_URL_S3"], region_name="us-east-1")
    assert (art / "model.safetensors").stat().st_size > 64 * 2**20  # past the multipart threshold
    killed("publish-s3", ["publish", str(art), "--store", s3_env])
    assert len(client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])) == 1
    assert len(list((tmp_path / "cache" / "s3-uploads").glob("*.json"))) == 1
    assert main(["publish", str(art), "--store", s3_env]) == 0
    assert "published:" in capsys.readouterr().out
    assert client.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
    assert list((tmp_path / "cache" / "s3-uploads").glob("*.json")) == []
