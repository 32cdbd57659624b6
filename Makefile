# All set-up lives here: `make demo` and `make test` work on a fresh machine.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-test
BENCH_STAMP := $(VENV)/.installed-bench
export XLA_PYTHON_CLIENT_PREALLOCATE := false

.PHONY: install install-bench demo test test-all test-fast test-slow bench fixtures clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

install-bench: $(BENCH_STAMP)

$(BENCH_STAMP): $(STAMP)
	$(BIN)/python -m pip install -q -e '.[test,bench]'
	touch $@

demo: install
	$(BIN)/python -m tokax.run --config configs/demo.py

# Fast suite first (no real model), then the `slow` real-model tests, which
# include the live comparison against HF transformers (hence install-bench). Each run lists
# its slowest tests, so CI's log shows where its time goes.
test: install install-bench
	$(BIN)/python -m pytest -q --durations=25 -m "not slow" tests
	$(BIN)/python -m pytest -q --durations=25 -m slow tests

# Everything `make test` runs, plus the real-model checks it leaves to cheaper equivalents to
# keep CI within its time (every speculative method on Gemma, not one of each kind).
test-all: export TOKAX_TEST_ALL := 1
test-all: test

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow" tests

bench: install install-bench
	$(BIN)/python benchmarks/decode_speed.py

clean:
	rm -rf $(VENV) build *.egg-info
