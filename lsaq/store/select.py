"""On-device selection: the most faithful published build of a model that fits the memory free here now.

A device that pulls its own build (``lsaq download --device local``) measures what it can give a model right now
(:func:`lsaq.planning.detect.detect_local`: the freest NVIDIA GPU, else available system RAM, minus a safety
reserve), optionally capped by the user, and picks among the builds of the model's newest published revision the
one with the best evaluation whose memory need (weights + KV cache + workspace at its context) fits, among the builds
a runtime installed here runs (:func:`installed_runtimes`: a GGUF build needs llama.cpp; ``--runtime`` narrows it to
one). Faithfulness is read from the manifests: lowest mean KL to the float model, then highest top-1 agreement;
builds without an evaluation rank after evaluated ones, by average bits.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from lsaq.planning.devices import DeviceProfile
from lsaq.quantization.record import LLAMA_CPP_RUNTIME, LSAQ_RUNTIME, STOCK_RUNTIME, VLLM_RUNTIME
from lsaq.runtime import Runtime
from lsaq.store.backend import Backend, ObjectNotFoundError
from lsaq.store.download import Downloaded, download, list_builds
from lsaq.store.manifest import BuildManifest
from lsaq.units import format_bytes

log = logging.getLogger(__name__)


class NoBuildFitsError(ValueError):
    """No published build of the model fits the memory available; the message lists each build and its need."""


@dataclass(frozen=True)
class Selection:
    """The chosen build, the memory it was chosen for, and every build considered."""

    build: BuildManifest
    available: DeviceProfile
    candidates: tuple[BuildManifest, ...]


def faithfulness(m: BuildManifest) -> tuple:
    """Sort key, best first: evaluated builds by (KL mean, -top-1), then the others by more bits."""
    fid = (m.evaluation or {}).get("fidelity") or {}
    kl, top1 = fid.get("kl_mean"), fid.get("top1_agreement")
    bits = m.avg_bits.get("all_weights", 0.0)
    if isinstance(kl, (int, float)):
        return (0, float(kl), -float(top1 or 0.0), -bits)
    return (1, 0.0, 0.0, -bits)


def newest_revision(builds: list[BuildManifest]) -> list[BuildManifest]:
    """The builds of the revision published most recently (a new base revision replaces the old builds)."""
    newest = max(builds, key=lambda m: m.published_at)
    return [m for m in builds if (m.model_slug, m.revision) == (newest.model_slug, newest.revision)]


def describe(m: BuildManifest) -> str:
    fid = (m.evaluation or {}).get("fidelity") or {}
    quality = f"KL {fid['kl_mean']:.4f}" if isinstance(fid.get("kl_mean"), (int, float)) else "not evaluated"
    return f"{m.device_slug} {m.build_id} needs {format_bytes(m.required_bytes)} ({quality})"


def cap(profile: DeviceProfile, max_memory: int | None) -> DeviceProfile:
    """``profile`` with its usable memory capped at ``max_memory`` bytes (a user's limit), when given."""
    if max_memory is None or profile.usable <= max_memory:
        return profile
    if max_memory <= 0:
        raise ValueError(f"the memory limit must be positive, got {max_memory}")
    # The whole limit is usable: the device's reserve is already outside what it measured free.
    return dataclasses.replace(profile, memory=max_memory, reserve=0,
                               notes=f"capped by --max-memory; {format_bytes(profile.usable)} usable free here "
                                     f"({profile.notes})")


# the Python package each runtime a manifest names needs here (lsaq's packed runtime is lsaq itself)
RUNTIME_PACKAGES = {LSAQ_RUNTIME: "lsaq", STOCK_RUNTIME: "compressed_tensors", LLAMA_CPP_RUNTIME: "llama_cpp",
                    VLLM_RUNTIME: "vllm"}
INSTALL_HINTS = {LLAMA_CPP_RUNTIME: "pip install 'lsaq[llama]'", STOCK_RUNTIME: "pip install 'lsaq[hf]'"}


def installed_runtimes() -> frozenset[str]:
    """The manifest runtimes (``lsaq``, ``transformers``, ``llama.cpp``, ``vllm``) whose package is installed here."""
    return frozenset(r for r, package in RUNTIME_PACKAGES.items() if importlib.util.find_spec(package) is not None)


def runtimes_for(runtime: Runtime | str | None) -> frozenset[str] | None:
    """The manifest runtimes a ``--runtime`` choice accepts (transformers: lsaq's packed runtime or stock
    transformers, the same compressed-tensors build); None for None (whatever is installed)."""
    if runtime is None:
        return None
    r = Runtime.parse(runtime)
    return frozenset({LSAQ_RUNTIME, STOCK_RUNTIME}) if r is Runtime.TRANSFORMERS else frozenset({r.value})


def runnable(model: str, builds: list[BuildManifest], runtimes: frozenset[str], *,
             installed: bool = False) -> list[BuildManifest]:
    """The builds one of ``runtimes`` runs; :class:`NoBuildFitsError` naming the builds' runtimes when none (and,
    when ``runtimes`` are what is ``installed``, how to install theirs)."""
    kept = [m for m in builds if set(m.runtimes) & runtimes]
    if not kept:
        needed = sorted({r for m in builds for r in m.runtimes})
        hints = "; ".join(f"{r}: {INSTALL_HINTS[r]}" for r in needed if r in INSTALL_HINTS) if installed else ""
        raise NoBuildFitsError(f"no build of {model} runs in {', '.join(sorted(runtimes))}"
                               f"{' (installed here)' if installed else ''}: its builds run in {', '.join(needed)}"
                               + (f" ({hints})" if hints else ""))
    return kept


def candidates(store: Backend, model: str) -> list[BuildManifest]:
    """The builds of ``model``'s newest published revision, most faithful first (one listing of the store)."""
    builds = list_builds(store, model=model)
    if not builds:
        raise ObjectNotFoundError(f"{store.uri}: no complete build of model {model!r} (see `lsaq ls`)")
    return sorted(newest_revision(builds), key=faithfulness)


def choose(model: str, builds: list[BuildManifest], available: DeviceProfile) -> Selection:
    """The first of ``builds`` (most faithful first) whose memory need fits ``available.usable``;
    :class:`NoBuildFitsError` lists every build and what it needs when none does."""
    fitting = [m for m in builds if m.required_bytes <= available.usable]
    if not fitting:
        listed = "; ".join(describe(m) for m in sorted(builds, key=lambda m: m.required_bytes))
        raise NoBuildFitsError(f"no build of {model} fits the {format_bytes(available.usable)} usable here "
                               f"({available.describe()}; {available.notes}). Builds: {listed}. Free memory, wait "
                               "for it (--wait-for-memory), or build for a smaller device")
    log.info("local device: %s usable; chose %s", format_bytes(available.usable), describe(fitting[0]))
    return Selection(fitting[0], available, tuple(builds))


def select_build(store: Backend, model: str, *, available: DeviceProfile) -> Selection:
    """The most faithful build of ``model`` (its newest published revision) whose memory need fits
    ``available.usable`` (see :func:`choose`)."""
    return choose(model, candidates(store, model), available)


def select_local(store: Backend, model: str, *, max_memory: int | None = None, wait_seconds: float | None = None,
                 probe: Callable[[], DeviceProfile] | None = None, runtime: Runtime | str | None = None,
                 installed: frozenset[str] | None = None) -> Selection:
    """:func:`select_build` for the memory free on this machine now (``probe``, default NVML / psutil), capped at
    ``max_memory``, among the builds ``runtime`` runs (None: any runtime ``installed`` here, default
    :func:`installed_runtimes`); ``wait_seconds``: first wait until the smallest build fits, up to that long."""
    from lsaq.planning.detect import detect_local, wait_for_memory

    measure = probe or detect_local

    def capped() -> DeviceProfile:
        return cap(measure(), max_memory)

    asked = runtimes_for(runtime)
    wanted = asked or (installed_runtimes() if installed is None else installed)
    builds = runnable(model, candidates(store, model), wanted, installed=asked is None)
    if wait_seconds is not None:
        need = min(m.required_bytes for m in builds)
        if max_memory is not None and need > max_memory:
            raise NoBuildFitsError(f"the smallest build of {model} needs {format_bytes(need)}, more than the "
                                   f"limit of {format_bytes(max_memory)}: waiting would not help")
        wait_for_memory(need, wait_seconds, probe=capped)
    return choose(model, builds, capped())


def download_local(store: Backend, dest: str | Path, model: str, *, max_memory: int | None = None,
                   wait_seconds: float | None = None, force: bool = False,
                   runtime: Runtime | str | None = None) -> tuple[Selection, Downloaded]:
    """Choose with :func:`select_local`, then download and verify that build into ``dest`` (see :func:`download`)."""
    chosen = select_local(store, model, max_memory=max_memory, wait_seconds=wait_seconds, runtime=runtime)
    m = chosen.build
    return chosen, download(store, dest, model=model, device=m.device_slug, build=m.build_id, force=force)
