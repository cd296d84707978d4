# Two entry points; both set up .venv on a fresh machine first.
#   make run   - set up, then run the main job on the embedded defaults
#   make test  - set up, then run the test suite
PY      := .venv/bin/python
STAMP   := .venv/.installed
OUT     ?= out

.PHONY: setup run test bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q -c constraints.txt -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

# The main job on the embedded defaults: score the default model, plan it for a small memory budget,
# quantize it into an artifact and generate from that artifact on the packed runtime.
run: $(STAMP)
	mkdir -p $(OUT)
	.venv/bin/lsaq score --out $(OUT)/importance.json
	.venv/bin/lsaq plan --importance $(OUT)/importance.json --budget 200MiB --context 512 --out $(OUT)/plan.json
	.venv/bin/lsaq quantize --plan $(OUT)/plan.json --out $(OUT)/artifact
	.venv/bin/lsaq generate $(OUT)/artifact --prompt "The capital of France is" --max-new-tokens 24

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) benchmarks/bench_importance.py
	$(PY) benchmarks/bench_runtime.py

clean:
	rm -rf .venv $(OUT) .pytest_cache
