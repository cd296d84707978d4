"""Hidden states kept in memory up to a budget, the rest on disk.

A walk that carries many streams of hidden states at once (the measured loss carries one per layer and probe,
``L x P`` of ``[B, T, H]`` per batch by the last layer) keeps them in a :class:`HiddenStore`: each is put in memory
while the store's bytes stay within its budget, else written to a file in a temporary folder of its own (one
safetensors file per tensor, exact bytes), and taken back, memory or file, when the walk advances it. The folder
is removed when the store closes, whatever happened; one a killed process left (``.lsaq-hidden.lsaq-HOST-PID-*``)
is removed when the next store on the machine opens its folder (:mod:`lsaq.atomic`).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Hashable

import torch

from lsaq.atomic import temp_dir

DEFAULT_BUDGET = 2**31  # bytes of hidden states in memory (2 GiB) before the rest go to disk


class HiddenStore:
    """``put(key, tensor)`` / ``take(key)``: a tensor is held once, in memory within ``budget`` bytes (on its own
    device), else on disk under ``folder`` (default: the system's temporary folder) and taken back onto its
    device. Use as a context manager."""

    def __init__(self, budget: int = DEFAULT_BUDGET, folder: str | Path | None = None):
        if isinstance(budget, bool) or not isinstance(budget, int) or budget < 0:
            raise ValueError(f"hidden-state budget must be a number of bytes >= 0, got {budget!r}")
        self.budget = budget
        self.parent = folder
        self.memory: dict[Hashable, torch.Tensor] = {}
        self.files: dict[Hashable, tuple[Path, torch.device]] = {}  # on disk, and the device it came from
        self.in_memory = 0  # bytes held in memory now
        self.peak_memory = 0  # most bytes held in memory at once
        self.spilled = 0  # bytes written to disk, over the store's life
        self._written = 0  # files written, over the store's life (their names)
        self._folder: Path | None = None

    def __enter__(self) -> "HiddenStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __len__(self) -> int:
        return len(self.memory) + len(self.files)

    def put(self, key: Hashable, tensor: torch.Tensor) -> None:
        """Hold ``tensor`` under ``key`` (a new key)."""
        if key in self.memory or key in self.files:
            raise KeyError(f"hidden states {key!r} are already held")
        size = tensor.numel() * tensor.element_size()
        if self.in_memory + size <= self.budget:
            self.memory[key] = tensor
            self.in_memory += size
            self.peak_memory = max(self.peak_memory, self.in_memory)
            return
        from safetensors.torch import save_file

        if self._folder is None:
            self._folder = temp_dir(Path(self.parent or tempfile.gettempdir()) / "lsaq-hidden")
        file = self._folder / f"{self._written}.safetensors"
        save_file({"h": tensor.contiguous().cpu()}, str(file))
        self._written += 1
        self.files[key] = (file, tensor.device)
        self.spilled += size

    def take(self, key: Hashable) -> torch.Tensor:
        """The tensor held under ``key``, no longer held (``KeyError`` if none)."""
        if key in self.memory:
            tensor = self.memory.pop(key)
            self.in_memory -= tensor.numel() * tensor.element_size()
            return tensor
        from safetensors.torch import load_file

        file, device = self.files.pop(key)
        tensor = load_file(str(file), device=str(device))["h"]
        file.unlink()
        return tensor

    def close(self) -> None:
        """Drop everything held and remove the folder."""
        self.memory.clear()
        self.files.clear()
        self.in_memory = 0
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = None
