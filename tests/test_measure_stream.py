"""The measured loss on the layer stream: one walk carries every probe's branch (layer i quantized, the float layers
after it), L layer loads, the branches' hidden states in memory within a budget and the rest on disk, exactly the
same numbers either way; equal to whole forward passes with one layer quantized on the shared model; `lsaq
measure` of a checkpoint larger than its peak holds one layer."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import WIDE_LLAMA, WIDE_PARAMS, lsaq_peak_rss, shard_checkpoint, tiny_family_model

from lsaq.calibration.sets import CalibrationSet
from lsaq.engine.checkpoint import Checkpoint
from lsaq.engine.skeleton import Resident, Skeleton
from lsaq.engine.spill import HiddenStore
from lsaq.importance.sensitivity import Probe, probe_samples, quantized_layer
from lsaq.importance.similarity import kl_divergence
from lsaq.models.parts import decoder_parts

PROBES = [Probe.parse("int8"), Probe.parse("int4"), Probe.parse("int4-g16")]


def calibration(n: int, length: int, vocab: int = 96, seed: int = 0) -> CalibrationSet:
    generator = torch.Generator().manual_seed(seed)
    return CalibrationSet.from_tokens(torch.randint(3, vocab, (n, length), generator=generator))


# -------------------------------------------------------------------------------------------- HiddenStore


def test_the_store_gives_back_exactly_what_it_was_given_in_memory_or_on_disk(tmp_path):
    tensors = {k: torch.randn(2, 5, 8, dtype=dtype) for k, dtype in
               enumerate([torch.float32, torch.bfloat16, torch.float64, torch.float16])}
    sizes = {k: t.numel() * t.element_size() for k, t in tensors.items()}
    with HiddenStore(budget=sizes[0] + sizes[1], folder=tmp_path) as store:
        for k, t in tensors.items():
            store.put(k, t)
        assert set(store.memory) == {0, 1} and set(store.files) == {2, 3} and len(store) == 4
        assert store.in_memory == store.peak_memory == sizes[0] + sizes[1] and store.spilled == sizes[2] + sizes[3]
        assert len(list(tmp_path.glob(".lsaq-hidden.lsaq-*.tmp/*.safetensors"))) == 2
        for k in (3, 0, 2, 1):
            got = store.take(k)
            assert got.dtype == tensors[k].dtype and torch.equal(got, tensors[k])
        assert len(store) == 0 and store.in_memory == 0 and not list(tmp_path.glob(".lsaq-hidden.*/*"))
        with pytest.raises(KeyError):
            store.take(0)
        store.put("a", tensors[2])  # memory is free again
        with pytest.raises(KeyError, match="already held"):
            store.put("a", tensors[2])
    assert not list(tmp_path.iterdir())  # the folder went with the store


def test_the_store_leaves_nothing_on_disk_when_the_walk_fails(tmp_path):
    with pytest.raises(RuntimeError, match="boom"):
        with HiddenStore(budget=0, folder=tmp_path) as store:
            store.put(0, torch.ones(4))
            assert list(tmp_path.iterdir())
            raise RuntimeError("boom")
    assert not list(tmp_path.iterdir())
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="budget must be a number of bytes >= 0"):
            HiddenStore(budget=bad)


# ------------------------------------------------------------------------------------------- the probe walk


@pytest.mark.parametrize("model_type", ["llama", "gemma3_text"])
def test_one_walk_measures_the_same_from_memory_disk_and_checkpoint(model_type, tmp_path):
    """A model in memory, the same model read one layer at a time from a sharded checkpoint, and the branches all
    on disk: the same numbers to the bit, in L layer loads and the stated layer runs (gemma3_text: sliding and
    full attention layers, each replayed with its own mask and rotary tables)."""
    model = tiny_family_model(model_type, layers=4, mixed=model_type != "llama")
    calib = calibration(5, 12)
    in_memory = probe_samples(model, calib, PROBES, batch_size=2)
    shard_checkpoint(model, tmp_path / "m")
    streamed = probe_samples(Skeleton.build(Checkpoint.open(tmp_path / "m")), calib, PROBES, batch_size=2)
    on_disk = probe_samples(model, calib, PROBES, batch_size=2, budget=0)
    np.testing.assert_array_equal(streamed.scores, in_memory.scores)
    np.testing.assert_array_equal(on_disk.scores, in_memory.scores)
    assert in_memory.scores.shape == (3, 5, 4) and (in_memory.scores > 0).all()
    batches, layers, probes = 3, 4, len(PROBES)
    assert in_memory.cost() == {"layer_loads": layers, "hidden_bytes_on_disk": 0,
                                "layer_runs": batches * (layers + probes * layers * (layers + 1) // 2)}
    # every branch's hidden states went to disk at every layer: P x (i + 1) x [5, 12, 32] floats after layer i
    assert on_disk.hidden_bytes_on_disk == sum(probes * (i + 1) for i in range(layers)) * 5 * 12 * 32 * 4
    gptq = probe_samples(model, calib, PROBES[:1], batch_size=2, quantizer="gptq")
    assert gptq.layer_runs == batches * (layers + layers * (layers + 1) // 2) + batches * layers  # + the Hessians


def test_the_measured_loss_of_the_shared_model_is_whole_forward_passes_with_one_layer_quantized(shared_model):
    """On the real model, every layer and probe: the walk's KL equals the KL of a whole forward pass with only
    that layer quantized (the definition), within 1e-6 relative."""
    from lsaq.importance.cost import measure_layer_loss

    model = shared_model.model
    tokens = torch.tensor(shared_model.tokenizer("The quick brown fox jumps over the lazy dog. " * 8)["input_ids"][:64])
    calib = CalibrationSet.from_tokens(tokens.view(1, 64))
    record = measure_layer_loss(model, shared_model.info, calib, ("int8", "int4"))
    assert record.cost["layer_loads"] == 30 and record.cost["layer_runs"] == 30 + 2 * 30 * 31 // 2
    with torch.inference_mode():
        ref = model(input_ids=calib.tokens, use_cache=False).logits[0]  # [64, V]
        for i, layer in enumerate(decoder_parts(model).layers):
            for k, probe in enumerate(Probe.parse(p) for p in record.probes):
                with quantized_layer(layer, probe.precision, probe.group_size):
                    logits = model(input_ids=calib.tokens, use_cache=False).logits[0]
                want = float(kl_divergence(ref, logits).mean())
                assert record.loss[i][k] == pytest.approx(want, rel=1e-6, abs=0), (i, probe.label)


def test_sensitivity_scoring_streams_a_checkpoint(tmp_path):
    from lsaq.importance.scoring import score_samples

    model = tiny_family_model("qwen3", layers=3, mixed=True)
    calib = calibration(3, 10)
    shard_checkpoint(model, tmp_path / "m")
    streamed = score_samples(Skeleton.build(Checkpoint.open(tmp_path / "m")), calib, "sensitivity", batch_size=2)
    np.testing.assert_array_equal(streamed, score_samples(model, calib, "sensitivity", batch_size=2))
    assert np.array_equal(streamed, probe_samples(Resident(decoder_parts(model)), calib, [Probe.parse("int4")],
                                                  batch_size=2).scores[0])


# ------------------------------------------------------------------------------- memory of `lsaq measure`

# Of the float32 model's bytes (2.42 GiB): the skeleton, one float layer and its quantized copy, 12 x 2 branches of
# 2 x 32 tokens: 1.19 GiB here (0.49). Loading the model whole needs more than 1.0.
MEASURE_FRACTION = 0.6


@pytest.mark.slow
def test_measuring_a_sharded_checkpoint_holds_one_layer(tmp_path):
    """12 layers of width 2048 (651M parameters: 2.4 GiB in float32): ``lsaq measure`` (INT8 and INT4 probes) in
    its own process peaks well under the float32 model."""
    from lsaq.engine.synthetic import write_random_checkpoint
    from lsaq.importance.cost import LayerLoss

    model = write_random_checkpoint(WIDE_LLAMA, tmp_path / "model")
    text = tmp_path / "text.txt"  # the character tokenizer: 32 tokens are 32 characters
    text.write_text("The quick brown fox jumps over the lazy dog. " * 10)
    stdout, peak = lsaq_peak_rss(["measure", "--model", str(model), "--calib", str(text), "--samples", "2",
                                  "--seq-len", "32", "--probes", "int8,int4", "--out", str(tmp_path / "loss.json")])
    print(f"lsaq measure peak RSS {peak / 2**30:.2f} GiB, float32 model {WIDE_PARAMS * 4 / 2**30:.2f} GiB")
    assert peak < MEASURE_FRACTION * WIDE_PARAMS * 4, \
        f"peak RSS {peak / 2**30:.2f} GiB, float32 model {WIDE_PARAMS * 4 / 2**30:.2f} GiB"
    record = LayerLoss.load(tmp_path / "loss.json")
    assert record.num_layers == 12 and record.cost["layer_loads"] == 12 and np.isfinite(record.loss).all()


def test_the_float_input_gptq_bank_is_gptq_of_the_float_activations():
    """``float_input_gptq`` (one walk) gives every layer GPTQ's codes from the Hessian of the float model's own
    inputs to it: here hooked on a whole forward pass."""
    from lsaq.precision import Precision
    from lsaq.quantization.gptq import HessianAccumulator, gptq_quantize
    from lsaq.quantization.sequential import float_input_gptq

    model = tiny_family_model("llama", layers=3)
    tokens = calibration(4, 12).tokens
    bank = float_input_gptq(decoder_parts(model), tokens, [(Precision.INT4, 16), (Precision.INT8, None)])
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n}
    acc = {n: HessianAccumulator(m.in_features) for n, m in linears.items()}
    hooks = [m.register_forward_pre_hook(lambda _m, a, n=n: acc[n].add(a[0])) for n, m in linears.items()]
    with torch.inference_mode():
        model(input_ids=tokens, use_cache=False)
    for h in hooks:
        h.remove()
    assert len(bank) == 3
    for name, module in linears.items():
        i, rel = int(name.split(".layers.")[1].split(".")[0]), name.split(".layers.")[1].split(".", 1)[1]
        for spec in [(Precision.INT4, 16), (Precision.INT8, None)]:
            want = gptq_quantize(module.weight, acc[name].hessian(), *spec, act_order=True)
            assert torch.equal(bank[i][spec][rel].dequantize(torch.float32), want.dequantize(torch.float32)), name


@pytest.mark.parametrize("stage", ["score", "measure", "calibrate"])
def test_generated_calibration_that_cannot_fit_is_refused_before_the_model_loads(stage, tmp_path, monkeypatch):
    import lsaq.models.loading as loading
    from lsaq.calibration.sets import calibrate
    from lsaq.engine.synthetic import char_tokenizer
    from lsaq.importance.stage import measure, score

    shard_checkpoint(tiny_family_model("llama", layers=2), tmp_path / "m")
    char_tokenizer().save_pretrained(tmp_path / "m")
    monkeypatch.setattr("lsaq.resources.available_memory", lambda: 1000)
    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("the whole model was loaded"))
    run = {"score": lambda: score(str(tmp_path / "m"), source="generated", samples=1, seq_len=8),
           "measure": lambda: measure(str(tmp_path / "m"), source="generated", samples=1, seq_len=8),
           "calibrate": lambda: calibrate(str(tmp_path / "m"), tmp_path / "calib", source="generated", samples=1,
                                          seq_len=8)}[stage]
    with pytest.raises(ValueError, match=r"calibration text generated by the model needs the whole model in memory: "
                                         r".* takes about .*, 1000 B is available here; give a calibration text"):
        run()
    assert not (tmp_path / "calib").exists()


# ------------------------------------------------------------------------------------------- --max-memory


def test_a_step_that_cannot_fit_max_memory_is_refused_before_any_layer_is_read(tmp_path, capsys, monkeypatch):
    """``--max-memory`` below one step of the walk: one line saying what the step needs and what would do, no
    layer read, nothing written (score, measure and quantize alike)."""
    from lsaq.cli import main
    from lsaq.engine.skeleton import Skeleton

    from lsaq.engine.synthetic import char_tokenizer

    shard_checkpoint(tiny_family_model("llama", layers=2), tmp_path / "m")
    char_tokenizer().save_pretrained(tmp_path / "m")
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 10)
    monkeypatch.setattr(Skeleton, "load", lambda *a: pytest.fail("a layer was read"))
    capsys.readouterr()
    for argv in (["score", "--method", "cosine"], ["measure"]):
        out = tmp_path / f"{argv[0]}.json"
        code = main([*argv, "--model", str(tmp_path / "m"), "--calib", str(text), "--samples", "2", "--seq-len",
                     "16", "--max-memory", "100MiB", "--out", str(out)])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and not out.exists(), err
        assert "--max-memory 100.00 MiB is less than one layer's step needs here: " in err
        assert "runtime 512.00 MiB" in err and "allow at least 5" in err
    assert main(["score", "--model", str(tmp_path / "m"), "--max-memory", "lots", "--out", str(tmp_path / "x")]) == 2
    assert "max memory: cannot read 'lots' as a size" in capsys.readouterr().err


def test_under_max_memory_the_branches_go_to_disk_and_measure_the_same(tmp_path):
    """A limit that leaves a few kB beyond one step: the probe branches' hidden states go to disk, the layer loss
    is the same to the bit as without a limit."""
    from lsaq.compute import cpu_compute, host_need
    from lsaq.engine.synthetic import char_tokenizer
    from lsaq.importance.stage import measure
    from lsaq.models.families import model_shape

    model = tiny_family_model("llama", layers=3)
    shard_checkpoint(model, tmp_path / "m")
    char_tokenizer().save_pretrained(tmp_path / "m")
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 10)
    kwargs = dict(source=str(text), samples=3, seq_len=12, batch_size=2, probes=("int8", "int4"))
    free = measure(str(tmp_path / "m"), **kwargs)
    need = host_need(model_shape(model.config.to_dict()), 2 * 12, 3 * 12, cpu_compute())
    limited = measure(str(tmp_path / "m"), max_memory=sum(need.values()) + 1000, **kwargs)
    assert limited.loss == free.loss and free.cost["hidden_bytes_on_disk"] == 0
    assert limited.cost["hidden_bytes_on_disk"] > 0
