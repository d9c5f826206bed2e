# The two set-up commands work on a fresh machine with nothing but Python and pip.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench install clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/vlmtune demo

# Two test processes: most of the suite's time is the Triton interpreter and subprocess start-up, single-threaded.
test: $(STAMP)
	TRITON_INTERPRET=1 $(BIN)/python -m pytest -q -n 2

lint: $(STAMP)
	$(BIN)/ruff format --check vlmtune tests recipes examples benchmarks
	$(BIN)/ruff check vlmtune tests recipes examples benchmarks

bench: $(STAMP)
	$(BIN)/python -m benchmarks.train_step --model qwen2_5_vl-7b --shape fixed

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
