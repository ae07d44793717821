# `make demo` and `make test` set everything up on a fresh machine: they create .venv,
# install the package with the CPU build of torch, then run.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
RUN_DIR ?= runs/demo

.PHONY: install demo test test-all clean

$(STAMP): pyproject.toml requirements/cpu.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c requirements/cpu.txt torch
	$(BIN)/pip install --quiet -c requirements/cpu.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/trainer fit --config configs/pretrained.toml --out $(RUN_DIR) --overwrite
	$(BIN)/diagnose collapse $(RUN_DIR)/checkpoints/last.pt

test: $(STAMP)
	$(BIN)/python -m pytest -m "not slow" -q

test-all: $(STAMP)
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs .pytest_cache
