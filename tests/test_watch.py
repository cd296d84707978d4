"""The watch flow's decisions: the config, the current revision of a local model, what is stale in the store."""

from __future__ import annotations

import pytest

from lsaq.models.revision import ModelUnreachableError, current_revision
from lsaq.store.keys import model_slug, revision_slug
from lsaq.store.stage import open_store
from tasks.watch import WatchTarget, check_model, devices_in, read_watch_config
from tests.test_store_select import put_build


@pytest.fixture
def local_model(tmp_path):
    """A local model directory: the watch flow only hashes its weights, it never loads them."""
    d = tmp_path / "my-model"
    d.mkdir()
    (d / "model.safetensors").write_bytes(b"weights v1")
    (d / "config.json").write_text("{}")
    return d


def test_a_watch_config_reads_and_names_what_is_wrong(tmp_path):
    cfg = tmp_path / "watch.yaml"
    cfg.write_text("version: 1\nmodels:\n  - {model: org/name, revision: main, devices: [rtx3060]}\n"
                   "  - {devices: [rpi-zero-2w, beaglebone-black]}\n")
    assert read_watch_config(cfg) == (WatchTarget("org/name", ("rtx3060",), "main"),
                                      WatchTarget(None, ("rpi-zero-2w", "beaglebone-black")))
    for text, message in [("version: 2\nmodels: []\n", "version: 1"),
                          ("version: 1\nmodels:\n  - {model: x, devices: []}\n", r"models\[0\]: 'devices'"),
                          ("version: 1\nmodels:\n  - {model: x, devices: [a], device: b}\n", r"models\[0\]"),
                          ("version: 1\nmodels:\n  - {model: 3, devices: [a]}\n", "'model' must be a string")]:
        cfg.write_text(text)
        with pytest.raises(ValueError, match=message):
            read_watch_config(cfg)


def test_the_revision_of_a_local_model_follows_its_weights(local_model):
    first = current_revision(str(local_model))
    assert first.revision is None and revision_slug(first).startswith("sha256-")
    assert model_slug(first) == "my-model"
    (local_model / "model.safetensors").write_bytes(b"weights v2")
    assert revision_slug(current_revision(str(local_model))) != revision_slug(first)
    with pytest.raises(ModelUnreachableError, match="does not exist"):
        current_revision(str(local_model / "missing"))


def test_only_devices_without_a_build_of_the_current_revision_are_stale(local_model, tmp_path):
    store_uri = str(tmp_path / "store")
    store = open_store(store_uri)
    target = WatchTarget(str(local_model), ("rpi-zero-2w", "beaglebone-black"))
    check = check_model.fn(target, store_uri)
    assert check.error is None and check.stale == target.devices and check.built == ()  # never built

    put_build(store, "rpi-zero-2w", 200, 0.1, model_slug="my-model", revision=check.revision)
    check = check_model.fn(target, store_uri)
    assert check.stale == ("beaglebone-black",) and check.built == ("rpi-zero-2w",)
    put_build(store, "beaglebone-black", 300, 0.01, model_slug="my-model", revision=check.revision)
    assert check_model.fn(target, store_uri).stale == ()  # unchanged: nothing to do

    (local_model / "model.safetensors").write_bytes(b"weights v2")  # a new revision: every device is stale again
    changed = check_model.fn(target, store_uri)
    assert changed.revision != check.revision and changed.stale == target.devices


def test_an_unreachable_model_is_reported_not_raised(tmp_path):
    check = check_model.fn(WatchTarget(str(tmp_path / "gone"), ("rtx3060",)), str(tmp_path / "store"))
    assert check.stale == () and "does not exist" in check.error


def test_a_build_run_in_flight_counts_only_for_its_own_model_and_devices():
    run = {"model": "/m.gguf", "device": "rpi-3b", "devices": ["a", "b"]}
    assert devices_in(run, "/m.gguf") == ("rpi-3b", "a", "b")
    assert devices_in({"model": "/m.gguf", "devices": None, "device": None}, "/m.gguf") == ()
    assert devices_in({"model": "/other.gguf", "device": "rpi-3b"}, "/m.gguf") == ()
    assert devices_in({"device": "rpi-3b"}, None) == ("rpi-3b",)  # the default model


def test_the_example_watch_config_names_catalog_devices():
    from pathlib import Path

    from lsaq.planning.devices import list_devices

    (target,) = read_watch_config(Path(__file__).resolve().parents[1] / "infra" / "watch.yaml")
    assert target.model is None and set(target.devices) <= {d.name for d in list_devices()}
