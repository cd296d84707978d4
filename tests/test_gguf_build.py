"""GGUF builds: the byte model's per-tensor types and exact bytes, llama.cpp's quantizer through ctypes, and a
build of the real model that llama.cpp loads and runs like its dequantized reference."""

from __future__ import annotations

import builtins
import math

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, quants
from hypothesis import given, settings
from hypothesis import strategies as st

from lsaq.models.shapes import LinearShape, ModelShape, TensorShape
from lsaq.planning.ggml import (BLOCKS, GgmlType, GgufFormats, Int4Format, gguf_data_bytes, gguf_tensors, padded,
                                row_bytes, type_counts, weight_type)
from lsaq.planning.memory import WeightPolicy
from lsaq.precision import Precision

P = Precision
llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python (the llama extra) is not installed")
from lsaq.quantization import ggml_quant  # noqa: E402
from lsaq.quantization.ggml_quant import LlamaCppMissing, dequantize_rows, quantize_rows  # noqa: E402


def _shape(*, tied: bool, hidden: int = 576, inter: int = 1536, layers: int = 2, bias: bool = False) -> ModelShape:
    linears = (LinearShape("self_attn.q_proj", hidden, hidden, bias), LinearShape("mlp.down_proj", hidden, inter))
    return ModelShape(
        model_type="llama", num_layers=layers, hidden_size=hidden, num_heads=8, num_kv_heads=8,
        head_dim=hidden // 8, intermediate_size=inter, vocab_size=1000, tied=tied, layer_prefix="model.layers",
        layer_linears=linears, layer_norms=(TensorShape("input_layernorm.weight", (hidden,)),),
        embed=TensorShape("model.embed_tokens.weight", (1000, hidden)),
        lm_head=None if tied else TensorShape("lm_head.weight", (1000, hidden)),
        final_norms=(TensorShape("model.norm.weight", (hidden,)),))


# ------------------------------------------------------------------------------------------- the byte model


@pytest.mark.parametrize("precision, row, formats, expected", [
    ("fp16", 576, GgufFormats(), GgmlType.F16),
    ("fp16", 576, GgufFormats(float_type="bf16"), GgmlType.BF16),
    ("int8", 576, GgufFormats(), GgmlType.Q8_0),
    ("int4", 1536, GgufFormats(), GgmlType.Q4_K),  # 6 super-blocks of 256
    ("int4", 576, GgufFormats(), GgmlType.Q4_1),  # not a multiple of 256: blocks of 32 with a minimum
    ("int4", 1536, GgufFormats(int4="q4_1"), GgmlType.Q4_1),
    ("int4", 1536, GgufFormats(int4="q4_0"), GgmlType.Q4_0),
    ("int4", 1536, GgufFormats(int4="q5_k"), GgmlType.Q5_K),
    ("int4", 576, GgufFormats(int4="q5_k"), GgmlType.Q5_1),  # llama.cpp's own fallback
    ("int4", 1536, GgufFormats(int4="q3_k"), GgmlType.Q3_K),
    ("int4", 576, GgufFormats(int4="q3_k"), GgmlType.Q4_0),
    ("int8", 1536, GgufFormats(int8="q6_k"), GgmlType.Q6_K),
    ("int8", 576, GgufFormats(int8="q6_k"), GgmlType.Q8_0),  # llama.cpp's own fallback
    ("fp16", 1536, GgufFormats(int8="q6_k", int4="q3_k"), GgmlType.F16),
])
def test_weight_type(precision, row, formats, expected):
    assert weight_type(precision, row, formats) is expected


def test_weight_type_refuses_rows_no_block_divides():
    with pytest.raises(ValueError, match="rows of 100 values are not a multiple of 32"):
        weight_type("int8", 100, GgufFormats())
    assert weight_type("fp16", 100, GgufFormats()) is GgmlType.F16
    with pytest.raises(ValueError, match="'f32'"):
        GgufFormats(float_type="f32")
    with pytest.raises(ValueError, match="unknown INT4 GGUF format 'q2_k'; valid formats: q4_k, q4_1, q4_0, q5_k"):
        GgufFormats(int4="q2_k")
    with pytest.raises(ValueError, match="unknown INT8 GGUF format 'q5_k'; valid formats: q8_0, q6_k"):
        GgufFormats(int8="q5_k")


def test_formats_follow_the_source_dtype_and_round_trip():
    assert GgufFormats.for_source("bfloat16").float_type == "bf16"
    assert GgufFormats.for_source("float16").float_type == "f16"
    assert GgufFormats.for_source(None, "q4_0") == GgufFormats("f16", Int4Format.Q4_0)
    f = GgufFormats("bf16", Int4Format.Q4_1, "q6_k")
    assert GgufFormats.from_json(f.to_json()) == f


@pytest.mark.parametrize("t", list(GgmlType))
def test_row_bytes(t):
    """lsaq's table of ggml types is ggml's (names, numbers, block sizes), as the gguf package carries it."""
    from gguf import GGMLQuantizationType

    assert GGMLQuantizationType[t.name] == t and GGML_QUANT_SIZES[GGMLQuantizationType[t.name]] == BLOCKS[t]
    block, size = BLOCKS[t]
    assert row_bytes(t, 4 * 256) == 4 * 256 // block * size
    if block > 1:
        with pytest.raises(ValueError, match=f"cannot be stored as {t.name}"):
            row_bytes(t, block + block // 2)


def test_gguf_tensors_types_and_bytes():
    s = _shape(tied=False, bias=True)
    ts = gguf_tensors(s, [P.FP16, P.INT4], WeightPolicy(), GgufFormats())
    by = {t.name: t for t in ts}
    assert by["model.layers.0.self_attn.q_proj.weight"].type is GgmlType.F16
    assert by["model.layers.0.self_attn.q_proj.bias"].type is GgmlType.F32
    assert by["model.layers.1.self_attn.q_proj.weight"].type is GgmlType.Q4_1  # rows of 576: 2.25 x 256
    assert by["model.layers.1.self_attn.q_proj.weight"].nbytes == 576 * 576 // 32 * 20
    assert by["model.layers.1.mlp.down_proj.weight"].type is GgmlType.Q4_K
    assert by["model.layers.1.mlp.down_proj.weight"].nbytes == 576 * 1536 // 256 * 144
    assert by["model.layers.1.input_layernorm.weight"].nbytes == 576 * 4
    assert by["lm_head.weight"].type is GgmlType.F16 and by["model.embed_tokens.weight"].type is GgmlType.F16
    assert type_counts([t.type.name for t in ts]) == {"F16": 4, "F32": 5, "Q4_1": 1, "Q4_K": 1}
    assert gguf_data_bytes(ts) == sum(padded(t.nbytes) for t in ts) >= sum(t.nbytes for t in ts)
    with pytest.raises(ValueError, match="1 precisions given for a model with 2 layers"):
        gguf_tensors(s, [P.FP16], WeightPolicy(), GgufFormats())


def test_tied_head_is_stored_only_for_another_precision():
    s = _shape(tied=True)
    names = [t.name for t in gguf_tensors(s, [P.INT8, P.INT8], WeightPolicy(embed="int8"), GgufFormats())]
    assert "lm_head.weight" not in names  # llama.cpp multiplies by token_embd, whatever its type
    ts = gguf_tensors(s, [P.INT8, P.INT8], WeightPolicy(embed="int8", head="fp16"), GgufFormats())
    by = {t.name: t for t in ts}
    assert by["model.embed_tokens.weight"].type is GgmlType.Q8_0 and by["lm_head.weight"].type is GgmlType.F16


# ------------------------------------------------------------------------------------ llama.cpp's quantizer


@pytest.mark.parametrize("t", [GgmlType.Q8_0, GgmlType.Q4_0, GgmlType.Q4_1, GgmlType.Q5_1, GgmlType.BF16])
def test_quantizer_matches_the_gguf_package(t):
    """The gguf package's numpy quantizers are an independent implementation of the same formats."""
    x = np.random.default_rng(1).standard_normal((37, 256)).astype(np.float32)
    assert np.array_equal(quantize_rows(x, t), quants.quantize(x, t))


@pytest.mark.parametrize("t, rmse", [(GgmlType.Q8_0, 0.006), (GgmlType.Q6_K, 0.02), (GgmlType.Q5_K, 0.04),
                                     (GgmlType.Q5_1, 0.045), (GgmlType.Q4_K, 0.075), (GgmlType.Q4_1, 0.085),
                                     (GgmlType.Q4_0, 0.09), (GgmlType.Q3_K, 0.17)])
def test_quantizer_error_per_type(t, rmse):
    """Standard normal rows: each type's error is what its bits allow (Q8_0 ~ 1/250 of a block's range; Q4_K,
    searched, below Q4_1 and Q4_0 at 4.5 bits), and the bytes are the byte model's."""
    x = np.random.default_rng(2).standard_normal((64, 512)).astype(np.float32)
    q = quantize_rows(x, t, threads=2)
    assert q.shape == (64, row_bytes(t, 512))
    err = math.sqrt(float(((dequantize_rows(q, t, 512) - x) ** 2).mean()))
    assert rmse / 2 < err < rmse


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 4), st.integers(1, 3), st.integers(-20, 4), st.data())
def test_q8_0_and_16_bit_round_trips_are_exact(rows, blocks, exponent, data):
    """Values on a block's Q8_0 grid (``k * d``, |k| <= 127, one k = +-127 so d = max/127; d a power of two, which
    fp16 holds) come back exactly; so do fp16 / bf16 values through F16 / BF16, and any float32 through F32."""
    n = 32 * blocks
    k = np.array(data.draw(st.lists(st.integers(-127, 127), min_size=rows * n, max_size=rows * n)), np.float32)
    k = k.reshape(rows, n // 32, 32)
    k[:, :, 0] = 127
    x = (k * np.float32(2.0 ** exponent)).reshape(rows, n)
    assert np.array_equal(dequantize_rows(quantize_rows(x, GgmlType.Q8_0), GgmlType.Q8_0, n), x)
    for t, dtype in ((GgmlType.F16, torch.float16), (GgmlType.BF16, torch.bfloat16), (GgmlType.F32, torch.float32)):
        v = torch.from_numpy(x / 3).to(dtype).float().numpy()
        assert np.array_equal(dequantize_rows(quantize_rows(v, t), t, n), v)


def test_quantizer_missing_names_the_extra(monkeypatch):
    real_import = builtins.__import__

    def no_llama(name, *args, **kwargs):
        if name == "llama_cpp":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    ggml_quant._quantize_chunk.cache_clear()
    monkeypatch.setattr(builtins, "__import__", no_llama)
    try:
        with pytest.raises(LlamaCppMissing, match=r"pip install 'lsaq\[llama\]'"):
            quantize_rows(np.zeros((1, 32), np.float32), GgmlType.Q8_0)
    finally:
        ggml_quant._quantize_chunk.cache_clear()


# ------------------------------------------------------------------------------------------ the real model

PROMPT_TEXT = "The capital of France is"
PASSAGE = (b"The tower is 324 metres (1,063 ft) tall, about the same height as an 81-storey building, and the tallest "
           b"structure in Paris. Its base is square, measuring 125 metres on each side.")


def llama_cpp_run(path, new_tokens: int):
    """llama.cpp on the GGUF file ``path``: PASSAGE's tokens and their logits ``[tokens, vocab]``, then greedy text
    after PROMPT_TEXT, its token ids and the prompt's ids ``[1, n]``."""
    from llama_cpp import Llama

    llm = Llama(str(path), n_ctx=256, logits_all=True, verbose=False, n_threads=2)
    try:
        tokens = llm.tokenize(PASSAGE, add_bos=False)
        llm.eval(tokens)
        logits = torch.from_numpy(np.array(llm.scores[:len(tokens)]))
        llm.reset()
        greedy = llm.create_completion(PROMPT_TEXT, max_tokens=new_tokens, temperature=0)["choices"][0]["text"]
        prompt = torch.tensor([llm.tokenize(PROMPT_TEXT.encode(), add_bos=False)])
        return tokens, logits, greedy, llm.tokenize(greedy.encode(), add_bos=False), prompt
    finally:
        llm.close()


def assert_close_logits(ref: torch.Tensor, ours: torch.Tensor) -> None:
    """Mean KL(ref || ours) under three times the measured 0.0033, top-1 agreement at least 0.9."""
    log_ref, log_ours = ref.log_softmax(-1), ours.log_softmax(-1)
    assert (log_ref.exp() * (log_ref - log_ours)).sum(-1).mean() < 0.01
    assert (ref.argmax(-1) == ours.argmax(-1)).float().mean() >= 0.9


@pytest.fixture(scope="module")
def mixed_gguf(shared_gguf, tmp_path_factory):
    """The shared model as a GGUF build: 5 fp16, 10 int8 and 15 int4 layers (Q4_K where rows allow, else Q4_1)."""
    from lsaq.models.families import model_shape
    from lsaq.models.loading import locate_model
    from lsaq.quantization.gguf_build import write_gguf

    shape = model_shape(locate_model(shared_gguf).config)
    precisions = [P.FP16] * 5 + [P.INT8] * 10 + [P.INT4] * 15
    out = tmp_path_factory.mktemp("gguf") / "model.gguf"
    built = write_gguf(shared_gguf, shape, precisions, WeightPolicy(), GgufFormats(), out)
    return built, shape, precisions


@pytest.mark.model
def test_build_holds_the_planned_types_and_bytes(mixed_gguf):
    from lsaq.quantization.gguf_build import gguf_metadata, llama_names, read_gguf_types

    built, shape, precisions = mixed_gguf
    planned = gguf_tensors(shape, precisions, WeightPolicy(), GgufFormats())
    assert built.data_bytes == gguf_data_bytes(planned)
    assert built.file_bytes == built.path.stat().st_size == built.data_bytes + built.header_bytes
    names = llama_names(shape, "llama")
    assert read_gguf_types(built.path) == {names[t.name]: t.type.name for t in planned}
    assert built.types == {"F16": 36, "F32": 61, "Q4_1": 90, "Q4_K": 15, "Q8_0": 70} and built.copied == ()
    meta = gguf_metadata(built.path, ["lsaq.precisions", "tokenizer.ggml.model", "tokenizer.ggml.pre",
                                      "general.file_type", "llama.block_count"])
    assert meta["lsaq.precisions"] == [p.value for p in precisions]
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "smollm"
    assert meta["llama.block_count"] == 30
    assert sorted(p.name for p in built.path.parent.iterdir()) == ["model.gguf"]  # no temporary beside it


@pytest.mark.model
def test_llama_cpp_runs_the_build_like_its_dequantized_reference(mixed_gguf):
    """llama.cpp multiplies F16 weights with activations rounded to fp16 and quantized weights with activations
    quantized to 8 bits per block (2^-8 of a block's range), through 30 layers; the reference is the same file
    dequantized into transformers in float32. Measured here: mean KL 0.0033, top-1 agreement 52 of 54 positions,
    the largest logit difference 1.3 of logits up to 35; the bounds are three times the KL, and 0.9."""
    from transformers import AutoModelForCausalLM

    built = mixed_gguf[0]
    tokens, ours, greedy, greedy_ids, prompt = llama_cpp_run(built.path, 6)
    ref_model = AutoModelForCausalLM.from_pretrained(built.path.parent, gguf_file=built.path.name,
                                                     dtype=torch.float32)
    with torch.no_grad():
        ref = ref_model(torch.tensor([tokens])).logits[0]
        ref_ids = ref_model.generate(prompt, max_new_tokens=6, do_sample=False)[0, prompt.shape[1]:]
    assert_close_logits(ref, ours)
    assert greedy.startswith(" Paris")
    assert greedy_ids[:3] == ref_ids[:3].tolist()


@pytest.fixture(scope="module")
def coded_gguf(mixed_artifact, shared_gguf, tmp_path_factory):
    """The codes of ``mixed_artifact`` (FP16, INT8, INT4 per channel cycling) kept in a GGUF build: Q8_0, Q4_0."""
    from lsaq.quantization.gguf_build import write_gguf
    from lsaq.quantization.reader import ArtifactCodes

    path, plan = mixed_artifact
    codes = ArtifactCodes(path)
    out = tmp_path_factory.mktemp("coded") / "model.gguf"
    return write_gguf(shared_gguf, plan.shape, plan.precisions, plan.options.policy, GgufFormats(int4="q4_0"), out,
                      codes), codes


@pytest.mark.model
def test_gguf_keeps_the_artifacts_codes_exactly(coded_gguf, mixed_artifact):
    """Every quantized linear reads back (the gguf package's dequantizer, q/k rows put back in transformers' order by
    transformers' own GGUF loader) as exactly the values lsaq's artifact holds."""
    from gguf import GGUFReader, dequantize
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    from lsaq.quantization.gguf_build import llama_names

    built, codes = coded_gguf
    shape = mixed_artifact[1].shape
    assert built.types == {"F16": 71, "F32": 61, "Q4_0": 70, "Q8_0": 70}
    names = llama_names(shape, "llama")
    tensors = {t.name: t for t in GGUFReader(built.path).tensors}
    undo = LlamaTensorProcessor(config={"num_attention_heads": shape.num_heads, "num_key_value_heads":
                                        shape.num_kv_heads})
    assert len(codes.modules) == 20 * len(shape.layer_linears)
    for weight in codes.modules:
        t = tensors[names[weight]]
        values = undo.process(dequantize(t.data, t.tensor_type), t.name).weights
        np.testing.assert_array_equal(values, codes(weight).dequantize().numpy(), err_msg=weight)


@pytest.mark.model
def test_llama_cpp_runs_the_codes_like_lsaqs_runtime(coded_gguf, mixed_artifact):
    """The coded GGUF in llama.cpp against the same artifact on lsaq's packed runtime in float32: llama.cpp rounds
    activations (fp16, 8 bits per block), so the bounds are those of the dequantized-reference test."""
    from lsaq.quantization.reader import load_quantized

    tokens, ours, greedy, _, _ = llama_cpp_run(coded_gguf[0].path, 4)
    ref_model = load_quantized(mixed_artifact[0], dtype=torch.float32).model
    with torch.no_grad():
        ref = ref_model(torch.tensor([tokens])).logits[0].float()
    assert_close_logits(ref, ours)
    assert greedy.startswith(" Paris")


# ------------------------------------------------------------------------------------ the quantize stage


@pytest.fixture(scope="module")
def gguf_plan(shared_gguf):
    """A llama.cpp plan of the shared model (identity from its structure) with layers cycling FP16, INT8, INT4."""
    import dataclasses

    from lsaq.models.families import model_shape
    from lsaq.models.identity import ModelRef
    from lsaq.models.loading import empty_model, locate_model, model_info
    from lsaq.planning.devices import budget_profile
    from lsaq.planning.planner import PlanOptions, make_plan

    located = locate_model(shared_gguf)
    info = model_info(located, empty_model(located.load_dir))
    shape = model_shape(located.config)
    base = make_plan(shape, [1.0] * shape.num_layers, budget_profile("1GiB"),
                     PlanOptions(context=512, runtime="llama.cpp"), model=ModelRef.from_info(info))
    mix = (P.FP16, P.INT8, P.INT4)
    return dataclasses.replace(base, precisions=tuple(mix[i % 3] for i in range(shape.num_layers)))


@pytest.mark.model
def test_quantize_writes_a_gguf_build(gguf_plan, tmp_path):
    from lsaq.quantization.gguf_runtime import generate_gguf, gguf_build
    from lsaq.quantization.record import Artifact
    from lsaq.quantization.stage import quantize
    from lsaq.quantization.verify import ArtifactError, verify_artifact

    art = quantize(gguf_plan, tmp_path / "build")
    assert art.gguf and art.runtimes == ("llama.cpp",) and art.dtype == "float16"  # a GGUF source: F16
    assert art.tensor_bytes == art.predicted_tensor_bytes == gguf_plan.breakdown.weights
    assert sorted(art.files) == ["Modelfile", "lsaq_plan.json", "model.gguf"]
    assert art == Artifact.load(tmp_path / "build") and verify_artifact(tmp_path / "build")["format"] == "gguf"
    assert (tmp_path / "build" / "Modelfile").read_text().splitlines()[1:] == [
        "FROM ./model.gguf", "PARAMETER num_ctx 512", "PARAMETER num_batch 128"]
    assert art.memory is not None and art.memory.peak_host_bytes > 0
    assert gguf_build(tmp_path / "build")[1] == gguf_plan
    gen = generate_gguf(tmp_path / "build", "The capital of France is", 4)
    assert gen.text.startswith(" Paris") and gen.tokens == 4 and gen.peak_rss_bytes > 0
    with open(tmp_path / "build" / "model.gguf", "r+b") as f:
        f.truncate(art.files["model.gguf"][0] - 100)
    with pytest.raises(ArtifactError, match="model.gguf: size .* differs from the recorded"):
        gguf_build(tmp_path / "build")


@pytest.mark.model
def test_k_quant_levels_build_as_planned(gguf_plan, tmp_path):
    """INT8 as Q6_K and INT4 as Q5_K: rows of 576 fall back as llama.cpp's own converter does (Q8_0, Q5_1)."""
    import dataclasses

    from lsaq.quantization.gguf_build import read_gguf_types
    from lsaq.quantization.gguf_runtime import generate_gguf
    from lsaq.quantization.stage import quantize

    plan = dataclasses.replace(gguf_plan, options=dataclasses.replace(gguf_plan.options, gguf_int8="q6_k",
                                                                      gguf_int4="q5_k"))
    art = quantize(plan, tmp_path / "build")
    assert art.tensor_bytes == art.predicted_tensor_bytes == plan.breakdown.weights
    ours, theirs = plan.breakdown.layers, gguf_plan.breakdown.layers  # layers cycle FP16, INT8, INT4
    assert ours[0] == theirs[0] and ours[1] < theirs[1] and ours[2] > theirs[2]
    types = read_gguf_types(tmp_path / "build" / "model.gguf")
    assert types["blk.1.ffn_down.weight"] == "Q6_K" and types["blk.1.ffn_up.weight"] == "Q8_0"  # rows of 1536, 576
    assert types["blk.2.ffn_down.weight"] == "Q5_K" and types["blk.2.attn_q.weight"] == "Q5_1"
    assert generate_gguf(tmp_path / "build", PROMPT_TEXT, 3).text.startswith(" Paris")


@pytest.mark.model
def test_gptq_codes_go_into_a_gguf_build(gguf_plan, shared_gguf, wiki_valid, tmp_path):
    """GPTQ through the quantize stage for a llama.cpp plan with INT4 as Q4_1: the codes of a compressed-tensors
    build of the same precisions (INT4 in groups of 32), made beside it and removed."""
    import dataclasses

    from lsaq.calibration.sets import calibrate, load_calibration_dir
    from lsaq.quantization.gguf_build import read_gguf_types
    from lsaq.quantization.gguf_runtime import generate_gguf
    from lsaq.quantization.stage import quantize

    n = gguf_plan.shape.num_layers
    plan = dataclasses.replace(gguf_plan, options=dataclasses.replace(gguf_plan.options, gguf_int4="q4_1"),
                               precisions=(P.INT4,) * 3 + (P.INT8,) * 2 + (P.FP16,) * (n - 5))
    calibrate(str(shared_gguf), tmp_path / "calib", source=str(wiki_valid), samples=4, seq_len=64)
    art = quantize(plan, tmp_path / "build", quantizer="gptq", calibration=tmp_path / "calib")
    assert art.gguf and art.quantizer == "gptq" and art.calibration == load_calibration_dir(tmp_path / "calib").hash
    assert art.tensor_bytes == art.predicted_tensor_bytes == plan.breakdown.weights
    types = read_gguf_types(tmp_path / "build" / "model.gguf")
    assert sum(t == "Q4_1" for t in types.values()) == 3 * 7 and sum(t == "Q8_0" for t in types.values()) == 2 * 7
    assert sorted(p.name for p in tmp_path.iterdir()) == ["build", "calib"]  # the codes' build is gone
    assert generate_gguf(tmp_path / "build", PROMPT_TEXT, 3).text.startswith(" Paris")


@pytest.mark.model
def test_quantize_refuses_what_gguf_builds_cannot_take(gguf_plan, shared_gguf, tmp_path):
    import dataclasses

    from lsaq.quantization.stage import quantize

    with pytest.raises(ValueError, match="'gptq' needs a calibration directory"):
        quantize(gguf_plan, tmp_path / "a", quantizer="gptq")
    with pytest.raises(ValueError, match="quantizer 'gptq' cannot make a GGUF build with INT4 as q4_k .* use "
                                         "--gguf-int4 q4_0 .* or q4_1"):
        quantize(gguf_plan, tmp_path / "a", quantizer="gptq", calibration=tmp_path)
    q6 = dataclasses.replace(gguf_plan, options=dataclasses.replace(gguf_plan.options, gguf_int4="q4_0",
                                                                     gguf_int8="q6_k"))
    with pytest.raises(ValueError, match="quantizer 'gptq' cannot make a GGUF build with INT8 as q6_k"):
        quantize(q6, tmp_path / "a", quantizer="gptq", calibration=tmp_path)
    other = dataclasses.replace(gguf_plan, model=dataclasses.replace(gguf_plan.model, content_hash="0" * 64))
    with pytest.raises(ValueError, match="plan was made for model .* with content hash 0000"):
        quantize(other, tmp_path / "b", model=str(shared_gguf))
    assert not any(tmp_path.iterdir())  # refused before anything was written


def test_a_safetensors_source_needs_llama_cpps_converter(tmp_path, monkeypatch):
    from lsaq.models.hf_gguf import converter
    from lsaq.quantization.gguf_build import check_gguf_source

    assert converter().name == "convert_hf_to_gguf.py"  # the set-up's copy (make setup)
    check_gguf_source(tmp_path / "hf", "rtn")
    check_gguf_source(tmp_path / "m.gguf", "RTN")
    monkeypatch.setenv("LSAQ_LLAMA_CONVERT", str(tmp_path / "nowhere.py"))
    with pytest.raises(ValueError, match=r"a GGUF build of a safetensors checkpoint needs llama.cpp's "
                                         r"convert_hf_to_gguf.py \(\$LSAQ_LLAMA_CONVERT names .*nowhere.py, which is "
                                         r"not a file\): `make setup` unpacks it"):
        check_gguf_source(tmp_path / "hf", "rtn")
    check_gguf_source(tmp_path / "m.gguf", "rtn")  # a GGUF source needs no converter


# ------------------------------------------------------------------------------------------ evaluation


@pytest.fixture(scope="module")
def gguf_build_dir(gguf_plan, tmp_path_factory):
    from lsaq.quantization.stage import quantize

    return quantize(gguf_plan, tmp_path_factory.mktemp("gguf-build") / "build").path


@pytest.mark.model
def test_a_safetensors_checkpoint_builds_the_same_gguf(gguf_build_dir, gguf_plan, shared_gguf, tmp_path,
                                                       monkeypatch):
    """The shared model's float safetensors copy, converted by llama.cpp's converter (F32: its exact values), builds
    tensor for tensor the bytes its GGUF source builds, with the vocabulary and pre-tokenizer llama.cpp knows it by."""
    import dataclasses

    from gguf import GGUFReader

    from lsaq.models.identity import ModelRef
    from lsaq.models.loading import empty_model, locate_model, model_info
    from lsaq.quantization.gguf_build import gguf_metadata
    from lsaq.quantization.gguf_runtime import generate_gguf
    from lsaq.quantization.stage import quantize

    hf = locate_model(locate_model(shared_gguf).load_dir)
    monkeypatch.setenv("LSAQ_CACHE", str(tmp_path / "cache"))  # the conversion lands here, not in the user's cache
    assert hf.path.suffix != ".gguf" and (hf.path / "model.safetensors").is_file()
    plan = dataclasses.replace(gguf_plan, model=ModelRef.from_info(model_info(hf, empty_model(hf.load_dir))))
    art = quantize(plan, tmp_path / "build", model=str(hf.path))
    assert art.tensor_bytes == art.predicted_tensor_bytes == plan.breakdown.weights
    assert [p.name for p in (tmp_path / "cache" / "hf-gguf").iterdir()] == [f"{hf.content_hash[:24]}-f32.gguf"]
    ours = {t.name: t for t in GGUFReader(tmp_path / "build" / "model.gguf").tensors}
    theirs = {t.name: t for t in GGUFReader(gguf_build_dir / "model.gguf").tensors}
    assert sorted(ours) == sorted(theirs)
    for name, t in theirs.items():
        assert ours[name].tensor_type == t.tensor_type and np.array_equal(ours[name].data, t.data), name
    keys = ["tokenizer.ggml.pre", "tokenizer.ggml.model", "tokenizer.ggml.tokens", "tokenizer.chat_template"]
    assert gguf_metadata(tmp_path / "build" / "model.gguf", keys) == gguf_metadata(shared_gguf, keys)
    assert generate_gguf(tmp_path / "build", PROMPT_TEXT, 3).text.startswith(" Paris")


@pytest.mark.model
def test_evaluation_runs_the_build_in_llama_cpp(gguf_build_dir, gguf_plan, shared_gguf, wiki_valid):
    """Fidelity and perplexity from llama.cpp's logits on the float model's windows; the build's resident memory
    while generating (a fresh process) against the plan's run-time prediction: measured 92% of it here."""
    from lsaq.eval.options import EvalOptions
    from lsaq.eval.stage import evaluate

    options = EvalOptions(ppl=True, ppl_source=str(wiki_valid), seq_len=256, max_windows=2, fidelity_windows=2)
    report = evaluate(gguf_build_dir, options=options, baseline=str(shared_gguf))
    fid = report.fidelity
    assert fid.windows == 2 and fid.seq_len == 256 and fid.positions == 512
    assert fid.kl_mean < 0.05 and fid.top1_agreement > 0.85  # a third of the layers Q4_K/Q4_1
    base, quant = report.baseline["perplexity"], report.quantized["perplexity"]
    assert base["tokens"] == quant["tokens"] == 2 * 255 and base["ppl"] < quant["ppl"] < 1.2 * base["ppl"]
    art = report.artifact
    assert art["format"] == "gguf" and art["runtime"] == "llama.cpp"
    gen = art["generation"]
    assert gen["predicted_bytes"] == gguf_plan.breakdown.required and gen["context"] == 512 and gen["tokens"] > 0
    assert 0.6 * gen["predicted_bytes"] < gen["peak_rss_bytes"] <= gen["predicted_bytes"]  # the memory model
    assert gen["fits"] and gen["usable_bytes"] == gguf_plan.device.usable


@pytest.mark.model
def test_evaluation_fails_a_build_its_device_cannot_hold(gguf_plan, shared_gguf, tmp_path):
    import dataclasses

    from lsaq.eval.options import EvalOptions
    from lsaq.eval.stage import evaluate
    from lsaq.planning.devices import budget_profile
    from lsaq.quantization.stage import quantize

    small = dataclasses.replace(gguf_plan, device=budget_profile("120MiB"))  # the weights alone take 150 MiB
    quantize(small, tmp_path / "build")
    with pytest.raises(ValueError, match=r"llama.cpp took .* resident while generating at context 512, more than "
                                         r"the 120.00 MiB usable on budget"):
        evaluate(tmp_path / "build", options=EvalOptions(fidelity_windows=1), baseline=str(shared_gguf))
    with pytest.raises(ValueError, match="zero-shot tasks run on torch models; .* is a GGUF build"):
        evaluate(tmp_path / "build", options=EvalOptions(tasks="piqa"), baseline=str(shared_gguf))
