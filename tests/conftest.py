"""Shared fixtures: the real model and data from ../shared (or $LSAQ_SHARED), skipped with a reason when absent."""

from __future__ import annotations

import logging
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from lsaq.paths import shared_dir

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
    from lsaq.models.loading import load_model

    return load_model(shared_gguf)


@dataclass(frozen=True)
class S3:
    """A bucket on moto's S3 server: the store URI and the environment a process needs to reach it."""

    uri: str
    env: dict[str, str]


@pytest.fixture(scope="module")
def moto_s3():
    """A fresh bucket on moto's S3 server (127.0.0.1, a free port, stopped after the module), with fake
    credentials and the endpoint as a deployment would set them in the environment: ``S3(uri, env)``."""
    pytest.importorskip("moto")
    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # not one line per S3 request in a failure's report
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        env = {"AWS_ACCESS_KEY_ID": "AKIAPIPELINETEST0000",
               "AWS_SECRET_ACCESS_KEY": "pipeline-test-secret-never-logged",
               "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL_S3": endpoint,
               "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull}
        bucket = f"lsaq-{uuid.uuid4().hex[:12]}"
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="x",
                     aws_secret_access_key="x").create_bucket(Bucket=bucket)
        yield S3(uri=f"s3://{bucket}/team", env=env)
    finally:
        server.stop()


@pytest.fixture(scope="module")
def s3_env(moto_s3):
    """``moto_s3`` with its environment set in this process (AWS_PROFILE and friends removed) for the module;
    yields the store URI."""
    mp = pytest.MonkeyPatch()
    try:
        for var in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_SESSION_TOKEN"):
            mp.delenv(var, raising=False)
        for var, value in moto_s3.env.items():
            mp.setenv(var, value)
        yield moto_s3.uri
    finally:
        mp.undo()


# ------------------------------------------------------------------------------------------ float tolerances
# Two computations of the same quantity that differ only in how the arithmetic is blocked (batch shape, thread
# count, BLAS kernel, CPU vector width) agree to the dtype's rounding, not bit for bit. These bounds say how far
# apart they may be, from the dtype, the magnitudes and the reduction lengths: never from one machine's results.


def dot_noise(dtype: torch.dtype, length: int, magnitude: "float | torch.Tensor") -> "float | torch.Tensor":
    """Bound on the rounding of a sum of ``length`` products in ``dtype`` whatever the order of summation (BLAS
    blocking, threads, vector width): ``length * eps * sum|terms|`` (Higham's gamma_n, to first order), where
    ``magnitude`` is ``sum |terms|`` (e.g. ``|x| @ |W|.T``)."""
    return length * torch.finfo(dtype).eps * magnitude


def logit_noise(dtype: torch.dtype, scale: float, reduction: int) -> float:
    """Bound on how far two differently blocked forward passes can put one logit apart: ``reduction`` rounded
    terms behind each logit (for a model: layers x its widest dot product), each off by at most ``eps * scale``
    (``scale``: the largest logit magnitude, taken as at least 1). The worst case, not the sqrt(n) of random
    rounding."""
    return float(reduction * torch.finfo(dtype).eps * max(scale, 1.0))


def kl_noise(kl: float | np.ndarray, noise: float, vocab: int, scale: float) -> float | np.ndarray:
    """Bound on how far two computations of ``KL(softmax(a) || softmax(b))`` (float64 log-probabilities, as lsaq
    takes them) can differ when every logit of ``a`` and ``b`` differs by at most ``noise`` between them. To first
    order the gradient in ``b`` is ``q - p`` (L1 norm <= sqrt(2 KL), Pinsker) and the one in ``a`` is
    ``p * (log p/q - KL)`` (L1 norm ~ sqrt(Var_p log p/q) ~ sqrt(2 KL)); the second order term is at most
    ``2 noise^2``. Each float64 log-probability is off by a few ulps of ``|log p|``, whose mean under ``p`` is at
    most ``log(vocab) + 2 scale`` (``scale``: the largest logit magnitude); 16 such ulps cover both sides'
    roundings and the sum over the vocabulary."""
    kl = np.abs(np.asarray(kl, dtype=np.float64))
    floor = 16 * np.finfo(np.float64).eps * (np.log(vocab) + 2 * scale)
    return 2 * np.sqrt(2 * kl) * noise + 2 * noise**2 + floor


def nll_noise(noise: float, vocab: int, scale: float) -> float:
    """Bound on how far two computations of a next-token NLL ``logsumexp(a) - a_y`` (or of its mean over
    tokens) can differ when every logit differs by at most ``noise``: log-softmax moves by at most ``2 noise``
    (1 from ``a_y``, 1 from the logsumexp), plus 16 float64 ulps of ``log(vocab) + 2 scale`` for the rounding."""
    return 2 * noise + 16 * float(np.finfo(np.float64).eps) * (float(np.log(vocab)) + 2 * scale)


def plan_with_precisions(info, precisions, group_size=None):
    """A plan for a loaded model with explicit per-layer precisions (1 GiB test device: it fits the real model)."""
    import dataclasses

    from lsaq.models.families import model_shape
    from lsaq.models.identity import ModelRef
    from lsaq.planning.devices import DeviceProfile, MemoryKind
    from lsaq.planning.memory import WeightPolicy
    from lsaq.planning.planner import PlanOptions, make_plan

    shape = model_shape(info.config)
    device = DeviceProfile(name="test-1gib", memory=2**30, kind=MemoryKind.SYSTEM, reserve=0, notes="test")
    options = PlanOptions(context=256, policy=WeightPolicy(group_size=group_size))
    base = make_plan(shape, [1.0] * shape.num_layers, device, options,
                     model=ModelRef.from_info(info))
    return dataclasses.replace(base, precisions=tuple(precisions))


@pytest.fixture(scope="session")
def mixed_artifact(shared_gguf, tmp_path_factory):
    """The shared model quantized with layers cycling FP16, INT8, INT4 (per-channel): ``(artifact dir, plan)``.

    Written once per session from a fresh load (quantizing works in place, so ``shared_model`` is not used).
    """
    from lsaq.models.loading import load_model
    from lsaq.precision import Precision
    from lsaq.quantization.artifact import write_artifact

    mix = (Precision.FP16, Precision.INT8, Precision.INT4)
    loaded = load_model(shared_gguf)
    plan = plan_with_precisions(loaded.info, [mix[i % 3] for i in range(loaded.info.num_layers)])
    out = tmp_path_factory.mktemp("art") / "mixed"
    write_artifact(loaded, plan, out)
    return out, plan
