"""Every layer of every family's build, resolved by vLLM's compressed-tensors rules (vLLM 0.34,
``vllm/model_executor/layers/quantization/compressed_tensors/compressed_tensors.py`` and ``utils.py``, transcribed
below): weight-only pack-quantized INT4/INT8 -> WNA16, fused q/k/v and gate/up one scheme, FP16 layers unquantized,
and no group vLLM's config parser refuses. vLLM itself is not a dependency (its wheel pulls CUDA torch)."""

from __future__ import annotations

import dataclasses
import re

import pytest
from conftest import tiny_family_model

from lsaq.models.families import SUPPORTED_MODEL_TYPES, model_shape
from lsaq.planning.devices import DeviceProfile, MemoryKind
from lsaq.planning.memory import WeightPolicy
from lsaq.planning.planner import Plan, PlanOptions, make_plan
from lsaq.planning.vllm import VLLM_GROUP_SIZES
from lsaq.precision import Precision
from lsaq.quantization.artifact import quantization_config, runtimes_for_plan

F, I8, I4 = Precision.FP16, Precision.INT8, Precision.INT4
# vLLM's activation-quantization formats (utils.is_activation_quantization_format)
ACTIVATION_FORMATS = {"naive-quantized", "int-quantized", "float-quantized", "nvfp4-pack-quantized",
                      "mxfp4-pack-quantized"}
WNA16_BITS = (4, 8)  # schemes.WNA16_SUPPORTED_BITS (uint4b8 / uint8b128; uint4 / uint8 with zero points)
# vLLM's fused modules of these families: the checkpoint's parts -> vLLM's one linear
FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


class VllmConfigError(Exception):
    """What vLLM raises for the config or a layer (an assertion, ValueError or NotImplementedError there)."""


def parse_groups(qc: dict) -> dict[str, dict]:
    """``CompressedTensorsConfig._quantization_scheme_map_from_config``: target -> weights, input, format; a group
    in an activation format without ``input_activations`` must hold float weights (an assertion in vLLM)."""
    targets = {}
    for group in qc["config_groups"].values():
        fmt = group.get("format") or qc["format"]
        for target in group["targets"]:
            if (fmt in ACTIVATION_FORMATS or group.get("input_activations")) and not group.get("input_activations"):
                if group["weights"]["type"] != "float":
                    raise VllmConfigError(f"{fmt} group without input_activations holds {group['weights']['type']}")
            targets[target] = {"weights": group["weights"], "input": group.get("input_activations"), "format": fmt}
    return targets


def _matches(name: str, target: str) -> bool:
    """``_is_equal_or_regex_match``: ``re:`` targets by ``re.match``, others by equality."""
    return bool(re.match(target[3:], name)) if target.startswith("re:") else target == name


def resolve(qc: dict, targets: dict[str, dict], layer: str) -> str:
    """``CompressedTensorsConfig.get_scheme`` for linear ``layer`` (vLLM's name): ``unquantized``,
    ``wna16-{bits}b-{channel|groupN}[-zp]``, or :class:`VllmConfigError`."""
    module = layer.rsplit(".", 1)[1]
    parts = [layer.replace(module, p) for p in FUSED.get(module, (module,))]
    ignored = {any(_matches(p, t) for t in qc["ignore"]) for p in parts}
    if len(ignored) > 1:  # should_ignore_layer: the shards of a fused layer must agree
        raise VllmConfigError(f"different quantization schemes for the parts of {layer}")
    if ignored == {True}:
        return "unquantized"
    target = next((t for t in targets if _matches(layer, t)), None)  # find_matched_target
    if target is None and len(parts) > 1:
        found = [next((t for t in targets if _matches(p, t)), None) for p in parts]
        if all(found):
            if len({repr(targets[t]) for t in found}) > 1:  # vLLM takes the first part's: a silent mismatch
                raise VllmConfigError(f"the parts of {layer} have different schemes")
            target = found[0]
    if target is None:
        return "unquantized"
    scheme = targets[target]
    w = scheme["weights"]
    wna16 = scheme["input"] is None and w["strategy"] in ("channel", "group") and not w.get("dynamic", False)
    if wna16 and scheme["format"] == "pack-quantized" and w["num_bits"] in WNA16_BITS and w["type"] == "int":
        group = "channel" if w["strategy"] == "channel" else f"group{w['group_size']}"
        return f"wna16-{w['num_bits']}b-{group}" + ("" if w["symmetric"] else "-zp")
    raise VllmConfigError(f"no compressed-tensors compatible scheme for {layer}: {scheme}")


def vllm_linears(plan: Plan, index: int) -> list[str]:
    """Layer ``index``'s linears as vLLM names them: q/k/v and gate/up fused where the family keeps them apart."""
    names = [lin.name for lin in plan.shape.layer_linears]
    for fused, parts in FUSED.items():
        split = [n for n in names if n.rsplit(".", 1)[-1] in parts]
        if len(split) == len(parts):
            names = [n for n in names if n not in split] + [split[0].rsplit(".", 1)[0] + "." + fused]
    return [plan.shape.layer_name(index, n) for n in names]


def family_plan(model_type: str, precisions: tuple[Precision, ...], policy: WeightPolicy) -> Plan:
    shape = model_shape(tiny_family_model(model_type, layers=len(precisions)).config.to_dict())
    device = DeviceProfile(name="test-1gib", memory=2**30, kind=MemoryKind.SYSTEM, reserve=0, notes="test")
    base = make_plan(shape, [1.0] * shape.num_layers, device, PlanOptions(context=64, policy=policy))
    return dataclasses.replace(base, precisions=precisions)


EXPECTED = {F: "unquantized", I8: "wna16-8b-channel"}
MIXES = [(F, I8, I4, F), (I8,) * 4, (I4,) * 4, (F,) * 4]
POLICIES = [WeightPolicy(), WeightPolicy(group_size=32), WeightPolicy(embed="int4", head="int8")]


@pytest.mark.parametrize("model_type", SUPPORTED_MODEL_TYPES)
def test_every_layer_resolves_to_its_precisions_scheme(model_type: str) -> None:
    for precisions in MIXES:
        for policy in POLICIES:
            plan = family_plan(model_type, precisions, policy)
            qc = quantization_config(plan)
            targets = parse_groups(qc)
            int4 = "wna16-4b-channel" if policy.group_size is None else f"wna16-4b-group{policy.group_size}-zp"
            for i, p in enumerate(precisions):
                for layer in vllm_linears(plan, i):
                    assert resolve(qc, targets, layer) == EXPECTED.get(p, int4), (model_type, precisions, layer)
            assert "vllm" in runtimes_for_plan(plan)


def test_fused_parts_at_different_precisions_are_caught() -> None:
    """The check itself fails when q/k/v would take different schemes (what per-linear precisions would make)."""
    plan = family_plan("llama", (I8, I4), WeightPolicy())
    qc = quantization_config(plan)
    qc["config_groups"]["group_0"]["targets"] = [r"re:^model\.layers\.0\.self_attn\.q_proj$"]
    qc["config_groups"]["group_1"]["targets"] = [r"re:.*\.(k|v)_proj$"]
    with pytest.raises(VllmConfigError, match="parts of model.layers.0.self_attn.qkv_proj have different"):
        resolve(qc, parse_groups(qc), "model.layers.0.self_attn.qkv_proj")


def test_int8_as_int_quantized_fails_vllms_config() -> None:
    """The int-quantized INT8 group lsaq 0.1 wrote (and writes for an INT8 embedding) is refused by vLLM's parser:
    such builds do not list vllm, and a plan for runtime vllm refuses the policy."""
    plan = family_plan("llama", (I8, F), WeightPolicy(embed="int8", head="fp16"))
    qc = quantization_config(plan)
    assert {g["format"] for g in qc["config_groups"].values()} == {"pack-quantized", "int-quantized"}
    with pytest.raises(VllmConfigError, match="int-quantized group without input_activations holds int"):
        parse_groups(qc)
    assert runtimes_for_plan(plan) == ("lsaq", "transformers")
    device = DeviceProfile(name="gpu", memory=2**30, kind=MemoryKind.DEDICATED, reserve=0, notes="test")
    with pytest.raises(ValueError, match=r"^a build for runtime vllm cannot hold an INT8 embedding"):
        make_plan(plan.shape, [1.0] * 2, device, PlanOptions(context=64, runtime="vllm", policy=plan.options.policy))


@pytest.mark.parametrize("group_size", [16, *VLLM_GROUP_SIZES])
def test_group_sizes_vllm_takes(group_size: int) -> None:
    model = tiny_family_model("llama", layers=2, hidden_size=128, intermediate_size=256, head_dim=32)
    shape = model_shape(model.config.to_dict())
    device = DeviceProfile(name="gpu", memory=2**30, kind=MemoryKind.DEDICATED, reserve=0, notes="test")
    options = PlanOptions(context=64, runtime="vllm", policy=WeightPolicy(group_size=group_size))
    if group_size in VLLM_GROUP_SIZES:
        assert make_plan(shape, [1.0] * 2, device, options).options.runtime.value == "vllm"
    else:
        with pytest.raises(ValueError, match=r"INT4 group size 16 \(vLLM's kernels take 32, 64, 128 or per-channel"):
            make_plan(shape, [1.0] * 2, device, options)
