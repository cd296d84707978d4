"""Bad inputs through the real ``lsaq`` CLI, table-driven: store URIs, download requests, sizes, device files,
damaged artifacts and calibration sets. Each gives exit code 2 and one line naming the value and what is
allowed, no traceback, and writes nothing (the folder the case runs in is unchanged, the store too).

``lsaq-build``'s own table is in ``test_build_options.py``; damaged model paths in ``test_bad_models.py``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from conftest import tiny_llama_dir, tiny_plan

from lsaq.cli import main
from lsaq.models.loading import load_model
from lsaq.precision import Precision
from lsaq.quantization.stage import quantize

DEVICE_FILES = {  # name -> (YAML text, fragment of the error)
    "not YAML": ("devices: [\n", "not valid YAML/JSON"),
    "not a mapping": ("hello", "expected a mapping with a 'devices' list"),
    "no reserve": ("devices:\n  - name: b\n    memory: 1GiB\n    kind: system\n", "device #1 ('b'): missing field "
                   "'reserve'"),
    "unreadable size": ("devices:\n  - name: b\n    memory: lots\n    kind: system\n    reserve: 0\n",
                        "field 'memory': cannot read 'lots' as a size; accepted units: B, kB"),
    "unknown kind": ("devices:\n  - name: b\n    memory: 1GiB\n    kind: quantum\n    reserve: 0\n",
                     "field 'kind': unknown memory kind 'quantum'; valid kinds: dedicated, unified, system"),
    "reserve over memory": ("devices:\n  - name: b\n    memory: 1GiB\n    kind: system\n    reserve: 2GiB\n",
                            "field 'reserve' (2.00 GiB) must be less than memory (1.00 GiB)"),
    "over an exabyte": ("devices:\n  - name: b\n    memory: 2.0e+18\n    kind: system\n    reserve: 0\n",
                        "is over an exabyte; accepted: 0 to 1 EB"),
}


def damage(src: Path, dst: Path, name: str, how: str) -> Path:
    """A copy of directory ``src`` at ``dst`` whose file ``name`` is cut short, cut to its first 5 bytes, has its
    JSON header overwritten (same size), or is removed."""
    shutil.copytree(src, dst)
    raw = (dst / name).read_bytes()
    if how == "cut":
        (dst / name).write_bytes(raw[:-10])
    elif how == "stub":
        (dst / name).write_bytes(raw[:5])
    elif how == "header":
        (dst / name).write_bytes(raw[:8] + b"XXXX" + raw[12:])
    elif how == "json":
        (dst / name).write_text("{oops")
    else:
        (dst / name).unlink()
    return dst


@pytest.fixture(scope="module")
def material(tmp_path_factory) -> Path:
    """A tiny checkpoint, an artifact of it published to a local store, a calibration set, and damaged copies."""
    root = tmp_path_factory.mktemp("bad-inputs")
    src = tiny_llama_dir(root / "src")
    art = root / "art"
    quantize(tiny_plan(load_model(src).info, [Precision.INT8, Precision.INT4, Precision.FP16]), art, model=str(src))
    assert main(["publish", str(art), "--store", str(root / "store")]) == 0
    (root / "text.raw").write_text("the quick brown fox jumps over the lazy dog. " * 40)
    (root / "empty.raw").write_text("")
    assert main(["calibrate", "--model", str(src), "--calib", str(root / "text.raw"), "--samples", "2",
                 "--seq-len", "16", "--out", str(root / "calib")]) == 0
    for how in ("cut", "stub", "header", "json", "gone"):
        name = "lsaq_artifact.json" if how in ("json", "gone") else "model.safetensors"
        damage(art, root / f"art-{how}", name, how)
        name = "calibration.json" if how == "json" else "tokens.safetensors"
        damage(root / "calib", root / f"calib-{how}", name, how)
    for name, (text, _) in DEVICE_FILES.items():
        (root / f"{name}.yaml").write_text(text)
    return root


def cases(m: Path) -> list[tuple[str, list[str], str]]:
    """(id, argv after ``lsaq``, fragment of the one error line); ``m`` is the material folder."""
    store = ["--store", str(m / "store")]
    dl = ["download", "--model", str(m / "src"), "--to", str(m / "got"), *store]
    out = ["--out", str(m / "out")]
    art = lambda how: str(m / f"art-{how}")  # noqa: E731
    calib = lambda how: ["score", "--model", str(m / "src"), "--calib-dir", str(m / f"calib-{how}"), *out]  # noqa: E731
    return [
        # store URIs
        ("ls ftp store", ["ls", "--store", "ftp://x"], "unknown store scheme 'ftp' in 'ftp://x'; valid: a local path"),
        ("ls s3 without bucket", ["ls", "--store", "s3://"], "S3 store 's3://' names no bucket; use s3://bucket"),
        ("ls store is a file", ["ls", "--store", str(m / "text.raw")], "exists and is not a directory"),
        ("ls bad bucket", ["ls", "--store", "s3://Bad_Bucket"],
         "bucket name 'Bad_Bucket' is not valid: 3-63 characters"),
        ("publish endpoint not a URL",
         ["publish", str(m / "art"), "--store", "s3://bucket", "--endpoint-url", "notaurl"],
         "S3 endpoint must be an http(s) URL such as http://127.0.0.1:9000, got 'notaurl'"),
        ("publish endpoint with credentials", ["publish", str(m / "art"), "--store", "s3://bucket", "--endpoint-url",
                                               "http://user:secret@127.0.0.1:9"], "must not contain credentials"),
        ("publish ftp store", ["publish", str(m / "art"), "--store", "ftp://x"], "unknown store scheme 'ftp'"),
        # download requests
        ("download unknown model", ["download", "--model", "nope", "--device", "test-1gib", "--to", str(m / "got"),
                                    *store], "no complete build for model nope, device test-1gib"),
        ("download unknown build", [*dl, "--device", "test-1gib", "--build", "nope"], "build nope (see `lsaq ls`)"),
        ("download unknown device", [*dl, "--device", "nope"], "no complete build for model"),
        ("download into a file", [*dl[:3], "--to", str(m / "text.raw"), *store, "--device", "test-1gib"],
         "exists and is not empty; choose another directory or replace it"),
        ("download local with build", [*dl, "--device", "local", "--build", "x"], "--device local chooses the build"),
        ("download limit for a named device", [*dl, "--device", "test-1gib", "--max-memory", "1GiB"],
         "--max-memory, --wait-for-memory and --runtime apply to --device local, not 'test-1gib'"),
        ("download zero limit", [*dl, "--device", "local", "--max-memory", "0"], "--max-memory must be positive"),
        ("download limit over an exabyte", [*dl, "--device", "local", "--max-memory", "1e400GiB"],
         "--max-memory: '1e400GiB' is over an exabyte; accepted: 0 to 1 EB"),
        ("download limit unit", [*dl, "--device", "local", "--max-memory", "5XB"], "unknown unit 'XB' in '5XB'"),
        ("download negative wait", [*dl, "--device", "local", "--wait-for-memory", "-5"],
         "--wait-for-memory must be 0 to 604800 seconds, got -5"),
        ("download nan wait", [*dl, "--device", "local", "--wait-for-memory", "nan"], "got nan"),
        ("download 1 B limit", [*dl, "--device", "local", "--max-memory", "1B"],  # "(system)" or "(dedicated)"
         "1 B - 0 B reserve = 1 B usable; capped by --max-memory; "),
        # sizes
        ("plan budget over an exabyte", ["plan", "--config", "llama-2-7b", "--budget", "1e400GiB", *out],
         "'1e400GiB' is over an exabyte"),
        ("plan budget nan", ["plan", "--config", "llama-2-7b", "--budget", "nan", *out], "cannot read 'nan' as a size"),
        ("plan budget negative", ["plan", "--config", "llama-2-7b", "--budget=-5MiB", *out], "'-5MiB' is negative"),
        ("plan budget unit", ["plan", "--config", "llama-2-7b", "--budget", "2EB", *out], "unknown unit 'EB' in '2EB'"),
        *[(f"quantize shard size {size}", ["quantize", "--plan", str(m / "art" / "lsaq_plan.json"), "--model",
                                             str(m / "src"), "--max-shard-size", size, *out], message)
          for size, message in [("0", "max shard size: '0' is below the smallest allowed, 1 MB"),
                                ("10KB", "max shard size: '10KB' is below the smallest allowed, 1 MB"),
                                ("big", "max shard size: cannot read 'big' as a size")]],
        # device files
        *[(f"device file {name}", ["devices", "--device-file", str(m / f"{name}.yaml")], message)
          for name, (_, message) in DEVICE_FILES.items()],
        ("device file missing", ["devices", "--device-file", str(m / "none.yaml")], "none.yaml"),
        # damaged artifacts
        ("generate cut artifact", ["generate", art("cut"), "--prompt", "hi"],
         "model.safetensors: size 1"),  # the cut file's size, then the recorded one and "(truncated?)"
        ("generate damaged header", ["generate", art("header"), "--prompt", "hi"],
         "model.safetensors: corrupted safetensors header"),
        ("generate bad manifest", ["generate", art("json"), "--prompt", "hi"], "lsaq_artifact.json: not valid JSON"),
        ("generate no manifest", ["generate", art("gone"), "--prompt", "hi"],
         "incomplete artifact, missing lsaq_artifact.json"),
        ("eval cut artifact", ["eval", art("stub"), "--ppl", *out], "model.safetensors: size 5 differs"),
        ("eval damaged header", ["eval", art("header"), "--ppl", *out], "corrupted safetensors header"),
        ("publish cut artifact", ["publish", art("cut"), *store], "does not match the artifact's manifest"),
        ("publish bad manifest", ["publish", art("json"), *store], "lsaq_artifact.json: not valid JSON"),
        # damaged calibration sets
        ("calibration tokens cut", calib("cut"), "tokens.safetensors: truncated: its header describes 256 bytes"),
        ("calibration tokens stub", calib("stub"), "tokens.safetensors: truncated or not a safetensors file"),
        ("calibration tokens header", calib("header"), "tokens.safetensors: bad safetensors header: not JSON"),
        ("calibration record", calib("json"), "calibration.json: not valid JSON"),
        ("calibration tokens gone", calib("gone"), "incomplete calibration directory, missing tokens.safetensors"),
        ("calibration dir missing", calib("none"), "calib-none does not exist (write one with `lsaq calibrate`)"),
        ("calibration text empty", ["calibrate", "--model", str(m / "src"), "--calib", str(m / "empty.raw"), *out],
         "calibration text '" + str(m / "empty.raw") + "' is empty"),
    ]


def tree(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize("index", range(len(cases(Path("m")))), ids=[c[0] for c in cases(Path("m"))])
def test_a_bad_input_is_one_line_and_writes_nothing(index, material, capsys, monkeypatch):
    name, argv, message = cases(material)[index]
    monkeypatch.setenv("LSAQ_STORE", str(material / "store"))
    before = tree(material)
    assert main(["-q", *argv]) == 2, name
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if not line.startswith("WARNING lsaq.planning.detect")]
    assert len(lines) == 1 and lines[0].startswith("lsaq ") and message in lines[0], (name, captured.err)
    assert "Traceback" not in captured.err and captured.out == "", name
    assert tree(material) == before, name
