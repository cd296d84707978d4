# Two entry points; both set up .venv on a fresh machine first.
#   make run   - set up, then run the main job on the embedded defaults
#   make test  - set up, then run the test suite (make test-quick: all but the slow end-to-end tests)
PY      := .venv/bin/python
STAMP   := .venv/.installed
OUT     ?= out

.PHONY: setup run test test-quick bench infra-check clean

# llama.cpp (GGUF builds) is compiled by pip from llama-cpp-python's sdist: about 3.5 min on 2 cores with only the
# library. No -march=native (a library built on an AVX-512 machine dies with "Illegal instruction" on another CPU of
# the same image): AVX2/FMA/F16C when this CPU has them, else the x86-64 baseline. --no-cache-dir: pip caches a
# built wheel by version, not by these flags.
LLAMA_SIMD := $(shell grep -qw avx2 /proc/cpuinfo 2>/dev/null && grep -qw fma /proc/cpuinfo && \
	grep -qw f16c /proc/cpuinfo && echo -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON)
LLAMA_CMAKE_ARGS := -DGGML_NATIVE=OFF $(LLAMA_SIMD) -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
	-DLLAMA_BUILD_SERVER=OFF -DLLAVA_BUILD=OFF -DLLAMA_CURL=OFF

# llama.cpp's converter of Hugging Face checkpoints (convert_hf_to_gguf.py, its conversion package and gguf-py) comes
# from the same sdist as the library: unpacked into $(LLAMA_SHARE), where lsaq looks for it (lsaq/models/hf_gguf.py).
SDIST       := .venv/sdist
LLAMA_SHARE := .venv/share/llama.cpp

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv .venv
	rm -rf $(SDIST) $(LLAMA_SHARE)
	$(PY) -m pip download -q --no-deps --no-binary llama-cpp-python -c constraints.txt -d $(SDIST) llama-cpp-python
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PY) -m pip install -q --no-cache-dir -c constraints.txt $(SDIST)/*.tar.gz
	mkdir -p $(LLAMA_SHARE)
	tar -xzf $(SDIST)/*.tar.gz -C $(LLAMA_SHARE) --strip-components=3 --wildcards \
		'*/vendor/llama.cpp/convert_hf_to_gguf.py' '*/vendor/llama.cpp/conversion/*' '*/vendor/llama.cpp/gguf-py/gguf/*'
	rm -rf $(SDIST)
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PY) -m pip install -q -c constraints.txt -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

# The main job on the embedded defaults: the Prefect build flow (Prefect's local API, a store under $(OUT)/store)
# builds the default model for two single-board computers whose plans differ: one calibration and importance run,
# then per device plan, quantize, evaluate (fidelity to the float model) and publish. It prints where each build
# is; run again, every task is Cached. Then one build is downloaded (verified) and generates text on lsaq's packed
# runtime. Needs nothing but PyPI: without a local corpus or the hub, calibration runs on text the model generates.
PREFECT_ENV = PREFECT_HOME=$(abspath $(OUT))/prefect PREFECT_SERVER_ANALYTICS_ENABLED=false
# The demo's cheaper settings: the cosine ranking and round to nearest take minutes on a CPU; the production
# defaults (strategy measured, GPTQ, INT4 format by measured loss: the README's study) take about an hour here.
DEMO = --strategy lsaq --method cosine --quantizer rtn

run: $(STAMP)
	mkdir -p $(OUT)
	$(PREFECT_ENV) .venv/bin/lsaq-build --device beaglebone-black --device rpi-zero-2w $(DEMO) --out $(OUT)
	.venv/bin/lsaq download --store $(OUT)/store --model default --device rpi-zero-2w --to $(OUT)/rpi-zero-2w --force
	.venv/bin/lsaq generate $(OUT)/rpi-zero-2w --prompt "The capital of France is" --max-new-tokens 24

test: $(STAMP)
	$(PY) -m pytest -q

# The day-to-day loop: everything but the tests marked slow (make run from a fresh output folder, the Prefect
# server end to end, the pipeline flows); CI runs the full `make test`.
test-quick: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

bench: $(STAMP)
	$(PY) benchmarks/bench_pipeline.py
	$(PY) benchmarks/bench_importance.py
	$(PY) benchmarks/bench_runtime.py
	$(PY) benchmarks/bench_additivity.py

# Offline checks of infra/ (hadolint, compose spec, work-pool templates rendered by Prefect's workers).
infra-check:
	bash infra/validate.sh

clean:
	rm -rf .venv $(OUT) .pytest_cache
