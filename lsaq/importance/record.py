"""The importance record: per-layer scores of one model under one method and calibration set (versioned JSON).

Torch-free, so that planning and the pipeline can read importance without loading the numeric stack.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lsaq.version import __version__
from lsaq.calibration.sets import CalibrationInfo
from lsaq.methods import ranking
from lsaq.models.identity import ModelInfo
from lsaq.resources import RunMemory
from lsaq.records import atomic_write_json, canonical_json, decode_record, read_record, sha256_hex

SCHEMA = "lsaq.layer_importance"
VERSION = 1


@dataclass(frozen=True)
class LayerImportance:
    """Per-layer importance of one model under one method and calibration set (higher = more important)."""

    model: ModelInfo
    method: str
    k: int | None
    calibration: CalibrationInfo
    importance: tuple[float, ...]
    std: tuple[float, ...]  # standard deviation of the per-sample importance
    lsaq_version: str = __version__
    wall_time_s: float = 0.0
    params: dict[str, Any] = field(default_factory=dict)  # method settings besides k (sensitivity: the probe)
    memory: RunMemory | None = field(default=None, compare=False)  # where it ran, its peak memory; not in the id

    @property
    def num_layers(self) -> int:
        return len(self.importance)

    @property
    def ranking(self) -> list[int]:
        """Layer indices, most important first; equal scores keep layer order."""
        return ranking(self.importance)

    @property
    def id(self) -> str:
        """Content hash of what determines the scores (not wall time, not lsaq version)."""
        key = {
            "model": self.model.content_hash,
            "method": self.method,
            "k": self.k,
            "calibration": self.calibration.hash,
            "importance": list(self.importance),
        }
        if self.params:  # absent for jaccard/cosine so their ids stay what they were
            key["params"] = self.params
        return sha256_hex(canonical_json(key))

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "version": VERSION,
            "id": self.id,
            "model": self.model.to_json(),
            "num_layers": self.num_layers,
            "method": self.method,
            "k": self.k,
            "params": self.params,
            "calibration": self.calibration.to_json(),
            "importance": list(self.importance),
            "std": list(self.std),
            "ranking": self.ranking,
            "lsaq_version": self.lsaq_version,
            "wall_time_s": self.wall_time_s,
            "memory": self.memory.to_json() if self.memory is not None else None,
        }

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> "LayerImportance":
        return cls(
            model=ModelInfo.from_json(obj["model"]),
            method=obj["method"],
            k=obj.get("k"),
            calibration=CalibrationInfo.from_json(obj["calibration"]),
            importance=tuple(float(x) for x in obj["importance"]),
            std=tuple(float(x) for x in obj["std"]),
            lsaq_version=obj.get("lsaq_version", "?"),
            wall_time_s=float(obj.get("wall_time_s", 0.0)),
            params=dict(obj.get("params") or {}),
            memory=RunMemory.from_json(obj.get("memory")),
        )

    def save(self, path: str | Path) -> Path:
        return atomic_write_json(path, self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> "LayerImportance":
        rec = decode_record(read_record(path, SCHEMA, VERSION), cls.from_json, str(path), "importance record")
        if len(rec.std) != rec.num_layers or rec.num_layers == 0:
            raise ValueError(f"{path}: malformed importance record (importance/std lengths differ or are empty)")
        return rec
