"""Plans for a runtime: the device names it, a build may override it, and the plan's bytes are that runtime's."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from lsaq.cli import main
from lsaq.models.configs import load_config
from lsaq.models.families import model_shape
from lsaq.planning.devices import budget_profile, parse_device_file
from lsaq.planning.ggml import RUNTIME_OVERHEAD, UBATCH, GgufFormats, gguf_data_bytes, gguf_tensors
from lsaq.planning.memory import WeightPolicy
from lsaq.planning.planner import Plan, PlanOptions, budget_for, make_plan
from lsaq.precision import Precision
from lsaq.runtime import Runtime

BOARD = """
devices:
  - {name: board, memory: 512MiB, kind: system, reserve: 128MiB, runtime: llama.cpp}
  - {name: gpu, memory: 8GiB, kind: dedicated, reserve: 1GiB}
"""


@pytest.fixture(scope="module")
def shape():
    return model_shape(load_config("llama-2-7b").config)


def test_device_files_name_a_runtime():
    board, gpu = parse_device_file(BOARD, "d.yaml")
    assert board.runtime is Runtime.LLAMA_CPP and board.runs is Runtime.LLAMA_CPP
    assert gpu.runtime is None and gpu.runs is Runtime.TRANSFORMERS
    assert "runtime" not in gpu.to_json()  # profiles that name none keep their records (and plan ids)
    assert type(board).from_json(board.to_json()) == board
    with pytest.raises(ValueError, match=r"d.yaml: device #1 \('x'\): field 'runtime': unknown runtime 'ollama'; "
                                         r"valid runtimes: transformers, vllm, llama.cpp"):
        parse_device_file("devices: [{name: x, memory: 1GiB, kind: system, reserve: 0GiB, runtime: ollama}]", "d.yaml")


def test_the_plan_takes_the_device_runtime_unless_told(shape):
    board, gpu = parse_device_file(BOARD.replace("512MiB", "8GiB"), "d.yaml")
    importance = [1.0] * shape.num_layers
    assert make_plan(shape, importance, board).options.runtime is Runtime.LLAMA_CPP
    assert make_plan(shape, importance, gpu).options.runtime is Runtime.TRANSFORMERS
    told = make_plan(shape, importance, board, PlanOptions(runtime="transformers"))
    assert told.options.runtime is Runtime.TRANSFORMERS and "runtime" not in told.options.to_json()


def test_a_llama_cpp_plan_counts_gguf_bytes(shape):
    device = budget_profile("6GiB")
    plan = make_plan(shape, [float(i) for i in range(shape.num_layers)], device, PlanOptions(runtime="llama.cpp"))
    bd = plan.breakdown
    formats = GgufFormats()
    assert bd.weights == gguf_data_bytes(gguf_tensors(shape, plan.precisions, WeightPolicy(), formats))
    assert bd.workspace == 4 * UBATCH * (32000 + 4 * 4096 + 3 * 4096 + 3 * 11008) + RUNTIME_OVERHEAD
    assert bd.kv_cache == 2 * 32 * 4096 * 4096 * 2
    assert plan.fits and bd.required <= device.usable
    # rows of 4096 and 11008 (43 x 256): INT4 is Q4_K, 4.5 bits; INT8 Q8_0, 8.5 bits
    bits = {p: plan.avg_bits["quantizable_linears"] for p in set(plan.precisions)}
    assert set(plan.precisions) <= {Precision.INT8, Precision.INT4}
    if plan.precisions.count(Precision.INT4) == shape.num_layers:
        assert bits[Precision.INT4] == pytest.approx(4.5)
    opts = plan.options.to_json()
    assert opts["runtime"] == "llama.cpp" and opts["gguf_int4"] == "q4_k"
    assert "gguf_int8" not in opts  # Q8_0: plans made before the choice existed keep their ids
    again = Plan.from_json(json.loads(json.dumps(plan.to_json())))  # the stored bytes check passes
    assert again == plan and again.id == plan.id


def test_k_quant_levels_change_the_bytes_a_plan_counts(shape):
    """INT8 as Q6_K (6.5625 bits) and INT4 as Q5_K (5.5) or Q3_K (3.4375): the same precisions, other bytes."""
    device = budget_profile("64GiB")
    for int8, int4, bits8, bits4 in [("q8_0", "q4_k", 8.5, 4.5), ("q6_k", "q5_k", 6.5625, 5.5),
                                     ("q6_k", "q3_k", 6.5625, 3.4375)]:
        options = PlanOptions(runtime="llama.cpp", gguf_int8=int8, gguf_int4=int4)
        for level, bits in ((Precision.INT8, bits8), (Precision.INT4, bits4)):
            plan = make_plan(shape, [1.0] * shape.num_layers, device, replace(options, strategy=level.value))
            assert plan.avg_bits["quantizable_linears"] == pytest.approx(bits)
            again = Plan.from_json(json.loads(json.dumps(plan.to_json())))
            assert again == plan and again.options.gguf_int8.value == int8


def test_layer_costs_match_the_breakdown(shape):
    options = PlanOptions(runtime="llama.cpp", gguf_int4="q4_1").for_device(budget_profile("64GiB"))
    budget = budget_for(shape, options)
    for p in Precision:
        plan = make_plan(shape, [1.0] * shape.num_layers, budget_profile("64GiB"), PlanOptions(
            runtime="llama.cpp", gguf_int4="q4_1", strategy=p.value))
        assert plan.breakdown.layer_linears == shape.num_layers * budget.layer_costs[p]
        assert plan.breakdown.required == budget.fixed + shape.num_layers * budget.layer_costs[p]


def test_cli_plans_for_llama_cpp(tmp_path, capsys):
    out = tmp_path / "plan.json"
    argv = ["plan", "--config", "llama-2-7b", "--budget", "6GiB", "--runtime", "llama.cpp", "--out", str(out)]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "GGUF for llama.cpp, int8 q8_0, int4 q4_k" in text
    assert Plan.load(out).options.runtime is Runtime.LLAMA_CPP
    assert main(["plan", "--config", "llama-2-7b", "--budget", "6GiB", "--runtime", "ollama"]) != 0
    assert "unknown runtime 'ollama'; valid runtimes: transformers, vllm, llama.cpp" in capsys.readouterr().err
