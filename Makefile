# poolscout: `make demo` (install + `poolscout demo`: random vs entropy on a synthetic pool), `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
DEMO   ?= .demo

.PHONY: install demo test test-all bench clean-demo

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

demo: install
	$(BIN)/poolscout demo --out $(DEMO)

test: install
	$(BIN)/python -m pytest -q -m "not slow and not gpu and not benchmark" --timeout 900

test-all: install
	$(BIN)/python -m pytest -q --timeout 3600

bench: install
	$(BIN)/python benchmarks/score_throughput.py
	$(BIN)/python benchmarks/label_efficiency.py --preset cpu-small
	$(BIN)/python benchmarks/preset_ablation.py

clean-demo:
	rm -rf $(DEMO)
