"""Shared fixtures: the real model and data from ../shared (or $LSAQ_SHARED), skipped with a reason when absent."""

from __future__ import annotations

from pathlib import Path

import pytest

from lsaq.calibration import shared_dir

MODEL_REL = "models/smollm2-135m-instruct-q4_1/SmolLM2-135M-Instruct.Q4_1.gguf"
WIKI_VALID_REL = "data/wikitext-2-raw/wiki.valid.raw"


def shared_path(rel: str) -> Path:
    """A file under the shared folder, or skip the test saying where it was looked for."""
    root = shared_dir()
    if root is None or not (root / rel).exists():
        pytest.skip(f"shared material {rel} not found (set LSAQ_SHARED or put ../shared beside the checkout)")
    return root / rel


@pytest.fixture(scope="session")
def shared_gguf() -> Path:
    return shared_path(MODEL_REL)


@pytest.fixture(scope="session")
def wiki_valid() -> Path:
    return shared_path(WIKI_VALID_REL)


@pytest.fixture(scope="session")
def shared_model(shared_gguf):
    """The real SmolLM2-135M (30 Llama layers), loaded once per session as float32."""
    from lsaq.model import load_model

    return load_model(shared_gguf)
