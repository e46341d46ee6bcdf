# The two commands a newcomer runs: `make demo` and `make test` (see README.md).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEMO_OUT ?= out/demo
DEMO_EPOCHS ?= 3

.PHONY: demo test test-fast clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

demo: $(VENV)/.installed
	rm -rf $(DEMO_OUT)
	$(BIN)/lungray ingest lungray/samples/kermany-mini $(DEMO_OUT)/ingested --dataset kermany --throwaway-salt
	$(BIN)/lungray train --model cnn --data $(DEMO_OUT)/ingested --output $(DEMO_OUT)/models/cnn --epochs $(DEMO_EPOCHS)
	$(BIN)/lungray train --model cnn_lstm --data $(DEMO_OUT)/ingested --output $(DEMO_OUT)/models/cnn_lstm --epochs $(DEMO_EPOCHS)
	$(BIN)/lungray compare $(DEMO_OUT)/models/cnn $(DEMO_OUT)/models/cnn_lstm --data $(DEMO_OUT)/ingested --output $(DEMO_OUT)/report --n-boot 200
	$(BIN)/lungray screen --model $(DEMO_OUT)/models/cnn_lstm --input lungray/samples --output $(DEMO_OUT)/screen --explain --throwaway-salt
	@echo
	@echo "ingested dataset:  $(DEMO_OUT)/ingested (summary.json, data/, errors.parquet)"
	@echo "model directories: $(DEMO_OUT)/models/cnn, $(DEMO_OUT)/models/cnn_lstm"
	@echo "comparison report: $(DEMO_OUT)/report/report.html (and report.md)"
	@echo "predictions:       $(DEMO_OUT)/screen/images, $(DEMO_OUT)/screen/studies, $(DEMO_OUT)/screen/runs"

test: $(VENV)/.installed
	$(BIN)/python -m pytest -q

test-fast: $(VENV)/.installed
	$(BIN)/python -m pytest -q -m "not slow"

clean:
	rm -rf out .pytest_cache
