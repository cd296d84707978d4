"""The build's options record: one field per flow parameter, checked as a whole before anything starts; through
``lsaq-build`` every bad value is one line naming it, exit code 2, no traceback, nothing written, Prefect not
imported."""

from __future__ import annotations

import dataclasses
import inspect
import subprocess
import sys
from pathlib import Path

import pytest

from flows.cli import main
from flows.options import BuildOptions, CheckedBuild
from lsaq.choices import OptionError
from lsaq.units import MAX_BYTES, parse_bytes

ROOT = Path(__file__).resolve().parents[1]
DEVICE = ["--device", "rpi-zero-2w"]

# (argv after `lsaq-build`, a fragment of the one error line); --out is added, and must stay unwritten
BAD = [
    (DEVICE + ["--strategy", "bogus"], "unknown strategy 'bogus'; valid strategies: lsaq, optimal, measured"),
    (DEVICE + ["--method", "magic"], "unknown importance method 'magic'; valid methods: jaccard, cosine"),
    (DEVICE + ["--quantizer", "awq"], "unknown quantizer 'awq'; valid quantizers: rtn, gptq"),
    (DEVICE + ["--group-size", "x"], "group size must be a positive integer, 'auto' or None (per-channel), got 'x'"),
    (DEVICE + ["--group-size", "0"], "group size must be a positive integer, 'auto' or None (per-channel), got '0'"),
    (DEVICE + ["--samples", "0"], "--samples must be an integer of at least 1, got 0"),
    (DEVICE + ["--seq-len", "1"], "--seq-len must be an integer of at least 2, got 1"),
    (DEVICE + ["--k", "0"], "--k must be an integer of at least 1, got 0"),
    (DEVICE + ["--context", "0"], "--context must be an integer of at least 1, got 0"),
    (DEVICE + ["--measure-samples", "0"], "--measure-samples must be an integer of at least 1, got 0"),
    (DEVICE + ["--fidelity-windows", "0"], "--fidelity-windows must be an integer of at least 1, got 0"),
    (DEVICE + ["--compute-device", "gpu"], "compute device 'gpu' is not one of: auto, cpu or cuda:N"),
    (DEVICE + ["--compute-device", "cuda:7"], "compute device cuda:7: torch sees 0 CUDA device(s)"),
    (["--budget", "1e400GiB"], "--budget: '1e400GiB' is over an exabyte; accepted: 0 to 1 EB (10^18 bytes)"),
    (["--budget", "2EB"], "--budget: unknown unit 'EB' in '2EB'; accepted units: B, kB, MB"),
    (["--budget", "0"], "--budget must be positive, got '0'"),
    (["--budget", "nan"], "--budget: cannot read 'nan' as a size; accepted units:"),
    (["--budget", "5XB"], "--budget: unknown unit 'XB' in '5XB'"),
    (["--budget=-5MiB"], "--budget: '-5MiB' is negative"),
    (["--device", "nope"], "unknown device 'nope'; valid devices: a100-40gb"),
    (DEVICE + DEVICE, "a device is named twice in ['rpi-zero-2w', 'rpi-zero-2w']"),
    (DEVICE + ["--runtime", "ollama"], "unknown runtime 'ollama'; valid runtimes: transformers, vllm, llama.cpp"),
    (DEVICE + ["--runtime", "vllm", "--group-size", "16"],
     "a build for runtime vllm cannot hold INT4 group size 16 (vLLM's kernels take 32, 64, 128 or per-channel)"),
    (DEVICE + ["--device-file", "/no/such/devices.yaml"], "--device-file '/no/such/devices.yaml' is not a file"),
    ([], "no device: give --device (a name from `lsaq devices`), --device (repeated) or --budget"),
]


@pytest.mark.parametrize("argv, message", BAD, ids=[" ".join(a) or "nothing" for a, _ in BAD])
def test_a_bad_build_option_is_one_line_and_writes_nothing(argv, message, tmp_path, capsys):
    out = tmp_path / "out"
    assert main([*argv, "--out", str(out)]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == f"lsaq-build: error: {captured.err.split('error: ', 1)[1]}"
    assert captured.err.count("\n") == 1 and message in captured.err and "Traceback" not in captured.err
    assert not out.exists()


def test_a_safetensors_model_for_a_llama_cpp_device_needs_llama_cpps_converter(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("LSAQ_LLAMA_CONVERT", str(tmp_path / "convert_hf_to_gguf.py"))
    assert main(DEVICE + ["--model", "org/some-model", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and not (tmp_path / "out").exists()
    assert ("device rpi-zero-2w runs llama.cpp: a GGUF build of a safetensors checkpoint needs llama.cpp's "
            f"convert_hf_to_gguf.py ($LSAQ_LLAMA_CONVERT names {tmp_path}/convert_hf_to_gguf.py, which is not a "
            "file)") in err and err.rstrip().endswith("or build for --runtime transformers"), err
    # for a device that runs torch the converter is not needed
    assert BuildOptions(device="a100-40gb", model="org/some-model").check().requests[0].name == "a100-40gb"


def test_bad_stores_work_folders_and_device_files_are_named(tmp_path, capsys):
    bad_yaml = tmp_path / "devices.yaml"
    bad_yaml.write_text("devices:\n  - name: board\n    memory: 1.0e+12\n    kind: system\n    reserve: 0\n")
    a_file = tmp_path / "file"
    a_file.write_text("x")
    cases = [
        (["--store", "ftp://x", "--work", str(tmp_path / "w")], "--store: unknown store scheme 'ftp' in 'ftp://x'"),
        (["--store", "s3://", "--work", str(tmp_path / "w")], "--store: S3 store 's3://' names no bucket"),
        (["--store", str(a_file), "--work", str(tmp_path / "w")], f"--store: store {a_file}: exists and is not a"),
        (["--store", str(tmp_path / "s"), "--work", str(a_file)], f"--work '{a_file}' exists and is not a directory"),
        (["--device-file", str(bad_yaml), "--out", str(tmp_path / "o")], "over an exabyte"),
    ]
    for argv, message in cases:
        device = ["--device", "board"] if "--device-file" in argv else DEVICE
        assert main([*device, *argv]) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err and "Traceback" not in err, (argv, err)
    with pytest.raises(SystemExit) as exit_info:  # argparse's own usage error
        main([*DEVICE, "--out", str(tmp_path / "o"), "--store", str(tmp_path / "s")])
    assert exit_info.value.code == 2 and "give --out, or --store and --work, not both" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["devices.yaml", "file"]


def test_an_unusable_prefect_home_is_named_before_prefect_starts(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "missing" / "prefect"))
    assert main([*DEVICE, "--strategy", "lsaq", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert f"PREFECT_HOME '{tmp_path / 'missing' / 'prefect'}' cannot be created: '{tmp_path / 'missing'}'" in err
    (tmp_path / "home").write_text("not a folder")
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "home"))
    assert main([*DEVICE, "--strategy", "lsaq", "--out", str(tmp_path / "o")]) == 2
    assert "is not a writable directory" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["home"]


def test_lsaq_build_refuses_a_bad_value_without_importing_prefect(tmp_path):
    """In its own process: neither Prefect (nor its temporary server) nor torch is loaded for a bad value."""
    code = ("import sys; from flows.cli import main; rc = main(sys.argv[1:]); "
            "assert not {'prefect', 'torch'} & set(sys.modules), 'prefect or torch imported'; sys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", code, *DEVICE, "--strategy", "bogus", "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr == "lsaq-build: error: unknown strategy 'bogus'; valid strategies: lsaq, optimal, measured, " \
                          "fp16, int8, int4\n"
    assert not (tmp_path / "o").exists()


def test_the_record_has_the_flows_parameters_and_defaults():
    from flows.build import build

    flow_params = inspect.signature(build.fn).parameters
    fields = {f.name: f.default for f in dataclasses.fields(BuildOptions)}
    assert list(flow_params) == list(fields)
    assert {name: p.default for name, p in flow_params.items()} == fields


def test_check_gives_the_stages_records(tmp_path):
    checked = BuildOptions(devices=("rpi-zero-2w",), budget="300MiB", strategy="LSAQ", method="Jaccard",
                           quantizer="RTN", group_size="64", eval_tasks="piqa", store=str(tmp_path / "a" / ".."),
                           work=str(tmp_path / "w")).check()
    assert isinstance(checked, CheckedBuild)
    assert [(r.name, r.budget) for r in checked.requests] == [("rpi-zero-2w", None), (None, "300MiB")]
    assert checked.plan.strategy.value == "lsaq" and checked.plan.policy.group_size == 64 and not checked.measured
    assert checked.plan.runtime is None  # each device's own
    assert BuildOptions(device="rpi-zero-2w", runtime="Transformers").check().plan.runtime.value == "transformers"
    assert checked.plan.gguf_int4.value == "q4_k"
    assert BuildOptions(device="rpi-zero-2w", gguf_int4="Q4_1").check().plan.gguf_int4.value == "q4_1"
    assert BuildOptions(device="rpi-zero-2w", gguf_int8="Q6_K").check().plan.gguf_int8.value == "q6_k"
    with pytest.raises(OptionError, match="unknown INT4 GGUF format 'q2_k'"):
        BuildOptions(device="rpi-zero-2w", gguf_int4="q2_k").check()
    with pytest.raises(OptionError, match="unknown INT8 GGUF format 'q5_k'; valid formats: q8_0, q6_k"):
        BuildOptions(device="rpi-zero-2w", gguf_int8="q5_k").check()
    assert (checked.ranking, checked.quantizer, checked.group_size) == ("jaccard", "rtn", 64)
    assert checked.evaluation.tasks == ("piqa",) and checked.store == str(tmp_path)  # `..` resolved
    assert checked.work == str(tmp_path / "w") and not (tmp_path / "a").exists()
    child = checked.child_params(checked.requests[1], "abc123")
    assert child == {**BuildOptions().params(), "budget": "300MiB", "strategy": "LSAQ", "method": "jaccard",
                     "quantizer": "rtn", "group_size": 64, "eval_tasks": "piqa", "store": str(tmp_path),
                     "revision": "abc123"}
    # In Python and in a deployment run the message names the parameter, not the flag
    with pytest.raises(OptionError, match="^eval_limit must be an integer of at least 1, got 0$"):
        BuildOptions(budget="1GiB", eval_limit=0).check()
    with pytest.raises(OptionError, match="^eval_tasks: unknown"):
        BuildOptions(budget="1GiB", eval_tasks="no-such-task").check()
    with pytest.raises(OptionError, match=r"^devices must be a list of device names, got 'rpi-zero-2w'$"):
        BuildOptions(devices="rpi-zero-2w").check()
    with pytest.raises(OptionError, match="^ppl must be true or false, got 'yes'$"):
        BuildOptions(budget="1GiB", ppl="yes").check()


@pytest.mark.parametrize("value", ["1e400GiB", "1000001TB", "2e18", 10**19, 1e300])
def test_sizes_over_an_exabyte_are_refused_with_the_range(value):
    with pytest.raises(ValueError, match=r"is over an exabyte; accepted: 0 to 1 EB \(10\^18 bytes\)"):
        parse_bytes(value, what="--budget")


def test_an_exabyte_itself_is_a_size():
    assert parse_bytes("1e18") == parse_bytes(10**18) == parse_bytes(1e18) == MAX_BYTES
    assert parse_bytes("1000000TB") == MAX_BYTES and parse_bytes("0") == 0
    for bad in (float("inf"), float("nan")):
        with pytest.raises(ValueError, match="is not a finite, non-negative size"):
            parse_bytes(bad)
