"""lsaq: Layer-Specific Adaptive Quantization. One base LLM, one quantized artifact per target device.

The Python API is one function per pipeline stage, each from small typed records and paths to a typed record and
the files it writes::

    import lsaq

    imp = lsaq.score(out="imp.json")                          # rank decoder layers (default model and data)
    plan = lsaq.plan("rtx3060", importance=imp, options=lsaq.PlanOptions(context=4096))
    art = lsaq.quantize(plan, "artifact/")                    # compressed-tensors directory, exact bytes
    report = lsaq.evaluate("artifact/")                       # KL / top-1 agreement vs the float model
    build = lsaq.publish(lsaq.open_store("s3://bucket/lsaq"), "artifact/")   # atomic, content-keyed

Names are imported on first use, so ``import lsaq`` (and the command line's start-up) stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

from lsaq.version import __version__

# public name -> module that defines it
_EXPORTS = {
    # stage functions
    "calibrate": "lsaq.calibration.sets",
    "score": "lsaq.importance.stage",
    "measure": "lsaq.importance.stage",
    "resolve_device": "lsaq.planning.stage",
    "plan": "lsaq.planning.stage",
    "quantize": "lsaq.quantization.stage",
    "evaluate": "lsaq.eval.stage",
    "open_store": "lsaq.store.stage",
    "publish": "lsaq.store.stage",
    "list_builds": "lsaq.store.stage",
    "download": "lsaq.store.stage",
    # records and options that cross stage boundaries
    "CalibrationInfo": "lsaq.calibration.sets",
    "LayerImportance": "lsaq.importance.scoring",
    "LayerLoss": "lsaq.importance.cost",
    "Method": "lsaq.methods",
    "ImportanceRef": "lsaq.methods",
    "ModelInfo": "lsaq.models.identity",
    "ModelRef": "lsaq.models.identity",
    "DeviceRequest": "lsaq.planning.stage",
    "DeviceProfile": "lsaq.planning.devices",
    "Plan": "lsaq.planning.planner",
    "PlanOptions": "lsaq.planning.planner",
    "Strategy": "lsaq.planning.planner",
    "WeightPolicy": "lsaq.planning.memory",
    "Precision": "lsaq.precision",
    "Artifact": "lsaq.quantization.stage",
    "EvalOptions": "lsaq.eval.stage",
    "EvalReport": "lsaq.eval.report",
    "FidelityResult": "lsaq.eval.fidelity",
    "BuildManifest": "lsaq.store.manifest",
}
__all__ = ["__version__", *sorted(_EXPORTS)]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'lsaq' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
