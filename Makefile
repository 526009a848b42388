# poolscout: `make demo` (install + one acquisition cycle on a synthetic pool), `make test`.
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
	$(BIN)/poolscout synth $(DEMO)/pool --n 120 --size 128 --seed 0
	$(BIN)/poolscout init $(DEMO)/run --images $(DEMO)/pool/images --annotations $(DEMO)/pool/annotations.json \
	    --seed-fraction 0.25 --config configs/demo.yaml
	$(BIN)/poolscout cycle $(DEMO)/run --strategy entropy --budget 20
	@echo "selection: $(DEMO)/run/cycles/0/selection.parquet  export: $(DEMO)/run/cycles/0/export/"

test: install
	$(BIN)/python -m pytest -q -m "not slow and not gpu and not benchmark" --timeout 900

test-all: install
	$(BIN)/python -m pytest -q --timeout 3600

bench: install
	$(BIN)/python benchmarks/score_throughput.py

clean-demo:
	rm -rf $(DEMO)
