"""The :class:`Artifact` record: what the quantize stage wrote, read back from the directory's manifest.

Torch-free, so later stages (and pipeline workers) can pass and inspect artifacts without the numeric stack. The
manifest ``lsaq_artifact.json`` (schema ``lsaq.quantization.artifact``) is this record without its path: a
directory can be moved or copied and still describe itself.

Version 2 added ``dtype`` (the 16-bit float the artifact stores) and ``runtimes``, and records the model as a
:class:`~lsaq.models.identity.ModelRef`; version 1 manifests (always float16) still load. Version 3 added
``quantizer`` (how the codes were chosen: ``rtn`` or ``gptq``) and ``calibration`` (the hash of GPTQ's calibration
tokens); older manifests are ``rtn``. Version 4 added ``format``: ``compressed-tensors`` (older manifests) or
``gguf`` (one ``model.gguf`` for llama.cpp, :mod:`lsaq.quantization.gguf_build`). The record
(:meth:`Artifact.to_json`) adds the directory and the quantize run's peak host memory, which the manifest leaves
out.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from lsaq.resources import RunMemory
from lsaq.version import __version__
from lsaq.models.identity import ModelRef
from lsaq.records import decode_record, read_record

MANIFEST = "lsaq_artifact.json"
PLAN = "lsaq_plan.json"
WEIGHTS = "model.safetensors"  # the weights of a one-shard artifact
WEIGHTS_INDEX = "model.safetensors.index.json"  # a sharded artifact's index (transformers' names)
REQUIRED = ("config.json", PLAN, MANIFEST)  # and the weights: WEIGHTS or WEIGHTS_INDEX with its shards
GGUF_WEIGHTS = "model.gguf"  # a GGUF build's one weights file
MODELFILE = "Modelfile"  # ollama's recipe beside it
GGUF_REQUIRED = (GGUF_WEIGHTS, PLAN, MANIFEST)
SCHEMA, VERSION = "lsaq.quantization.artifact", 4
COMPRESSED_TENSORS, GGUF = "compressed-tensors", "gguf"  # the formats of a build
LLAMA_CPP_RUNTIME = "llama.cpp"
# Runtimes that load an artifact: lsaq's own (lsaq.quantization.reader.load_quantized) always; stock
# transformers + compressed-tensors and vLLM unless it holds a tensor form they cannot load (runtimes_for_plan).
LSAQ_RUNTIME, STOCK_RUNTIME, VLLM_RUNTIME = "lsaq", "transformers", "vllm"
STORAGE_DTYPES = ("bfloat16", "float16")


@dataclass(frozen=True)
class Artifact:
    """A quantized artifact directory: where it is, what it was made from, and every file's size and sha256."""

    path: Path
    plan_id: str
    model: ModelRef  # the source model (identity only; its config is in the directory's config.json)
    dtype: str  # the 16-bit float of every float tensor and scale: "bfloat16" or "float16"
    files: Mapping[str, tuple[int, str]]  # file name -> (bytes, sha256)
    tensor_bytes: int  # bytes of the tensors the weights files hold
    predicted_tensor_bytes: int  # what the plan's byte model predicted (equal, or the artifact is not written)
    runtimes: tuple[str, ...] = (LSAQ_RUNTIME, STOCK_RUNTIME)
    lsaq_version: str = __version__
    quantizer: str = "rtn"  # how the integer codes were chosen (lsaq.precision.Quantizer)
    calibration: str | None = None  # hash of the calibration tokens a calibrated quantizer used
    format: str = COMPRESSED_TENSORS  # or GGUF
    # where the run that wrote it computed and its peak host and device memory (lsaq.resources.PeakMemory): in the
    # stage's record, not in the manifest, which describes the files (the same plan gives the same bytes whatever
    # memory the run took); records of the same files are equal whatever their runs took
    memory: RunMemory | None = field(default=None, compare=False)

    @property
    def peak_host_bytes(self) -> int | None:
        """The run's peak resident host memory (None: not known)."""
        return self.memory.peak_host_bytes if self.memory is not None else None

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))
        object.__setattr__(self, "files", {k: (int(n), str(h)) for k, (n, h) in self.files.items()})
        object.__setattr__(self, "runtimes", tuple(self.runtimes))
        if self.dtype not in STORAGE_DTYPES:
            raise ValueError(f"unknown artifact dtype {self.dtype!r}; valid: {', '.join(STORAGE_DTYPES)}")
        if self.format not in (COMPRESSED_TENSORS, GGUF):
            raise ValueError(f"unknown artifact format {self.format!r}; valid: {COMPRESSED_TENSORS}, {GGUF}")

    @property
    def gguf(self) -> bool:
        """Whether the build is one GGUF file for llama.cpp."""
        return self.format == GGUF

    @property
    def file_bytes(self) -> int:
        """Bytes of all files of the directory."""
        return sum(n for n, _ in self.files.values())

    def manifest_json(self) -> dict[str, Any]:
        """The manifest written into the directory: this record without its path."""
        return {
            "schema": SCHEMA,
            "version": VERSION,
            "lsaq_version": self.lsaq_version,
            "plan_id": self.plan_id,
            "model": self.model.to_json(),
            "dtype": self.dtype,
            "runtimes": list(self.runtimes),
            "files": {name: {"bytes": n, "sha256": h} for name, (n, h) in sorted(self.files.items())},
            "tensor_bytes": self.tensor_bytes,
            "predicted_tensor_bytes": self.predicted_tensor_bytes,
            "quantizer": self.quantizer,
            "calibration": self.calibration,
            "format": self.format,
        }

    def to_json(self) -> dict[str, Any]:
        """The stage's record: the manifest, the directory and the run's memory."""
        return {**self.manifest_json(), "path": str(self.path),
                "memory": self.memory.to_json() if self.memory is not None else None}

    @classmethod
    def from_json(cls, obj: Mapping[str, Any], path: str | Path | None = None) -> "Artifact":
        """From :meth:`to_json` output, or from a manifest with ``path`` given (a version 1 manifest: float16)."""
        where = path if path is not None else obj.get("path")
        if where is None:
            raise ValueError("an artifact record needs its directory: no 'path' in the record and none given")
        return cls(
            path=Path(where),
            plan_id=obj["plan_id"],
            model=ModelRef.from_json(obj["model"]),
            dtype=obj.get("dtype", "float16"),
            files={name: (meta["bytes"], meta["sha256"]) for name, meta in obj["files"].items()},
            tensor_bytes=obj["tensor_bytes"],
            predicted_tensor_bytes=obj["predicted_tensor_bytes"],
            runtimes=tuple(obj.get("runtimes", (LSAQ_RUNTIME,))),
            lsaq_version=obj.get("lsaq_version", "?"),
            quantizer=obj.get("quantizer", "rtn"),
            calibration=obj.get("calibration"),
            format=obj.get("format", COMPRESSED_TENSORS),
            memory=RunMemory.from_json(obj.get("memory")),
        )

    @classmethod
    def load(cls, path: str | Path) -> "Artifact":
        """The record of the artifact directory ``path``, from its manifest (no file is checked here: see
        :func:`lsaq.quantization.artifact.verify_artifact`)."""
        path = Path(path)
        obj = read_record(path / MANIFEST, SCHEMA, VERSION)
        return decode_record(obj, lambda o: cls.from_json(o, path), str(path / MANIFEST), "artifact manifest")
