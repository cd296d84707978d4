"""Running a GGUF build in llama.cpp (llama-cpp-python), with the settings its plan's memory was counted at.

A build's plan fixes the context (the KV cache) and lsaq's step size (:data:`lsaq.planning.ggml.UBATCH`, the compute
buffer), so :func:`open_build` passes both; the weights are memory-mapped. Threads: llama-cpp-python's default
(half the CPUs): on a small machine whose cores are busy, more threads stall decoding.
"""

from __future__ import annotations

import contextlib
import os
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from lsaq.planning.ggml import UBATCH
from lsaq.planning.planner import Plan
from lsaq.quantization.verify import ArtifactError, verify_artifact
from lsaq.quantization.ggml_quant import check_llama_cpp
from lsaq.quantization.record import GGUF_WEIGHTS, PLAN, Artifact


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """llama.cpp prints its loading log on file descriptor 2 even when asked not to: send it to /dev/null."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def load_gguf(path: str | os.PathLike, *, context: int, logits_all: bool = False, batch: int = UBATCH) -> Any:
    """A ``llama_cpp.Llama`` of the GGUF file ``path`` for ``context`` tokens in steps of ``batch`` (the plan's
    :data:`UBATCH` on the device; an evaluation takes whole windows, 2-3 times faster); the caller closes it
    (``close()``). ``logits_all``: keep the logits of every position (``scores``), for evaluation."""
    check_llama_cpp()
    from llama_cpp import Llama

    batch = min(batch, context)
    with _quiet_stderr():
        return Llama(str(path), n_ctx=context, n_batch=batch, n_ubatch=batch, logits_all=logits_all, verbose=False)


@contextlib.contextmanager
def open_gguf(path: str | os.PathLike, *, context: int, logits_all: bool = False) -> Iterator[Any]:
    """:func:`load_gguf`, closed on exit."""
    llm = load_gguf(path, context=context, logits_all=logits_all)
    try:
        yield llm
    finally:
        llm.close()


def gguf_build(path: str | os.PathLike, *, checksums: bool = True) -> tuple[Artifact, Plan]:
    """The record and plan of the GGUF build directory ``path``, its files verified; ``ArtifactError`` when it is
    not one."""
    path = Path(path)
    verify_artifact(path, checksums=checksums)
    artifact = Artifact.load(path)
    if not artifact.gguf:
        raise ArtifactError(f"{path}: a {artifact.format} build, not a GGUF build")
    return artifact, Plan.load(path / PLAN)


@dataclass(frozen=True)
class Generation:
    """Greedy text from a build, how fast it came and the process's peak resident memory."""

    text: str
    tokens: int
    seconds: float
    peak_rss_bytes: int

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


def peak_rss_bytes() -> int:
    """This process's peak resident memory so far: Linux's ``VmHWM`` of this program's memory (``ru_maxrss`` would
    carry over a parent's peak through fork and exec), else ``ru_maxrss`` (KiB on Linux, bytes on macOS)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def generate_gguf(path: str | os.PathLike, prompt: str, max_new_tokens: int) -> Generation:
    """Greedy decoding of ``max_new_tokens`` after ``prompt`` from the GGUF build directory ``path``."""
    _, plan = gguf_build(path)
    with open_gguf(Path(path) / GGUF_WEIGHTS, context=plan.options.context) as llm:
        start = time.perf_counter()
        out = llm.create_completion(prompt, max_tokens=max_new_tokens, temperature=0.0)
        seconds = time.perf_counter() - start
    return Generation(out["choices"][0]["text"], int(out["usage"]["completion_tokens"]), seconds, peak_rss_bytes())


__all__ = ["Generation", "generate_gguf", "gguf_build", "load_gguf", "main", "open_gguf", "peak_rss_bytes"]


def main(argv: list[str] | None = None) -> int:
    """``python -m lsaq.quantization.gguf_runtime DIR PROMPT TOKENS``: generate in a fresh process and print the
    :class:`Generation` as JSON (the evaluation's measurement of a build's resident memory)."""
    import json

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 3:
        print("usage: python -m lsaq.quantization.gguf_runtime DIR PROMPT TOKENS", file=sys.stderr)
        return 2
    gen = generate_gguf(args[0], args[1], int(args[2]))
    print(json.dumps({"text": gen.text, "tokens": gen.tokens, "seconds": gen.seconds,
                      "peak_rss_bytes": gen.peak_rss_bytes}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
