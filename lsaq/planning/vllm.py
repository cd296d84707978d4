"""What vLLM serves of lsaq's compressed-tensors builds: the rules a plan for runtime ``vllm`` keeps.

vLLM's compressed-tensors loader (``CompressedTensorsConfig``, vLLM 0.34) resolves each linear to a scheme from its
config group's ``format`` and weight arguments:

* weight-only ``pack-quantized`` INT with 4 or 8 bits, channel or group strategy -> ``CompressedTensorsWNA16``
  (INT4 symmetric as ``uint4b8``, asymmetric with zero points as ``uint4``; INT8 symmetric as ``uint8b128``), run
  by its mixed-precision kernels (Marlin takes group sizes -1 (per channel), 32, 64 and 128);
* ``int-quantized`` is an activation-quantization format there: a group without ``input_activations`` fails the
  config outright, so no build for vLLM may hold one (lsaq writes only an INT8 *embedding* that way: stock
  transformers loads an embedding no other way);
* a linear no group targets stays unquantized (lsaq's FP16 layers); the fused ``qkv_proj`` / ``gate_up_proj``
  take the scheme of their parts, which must match: lsaq's precisions are per layer, so they always do.

:func:`vllm_refusal` is that rule for a plan's policy; the artifact lists ``vllm`` among its runtimes when it holds,
and :func:`check_vllm_policy` refuses a plan for runtime ``vllm`` that breaks it.
"""

from __future__ import annotations

from lsaq.planning.memory import WeightPolicy
from lsaq.precision import Precision

VLLM_GROUP_SIZES = (32, 64, 128)  # INT4 group sizes vLLM's Marlin kernels take besides per channel


def vllm_refusal(policy: WeightPolicy, int4: bool = True) -> str | None:
    """Why vLLM cannot serve a compressed-tensors build with ``policy`` (one phrase), None when it can. ``int4``:
    whether the build holds INT4 tensors (the group size matters only then)."""
    if policy.embed is Precision.INT8:
        return ("an INT8 embedding (stored as int-quantized, which vLLM reads as activation quantization; "
                "use an fp16 or int4 embedding)")
    if int4 and policy.group_size is not None and policy.group_size not in VLLM_GROUP_SIZES:
        return (f"INT4 group size {policy.group_size} (vLLM's kernels take "
                f"{', '.join(map(str, VLLM_GROUP_SIZES))} or per-channel)")
    return None


def check_vllm_policy(policy: WeightPolicy) -> None:
    """``ValueError`` (one line) when a plan for runtime ``vllm`` with ``policy`` would hold what vLLM cannot serve."""
    refusal = vllm_refusal(policy)
    if refusal is not None:
        raise ValueError(f"a build for runtime vllm cannot hold {refusal}")


__all__ = ["VLLM_GROUP_SIZES", "check_vllm_policy", "vllm_refusal"]
