"""Device profiles: the shipped catalog (``lsaq/data/devices.yaml``), user device files, and ``local``.

A profile says how much memory a target device has, what kind it is, and how much of it a model can never
use (the reserve: CUDA context, driver, display, OS). Plans budget ``memory - reserve``. Files are validated
on load; every error names the file and the field.
"""

from __future__ import annotations

import functools
import logging
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Mapping

import yaml

from lsaq.choices import Choice
from lsaq.runtime import Runtime
from lsaq.units import format_bytes, parse_bytes

log = logging.getLogger(__name__)

GIB = 1024**3
LOCAL = "local"  # resolved live on the machine running the command (see lsaq.planning.detect)
BUDGET = "budget"  # the pseudo-device of an explicit --budget
RESERVED_NAMES = (LOCAL, BUDGET)
_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]*$")
REQUIRED_FIELDS = ("name", "memory", "kind", "reserve")
OPTIONAL_FIELDS = ("runtime", "notes", "source")
CATALOG_FIELDS = ("runtime", "notes", "source")  # required of the shipped catalog
FILE_KEYS = ("version", "devices")


class MemoryKind(Choice):
    """Where a model's memory lives."""

    DEDICATED = "dedicated"  # a GPU's own memory
    UNIFIED = "unified"  # one pool shared by CPU and GPU (Jetson)
    SYSTEM = "system"  # system RAM, CPU inference

    @classmethod
    def noun(cls) -> tuple[str, str]:
        return "memory kind", "kinds"


@dataclass(frozen=True)
class DeviceProfile:
    """One target device. Sizes are bytes."""

    name: str
    memory: int
    kind: MemoryKind | None  # None only for the pseudo-device of an explicit budget
    reserve: int
    notes: str = ""
    source: str = ""
    origin: str = "catalog"  # "catalog", the device file's path, "detected: ...", or "--budget"
    runtime: Runtime | None = None  # what runs a build there; None: not named (transformers)

    @property
    def runs(self) -> Runtime:
        """The runtime a build for this device is made for unless a build names another."""
        return self.runtime or Runtime.TRANSFORMERS

    @property
    def usable(self) -> int:
        """What a model may use: ``memory - reserve``."""
        return self.memory - self.reserve

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "memory_bytes": self.memory,
            "kind": self.kind.value if self.kind is not None else None,
            "reserve_bytes": self.reserve,
            "usable_bytes": self.usable,
            "notes": self.notes,
            "source": self.source,
            "origin": self.origin,
            **({"runtime": self.runtime.value} if self.runtime is not None else {}),  # unnamed: records keep their id
        }

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> "DeviceProfile":
        kind = obj.get("kind")
        return cls(
            name=obj["name"],
            memory=int(obj["memory_bytes"]),
            kind=MemoryKind.parse(kind) if kind is not None else None,
            reserve=int(obj["reserve_bytes"]),
            notes=obj.get("notes", ""),
            source=obj.get("source", ""),
            origin=obj.get("origin", ""),
            runtime=Runtime.parse(obj["runtime"]) if obj.get("runtime") is not None else None,
        )

    def describe(self) -> str:
        if self.kind is None:
            return f"{self.name} of {format_bytes(self.usable)}"
        kind = self.kind.value
        return (
            f"{self.name} ({kind}): {format_bytes(self.memory)} - {format_bytes(self.reserve)} reserve "
            f"= {format_bytes(self.usable)} usable"
        )


def budget_profile(budget: int | str) -> DeviceProfile:
    """The pseudo-device of an explicit budget: all of it usable, no reserve."""
    n = parse_bytes(budget, what="--budget")
    if n <= 0:
        raise ValueError(f"--budget must be positive, got {budget!r}")
    return DeviceProfile(name=BUDGET, memory=n, kind=None, reserve=0, notes="explicit --budget", origin="--budget")


# ----------------------------------------------------------------------------------------------- files


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects a key given twice in one mapping (PyYAML silently keeps the last)."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: set = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
        seen.add(key)
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _size(value: Any, field: str, where: str) -> int:
    """A YAML size: a plain number is GiB; a string needs a unit."""
    if isinstance(value, bool) or value is None:
        raise ValueError(f"{where}: field {field!r} must be a size such as 12GiB or a number of GiB, got {value!r}")
    if isinstance(value, (int, float)):
        if value < 0:
            raise ValueError(f"{where}: field {field!r} must not be negative, got {value!r}")
        try:
            return parse_bytes(value * GIB, what=f"field {field!r} ({value!r} GiB)")
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
    text = str(value).strip()
    if not re.search(r"[A-Za-z]\s*$", text):
        raise ValueError(f"{where}: field {field!r} = {value!r} needs a unit (e.g. 12GiB, 8192MiB, 16GB)")
    try:
        return parse_bytes(text, what=f"field {field!r}")
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


def _profile(entry: Any, index: int, path: str, *, require_source: bool) -> DeviceProfile:
    where = f"{path}: device #{index + 1}"
    if not isinstance(entry, Mapping):
        raise ValueError(f"{where}: expected a mapping with fields {', '.join(REQUIRED_FIELDS)}, got {type(entry).__name__}")
    if isinstance(entry.get("name"), str):
        where += f" ({entry['name']!r})"
    allowed = REQUIRED_FIELDS + OPTIONAL_FIELDS
    for key in entry:
        if key not in allowed:
            raise ValueError(f"{where}: unknown field {key!r}; valid fields: {', '.join(allowed)}")
    required = REQUIRED_FIELDS + (CATALOG_FIELDS if require_source else ())
    for key in required:
        if key not in entry:
            raise ValueError(f"{where}: missing field {key!r}")
    name = entry["name"]
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(f"{where}: field 'name' must be lowercase letters, digits, '.', '_' or '-', got {name!r}")
    if name in RESERVED_NAMES:
        raise ValueError(f"{where}: field 'name' {name!r} is reserved (reserved names: {', '.join(RESERVED_NAMES)})")
    memory, reserve = _size(entry["memory"], "memory", where), _size(entry["reserve"], "reserve", where)
    if memory <= 0:
        raise ValueError(f"{where}: field 'memory' must be positive")
    if reserve >= memory:
        raise ValueError(f"{where}: field 'reserve' ({format_bytes(reserve)}) must be less than memory ({format_bytes(memory)})")
    try:
        kind = MemoryKind.parse(entry["kind"])
    except ValueError as e:
        raise ValueError(f"{where}: field 'kind': {e}") from None
    for key in OPTIONAL_FIELDS:
        if key in entry and not isinstance(entry[key], str):
            raise ValueError(f"{where}: field {key!r} must be text")
    try:
        runtime = Runtime.parse(entry["runtime"]) if "runtime" in entry else None
    except ValueError as e:
        raise ValueError(f"{where}: field 'runtime': {e}") from None
    return DeviceProfile(
        name=name, memory=memory, kind=kind, reserve=reserve,
        notes=entry.get("notes", ""), source=entry.get("source", ""), origin=path, runtime=runtime,
    )


def parse_device_file(text: str, path: str, *, require_source: bool = False) -> tuple[DeviceProfile, ...]:
    """Profiles from the text of a device file (YAML or JSON); ``ValueError`` naming ``path`` and the field."""
    try:
        obj = yaml.load(text, Loader=_StrictLoader)
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML/JSON ({' '.join(str(e).split())})") from None
    if not isinstance(obj, Mapping) or "devices" not in obj:
        raise ValueError(f"{path}: expected a mapping with a 'devices' list (and optionally 'version: 1')")
    for key in obj:
        if key not in FILE_KEYS:
            raise ValueError(f"{path}: unknown top-level key {key!r}; valid keys: {', '.join(FILE_KEYS)}")
    if obj.get("version", 1) != 1:
        raise ValueError(f"{path}: device file version {obj.get('version')!r} is not supported (supported: 1)")
    entries = obj["devices"]
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{path}: 'devices' must be a non-empty list")
    profiles, seen = [], set()
    for i, entry in enumerate(entries):
        p = _profile(entry, i, path, require_source=require_source)
        if p.name in seen:
            raise ValueError(f"{path}: device #{i + 1}: duplicate name {p.name!r}")
        seen.add(p.name)
        profiles.append(p)
    return tuple(profiles)


def load_device_file(path: str | Path) -> tuple[DeviceProfile, ...]:
    """Profiles from a user device file (``--device-file``)."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"device file {p} does not exist")
    return parse_device_file(p.read_text(), str(p))


@functools.lru_cache(maxsize=1)
def load_catalog() -> tuple[DeviceProfile, ...]:
    """The shipped catalog; every entry must also say where its numbers come from."""
    text = resources.files("lsaq").joinpath("data/devices.yaml").read_text()
    return parse_device_file(text, "lsaq/data/devices.yaml", require_source=True)


def list_devices(device_file: str | Path | None = None) -> list[DeviceProfile]:
    """Catalog profiles, then the device file's; a file profile replaces a catalog one of the same name."""
    profiles = {p.name: p for p in load_catalog()}
    if device_file is not None:
        for p in load_device_file(device_file):
            if p.name in profiles:
                log.info("%s: profile %r replaces the catalog's", device_file, p.name)
            profiles[p.name] = p
    return list(profiles.values())
