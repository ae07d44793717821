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

# The report test renders the HTML in headless Chromium; as root, install it if it is missing (best effort).
test: $(STAMP)
	@if [ "$$(id -u)" = 0 ]; then command -v chromium >/dev/null || ( (apt-get update -qq && apt-get install -y -qq chromium) || echo "chromium could not be installed; the report rendering test will be skipped"); fi
	$(BIN)/python -m pytest -m "not slow" -q

test-all: $(STAMP)
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs .pytest_cache
