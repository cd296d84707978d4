"""The runtimes a build is made for: each has its own file format, byte model and memory model.

* ``transformers``: a compressed-tensors directory, run by torch (stock transformers + compressed-tensors, or
  lsaq's own packed runtime); available on every device. Byte model :mod:`lsaq.planning.memory`.
* ``vllm``: the same compressed-tensors directory, for serving on NVIDIA GPUs.
* ``llama.cpp``: one GGUF file (llama.cpp, and ollama on top of it), for single-board computers, CPU hosts and
  Jetsons; per-tensor ggml types, byte and memory model :mod:`lsaq.planning.ggml`.

A device profile names the runtime it runs (:mod:`lsaq.planning.devices`); a build may override it.
"""

from __future__ import annotations

from lsaq.choices import Choice


class Runtime(Choice):
    """What runs a build on its device."""

    TRANSFORMERS = "transformers"
    VLLM = "vllm"
    LLAMA_CPP = "llama.cpp"

    @classmethod
    def noun(cls) -> tuple[str, str]:
        return "runtime", "runtimes"

    @property
    def gguf(self) -> bool:
        """Whether its builds are GGUF files (else compressed-tensors directories)."""
        return self is Runtime.LLAMA_CPP


__all__ = ["Runtime"]
