"""Damaged or incomplete model paths through the real CLIs (``lsaq score``, ``lsaq eval``, ``lsaq-build``): one line
naming the file and what is wrong, exit code 2, no traceback, nothing written; and the header checks themselves
against whole files."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest

from flows.cli import main as build_main
from lsaq.cli import main as lsaq_main
from lsaq.models.weights import check_weights_file


def write_gguf(path: Path) -> Path:
    """A small whole GGUF (a string array, two tensors) written by the gguf package."""
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_uint32("test.n", 3)
    w.add_array("test.tokens", ["a", "bb", "ccc"])
    w.add_tensor("a", np.arange(64, dtype=np.float32).reshape(8, 8))
    w.add_tensor("b", np.ones(40, dtype=np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def write_safetensors(path: Path) -> Path:
    from safetensors.numpy import save_file

    save_file({"w": np.ones((4, 4), dtype=np.float32), "b": np.zeros(3, dtype=np.float16)}, str(path))
    return path


def safetensors_header(path: Path) -> tuple[int, bytes]:
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    return n, raw


def model_dir(root: Path, weights: bytes | None = None, config: bool = True) -> Path:
    root.mkdir()
    if config:
        # tiny, should a check ever let one through: transformers would build this model, not a default 7B
        config = dict(model_type="llama", hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, vocab_size=16)
        (root / "config.json").write_text(json.dumps(config))
    if weights is not None:
        (root / "model.safetensors").write_bytes(weights)
    return root


def cases(tmp: Path) -> list[tuple[str, Path, str]]:
    """(id, model path, fragment of the one error line)."""
    tmp.mkdir()
    good = write_safetensors(tmp / "good.safetensors")
    n, raw = safetensors_header(good)
    gguf = write_gguf(tmp / "good.gguf").read_bytes()
    (tmp / "cut.gguf").write_bytes(gguf[:-40])  # into tensor b's 80 bytes (the last 16 are alignment padding)
    (tmp / "head.gguf").write_bytes(gguf[:40])
    (tmp / "magic.gguf").write_bytes(b"GGML" + gguf[4:])
    bad_json = struct.pack("<Q", 6) + b"{oops}" + raw[8 + n:]
    return [
        ("missing", tmp / "nope", f"model path {tmp / 'nope'} does not exist"),
        ("empty dir", model_dir(tmp / "empty", config=False), "has no *.safetensors weights"),
        ("config only", model_dir(tmp / "config-only"), "has no *.safetensors weights"),
        ("no config", model_dir(tmp / "no-config", raw, config=False), "has no config.json"),
        ("header cut off", model_dir(tmp / "short", raw[:5]), "model.safetensors: truncated or not a safetensors"),
        ("header length past the end", model_dir(tmp / "long", raw[: 8 + n // 2]), "its header length field says"),
        ("header not JSON", model_dir(tmp / "json", bad_json), "model.safetensors: bad safetensors header: not JSON"),
        ("data cut off", model_dir(tmp / "data", raw[:-7]), "model.safetensors: truncated: its header describes"),
        ("bytes after the data", model_dir(tmp / "extra", raw + b"\0" * 8), "model.safetensors: size mismatch"),
        ("truncated gguf", tmp / "cut.gguf", "cut.gguf: truncated GGUF file: its tensors need"),
        ("gguf header cut off", tmp / "head.gguf", "head.gguf: truncated GGUF file: its header runs past the end"),
        ("not a gguf", tmp / "magic.gguf", "magic.gguf: not a GGUF file (it starts with b'GGML'"),
    ]


CLIS = {
    "lsaq score": lambda model, out: lsaq_main(["score", "--model", str(model), "--out", str(out / "imp.json")]),
    "lsaq eval": lambda model, out: lsaq_main(["eval", "--ppl", "--model", str(model), "--out", str(out / "e.json")]),
    "lsaq-build": lambda model, out: build_main(["--model", str(model), "--device", "rpi-zero-2w", "--out", str(out)]),
}


@pytest.mark.parametrize("cli", list(CLIS))
def test_a_damaged_model_is_one_line_naming_the_file(cli, tmp_path, capsys):
    for name, model, message in cases(tmp_path / "models"):
        out = tmp_path / "out"
        assert CLIS[cli](model, out) == 2, name
        captured = capsys.readouterr()
        assert captured.err.count("\n") == 1 and message in captured.err, (name, captured.err)
        assert "Traceback" not in captured.err and not out.exists(), name


def test_whole_files_pass_the_header_checks(tmp_path):
    for path in (write_safetensors(tmp_path / "a.safetensors"), write_gguf(tmp_path / "a.gguf")):
        assert check_weights_file(path) == path
