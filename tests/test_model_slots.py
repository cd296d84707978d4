"""Model slots across processes: ``LSAQ_MODEL_CONCURRENCY`` names a Prefect global concurrency limit that every
model-loading stage holds (a real server: ``prefect_test_harness``)."""

from __future__ import annotations

import threading

import pytest

pytest.importorskip("prefect")


def test_a_model_stage_holds_the_named_global_limit_and_a_missing_limit_is_an_error(monkeypatch):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.concurrency.sync import concurrency
    from prefect.testing.utilities import prefect_test_harness

    from tasks.stages import MODEL_CONCURRENCY_ENV, model_slot

    with prefect_test_harness(server_startup_timeout=90):
        with get_client(sync_client=True) as client:
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name="lsaq-gpu0", limit=1))
            active = lambda: client.read_global_concurrency_limit_by_name("lsaq-gpu0").active_slots  # noqa: E731
            monkeypatch.setenv(MODEL_CONCURRENCY_ENV, "lsaq-gpu0")
            held, release = threading.Event(), threading.Event()

            def stage() -> None:  # another flow run's model stage on the same GPU
                with model_slot():
                    held.set()
                    release.wait(30)

            other = threading.Thread(target=stage)
            other.start()
            try:
                assert held.wait(30) and active() == 1
                with pytest.raises(TimeoutError):  # the GPU is taken: a second holder waits
                    with concurrency("lsaq-gpu0", occupy=1, timeout_seconds=2, strict=True):
                        pass
            finally:
                release.set()
                other.join(30)
            assert active() == 0
            with model_slot():  # free again: this process gets it
                assert active() == 1

            monkeypatch.setenv(MODEL_CONCURRENCY_ENV, "no-such-limit")
            with pytest.raises(Exception, match="no-such-limit"):
                with model_slot():
                    pass
