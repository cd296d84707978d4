"""The records a store holds beside the files: a build's ``manifest.json`` and a device's ``latest.json``.

A build's :class:`BuildManifest` (schema ``lsaq.store.build``, version 1) lists every file of the build with its
size and sha256 and carries the headline figures (model, revision, device, context, average bits, weight bytes,
memory needed, evaluation numbers), so ``lsaq ls`` reads one small object per build. The build id is a function
of the files alone (:func:`build_id`): the same files always get the same id, and an id names one content.

:class:`Latest` (schema ``lsaq.store.latest``) points a device at the build published last.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Mapping

from lsaq.version import __version__
from lsaq.models.identity import ModelRef
from lsaq.records import RecordError, canonical_json, decode_record, parse_record, sha256_hex
from lsaq.store.keys import build_prefix, latest_key, validate_key

SCHEMA, VERSION = "lsaq.store.build", 1
LATEST_SCHEMA, LATEST_VERSION = "lsaq.store.latest", 1
ID_DIGITS = 12


def utc_now() -> str:
    """The current time as ISO 8601 UTC, to the second (sorts as text)."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def build_id(plan_id: str, files: Mapping[str, tuple[int, str]]) -> str:
    """``<plan id, 12 hex>-<content, 12 hex>``: the content part hashes every file's name, size and sha256."""
    content = sha256_hex(canonical_json({name: [n, h] for name, (n, h) in sorted(files.items())}))
    return f"{plan_id[:ID_DIGITS]}-{content[:ID_DIGITS]}"


def record_bytes(obj: Mapping[str, Any]) -> bytes:
    """A record as stored: indented JSON, keys in a fixed order, trailing newline."""
    return (json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode()


def evaluation_summary(report: Mapping[str, Any]) -> dict[str, Any]:
    """The headline numbers of an ``lsaq.eval_report`` record (read as JSON: this package stays torch-free):
    fidelity to the float model and, per metric, the baseline, quantized and delta values."""
    fid = report.get("fidelity") or None
    metrics = {
        row["key"]: {k: row.get(k) for k in ("baseline", "quantized", "delta", "n")}
        for row in report.get("comparison") or () if isinstance(row, Mapping) and "key" in row
    }
    return {
        "fidelity": {k: fid.get(k) for k in ("kl_mean", "kl_p99", "top1_agreement", "positions")} if fid else None,
        "metrics": metrics,
        **({"generation": gen} if (gen := (report.get("artifact") or {}).get("generation")) else {}),
    }


@dataclass(frozen=True)
class BuildManifest:
    """One published build: where it lives, what it is, and every file's size and sha256."""

    build_id: str
    model_slug: str
    revision: str
    device_slug: str
    model: ModelRef
    device: dict[str, Any]  # the plan's DeviceProfile as JSON (name, memory, reserve, usable, origin, ...)
    plan_id: str
    strategy: str
    context: int
    batch: int
    avg_bits: dict[str, float]  # plan.avg_bits: decoder linears, and the whole checkpoint
    weights_bytes: int  # what the checkpoint stores (the plan's byte model; equals the tensors written)
    required_bytes: int  # memory needed at run time: weights + KV cache + workspace
    dtype: str
    runtimes: tuple[str, ...]
    files: Mapping[str, tuple[int, str]]  # file name within the build -> (bytes, sha256)
    evaluation: dict[str, Any] | None  # evaluation_summary of the report published with it, or None
    published_at: str
    lsaq_version: str = __version__

    def __post_init__(self) -> None:
        object.__setattr__(self, "files", {k: (int(n), str(h)) for k, (n, h) in self.files.items()})
        object.__setattr__(self, "runtimes", tuple(self.runtimes))
        for name in self.files:
            validate_key(name, what="file name")

    @property
    def prefix(self) -> str:
        """The key prefix of the build's files."""
        return build_prefix(self.model_slug, self.revision, self.device_slug, self.build_id)

    @property
    def key(self) -> str:
        """The key of this manifest."""
        return f"{self.prefix}/manifest.json"

    @property
    def latest_key(self) -> str:
        return latest_key(self.model_slug, self.revision, self.device_slug)

    @property
    def file_bytes(self) -> int:
        return sum(n for n, _ in self.files.values())

    def same_content(self, other: "BuildManifest") -> bool:
        """Whether two manifests describe the same build (id and files; not when or by which version)."""
        return (self.build_id, self.model_slug, self.revision, self.device_slug, dict(self.files)) == (
            other.build_id, other.model_slug, other.revision, other.device_slug, dict(other.files))

    def check(self, where: str) -> "BuildManifest":
        """Itself when its id matches its files and plan, else a :class:`RecordError` (an edited manifest)."""
        expected = build_id(self.plan_id, self.files)
        if self.build_id != expected:
            raise RecordError(f"{where}: build id {self.build_id} does not match its files (expected {expected}); "
                              "the manifest was altered")
        return self

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA, "version": VERSION, "lsaq_version": self.lsaq_version,
            "build_id": self.build_id, "model_slug": self.model_slug, "revision": self.revision,
            "device_slug": self.device_slug, "model": self.model.to_json(), "device": dict(self.device),
            "plan_id": self.plan_id, "strategy": self.strategy, "context": self.context, "batch": self.batch,
            "avg_bits": dict(self.avg_bits), "weights_bytes": self.weights_bytes,
            "required_bytes": self.required_bytes, "dtype": self.dtype, "runtimes": list(self.runtimes),
            "files": {name: {"bytes": n, "sha256": h} for name, (n, h) in sorted(self.files.items())},
            "evaluation": self.evaluation, "published_at": self.published_at,
        }

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> "BuildManifest":
        return cls(
            build_id=obj["build_id"], model_slug=obj["model_slug"], revision=obj["revision"],
            device_slug=obj["device_slug"], model=ModelRef.from_json(obj["model"]), device=dict(obj["device"]),
            plan_id=obj["plan_id"], strategy=obj["strategy"], context=obj["context"], batch=obj["batch"],
            avg_bits=dict(obj["avg_bits"]), weights_bytes=obj["weights_bytes"], required_bytes=obj["required_bytes"],
            dtype=obj["dtype"], runtimes=tuple(obj["runtimes"]),
            files={name: (meta["bytes"], meta["sha256"]) for name, meta in obj["files"].items()},
            evaluation=obj.get("evaluation"), published_at=obj["published_at"],
            lsaq_version=obj.get("lsaq_version", "?"),
        )

    @classmethod
    def parse(cls, data: bytes, where: str) -> "BuildManifest":
        """A manifest from the bytes stored at ``where``: schema, version, fields and id checked."""
        return decode_record(parse_record(data, where, SCHEMA, VERSION), cls.from_json, where,
                             "build manifest").check(where)


@dataclass(frozen=True)
class Latest:
    """``latest.json`` of a device: the build published last, and when."""

    build_id: str
    updated_at: str

    def to_json(self) -> dict[str, Any]:
        return {"schema": LATEST_SCHEMA, "version": LATEST_VERSION, "build_id": self.build_id,
                "updated_at": self.updated_at}

    @classmethod
    def parse(cls, data: bytes, where: str) -> "Latest":
        obj = parse_record(data, where, LATEST_SCHEMA, LATEST_VERSION)
        try:
            return cls(build_id=validate_key(obj["build_id"], what="build id"), updated_at=str(obj["updated_at"]))
        except (KeyError, TypeError) as e:
            raise RecordError(f"{where}: malformed latest record ({type(e).__name__}: {e})") from None
