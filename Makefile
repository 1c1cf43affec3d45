PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
DEMO_STAMP := $(VENV)/.installed-demo
TEST_STAMP := $(VENV)/.installed-test

.PHONY: demo test lint bench mutants clean

$(PY):
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "need $(PYTHON) on PATH (set PYTHON=...)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# The demo needs the library and the examples' extras only (no torch, no onnx).
$(DEMO_STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q -e '.[examples]'
	touch $@

$(TEST_STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q -e '.[test]'
	touch $@ $(DEMO_STAMP)

demo: $(DEMO_STAMP)
	$(PY) examples/mnist_qat.py $(DEMO_ARGS)

test: $(TEST_STAMP)
	$(PY) -m pytest -n 2 --dist worksteal

lint: $(TEST_STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

# Curated mutation check (tools/mutants.toml): every listed bug must make its named tests fail.
# On demand only (tens of minutes on 2 cores); not part of `make test` / CI. MUTANTS_ARGS is
# passed on, e.g. MUTANTS_ARGS="--only ste-mask-dropped" or "--list".
mutants: $(TEST_STAMP)
	$(PY) tools/mutants.py $(MUTANTS_ARGS)

bench: $(TEST_STAMP)
	$(PY) -m pip install -q -e '.[bench]'
	$(PY) benchmarks/run_all.py $(if $(DATA_DIR),--data-dir $(DATA_DIR))

clean:
	rm -rf $(VENV) build *.egg-info
