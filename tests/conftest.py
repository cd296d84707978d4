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
PROMPT = "hello world"  # for the tiny checkpoints' character tokenizer


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


# ------------------------------------------------------------------------------- tiny offline checkpoints


def tiny_tokenizer():
    """A character-level tokenizer (4 specials + printable ASCII), built offline with ``tokenizers``."""
    from lsaq.engine.synthetic import char_tokenizer

    return char_tokenizer()


def tiny_llama_dir(path: Path, *, tied: bool = False, hot: bool = False, dtype: torch.dtype = torch.bfloat16,
                   head_gain: float = 1.0, seed: int = 0) -> Path:
    """A 3-layer Llama (hidden 64, vocab 128) saved as a safetensors checkpoint declaring ``dtype``, with tokenizer.

    ``hot``: layer 0's MLP (norm gain 30, weights ~N(0, 1)) writes ~1e6 into the residual stream, past float16's
    65504 while every weight stays small; bf16 and fp32 carry it, fp16 turns it into inf and then NaN.
    ``head_gain`` scales an untied head, so logits have decisive margins.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128, max_position_embeddings=64, tie_word_embeddings=tied,
                         pad_token_id=0, bos_token_id=2, eos_token_id=3)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        if hot:
            mlp = model.model.layers[0].mlp
            model.model.layers[0].post_attention_layernorm.weight.fill_(30.0)
            for lin in (mlp.gate_proj, mlp.up_proj, mlp.down_proj):
                lin.weight.normal_(0.0, 1.0)
        if not tied:
            model.lm_head.weight.mul_(head_gain)
    model.to(dtype).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def tiny_plan(info: "ModelInfo", precisions, policy: "WeightPolicy | None" = None) -> "Plan":
    """A plan for ``info`` with explicit per-layer precisions and weight policy (1 GiB test device)."""
    import dataclasses

    from lsaq.models.families import model_shape
    from lsaq.models.identity import ModelRef
    from lsaq.planning.devices import DeviceProfile, MemoryKind
    from lsaq.planning.memory import WeightPolicy
    from lsaq.planning.planner import PlanOptions, make_plan

    shape = model_shape(info.config)
    device = DeviceProfile(name="test-1gib", memory=2**30, kind=MemoryKind.SYSTEM, reserve=0, notes="test")
    options = PlanOptions(context=64, policy=policy or WeightPolicy())
    base = make_plan(shape, [1.0] * shape.num_layers, device, options, model=ModelRef.from_info(info))
    return dataclasses.replace(base, precisions=tuple(precisions))


# ------------------------------------------------------------------------- random checkpoints of any family

TINY_FAMILY = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                   head_dim=8, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def tiny_family_model(model_type: str, *, layers: int = 3, mixed: bool = False, seed: int = 0,
                      **overrides) -> torch.nn.Module:
    """A random float32 ``model_type`` model (hidden 32, vocab 96) in eval mode. ``mixed``: layers alternate
    sliding (window 5) and full attention, as gemma2/gemma3_text/qwen3 configure them."""
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs = dict(TINY_FAMILY, num_hidden_layers=layers, **overrides)
    if model_type == "gpt_neox":
        kwargs.pop("head_dim"), kwargs.pop("num_key_value_heads")
    if mixed:
        kwargs.update(layer_types=["sliding_attention", "full_attention"] * (layers // 2) + ["sliding_attention"]
                      * (layers % 2), sliding_window=5, use_sliding_window=True)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **kwargs), dtype=torch.float32).eval()


def shard_checkpoint(model: torch.nn.Module, path: Path, *, layers_per_shard: int = 1,
                     dtype: torch.dtype | None = None) -> Path:
    """Save ``model`` as a sharded safetensors checkpoint with an index (transformers' names: its own
    ``save_pretrained`` writes the config and the key names, then the weights are re-split ``layers_per_shard``
    decoder layers per file, the rest in a last file), in ``dtype`` (default: as the model holds them)."""
    import json as json_

    from safetensors.torch import load_file, save_file

    model.save_pretrained(path)
    tensors = load_file(str(path / "model.safetensors"))
    (path / "model.safetensors").unlink()
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for name, t in tensors.items():
        parts = name.split(".")
        index = next((int(p) for p in parts if p.isdigit()), None)
        key = f"layers-{index // layers_per_shard}" if index is not None else "rest"
        groups.setdefault(key, {})[name] = t.to(dtype) if dtype is not None else t
    names = sorted(groups, key=lambda k: (k == "rest", int(k.split("-")[1]) if k != "rest" else 0))
    weight_map = {}
    for i, key in enumerate(names):
        file = f"model-{i + 1:05d}-of-{len(names):05d}.safetensors"
        save_file({n: t.contiguous() for n, t in groups[key].items()}, str(path / file), metadata={"format": "pt"})
        weight_map.update({n: file for n in groups[key]})
    (path / "model.safetensors.index.json").write_text(json_.dumps({"metadata": {}, "weight_map": weight_map}))
    return path


# ----------------------------------------------------------------------------- peak memory of lsaq commands

# 12 Llama layers of width 2048 (651M parameters: 2.42 GiB in float32, 1.3 GB of bf16 shards): the checkpoint the
# memory tests stream, larger than what one layer at a time holds.
WIDE_LLAMA = dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=2048, intermediate_size=5632,
                  num_hidden_layers=12, num_attention_heads=16, num_key_value_heads=16, vocab_size=8192,
                  max_position_embeddings=512, tie_word_embeddings=False)
WIDE_PARAMS = 12 * (2048 * 2048 * 4 + 3 * 2048 * 5632) + 2 * 8192 * 2048
# Runs lsaq's CLI and prints the process's own peak RSS in KiB as the last line (VmHWM: getrusage's ru_maxrss
# would include pytest's memory at fork time, which Linux carries across exec).
PEAK_RSS = ("import sys; from lsaq.cli import main; rc = main(sys.argv[1:]); "
            "print('peak_kib', next(l for l in open('/proc/self/status') if l.startswith('VmHWM:')).split()[1]); "
            "sys.exit(rc)")


def lsaq_peak_rss(argv: list[str], timeout: int = 900) -> tuple[str, int]:
    """``lsaq ARGV`` in its own process: ``(its stdout, its peak RSS in bytes)``; fails the test if it fails."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", PEAK_RSS, *argv], capture_output=True, text=True,
                          timeout=timeout, cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout, int(proc.stdout.strip().splitlines()[-1].split()[1]) * 1024


# ------------------------------------------------------------------------------ NVML and RAM at their boundary


def _pynvml_module(gpus, init_error=None, broken=()):
    """A stand-in pynvml module: ``gpus`` = [(name, total bytes, free bytes)], GPU ``i`` has UUID ``GPU-0000i``."""
    import types

    m = types.ModuleType("pynvml")

    class NVMLError(Exception):
        pass

    def init():
        if init_error:
            raise NVMLError(init_error)

    def mem(h):
        if h in broken:
            raise NVMLError("Not Supported")
        name, total, free = gpus[h]
        return types.SimpleNamespace(total=total, free=free, used=total - free)

    m.NVMLError = NVMLError
    m.nvmlInit, m.nvmlShutdown = init, lambda: None
    m.nvmlSystemGetDriverVersion = lambda: b"550.54"
    m.nvmlDeviceGetCount = lambda: len(gpus)
    m.nvmlDeviceGetHandleByIndex = lambda i: i
    m.nvmlDeviceGetMemoryInfo = mem
    m.nvmlDeviceGetName = lambda h: gpus[h][0].encode()
    m.nvmlDeviceGetUUID = lambda h: f"GPU-0000{h}"
    return m


@pytest.fixture
def fake_nvml(monkeypatch):
    """``fake_nvml(gpus, init_error=None, broken=())`` installs a stand-in pynvml (see :func:`_pynvml_module`;
    ``broken``: GPU indices whose memory NVML cannot report) for the test."""
    import sys

    def install(gpus, init_error=None, broken=()):
        monkeypatch.setitem(sys.modules, "pynvml", _pynvml_module(gpus, init_error, broken))

    return install


@pytest.fixture
def fake_ram(monkeypatch):
    """32 GiB of system RAM, 20 GiB available, not a Jetson, no CUDA_VISIBLE_DEVICES."""
    from lsaq.planning import detect as detect_mod

    gib = 1024**3
    monkeypatch.setattr(detect_mod, "system_memory", lambda: (32 * gib, 20 * gib))
    monkeypatch.setattr(detect_mod, "_TEGRA_RELEASE", detect_mod.Path("/nonexistent/nv_tegra_release"))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)


class FakeClock:
    """A monotonic clock that only moves when ``sleep`` is called: ``clock()`` and ``clock.sleep(seconds)``."""

    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        return self.t

    def sleep(self, s: float) -> None:
        self.t += s


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()
