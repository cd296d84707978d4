# Two entry points; both set up .venv on a fresh machine first.
#   make run   - set up, then run the main job on the embedded defaults
#   make test  - set up, then run the test suite
PY      := .venv/bin/python
STAMP   := .venv/.installed
OUT     ?= out

.PHONY: setup run test bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

run: $(STAMP)
	mkdir -p $(OUT)
	.venv/bin/lsaq score --method jaccard --out $(OUT)/importance.json

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) benchmarks/bench_importance.py

clean:
	rm -rf .venv $(OUT) .pytest_cache
