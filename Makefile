# Set-up and the two everyday commands. Everything installs into .venv from the package
# registry; FFmpeg comes inside the PyAV wheel, so no system packages are needed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[test,models,train]"
	touch $(STAMP)

# Generate a synthetic brick-film corpus and run the demo recipe over it (output in demo/out).
demo: $(STAMP)
	$(BIN)/bricks-dj demo

# The test suite (fast, CPU only, generated data).
test: $(STAMP)
	$(BIN)/python -m pytest -q

# Decode-once benchmark: ratios against PyAV decode-only on a generated 720p corpus.
bench: $(STAMP)
	$(BIN)/python benchmarks/decode_once.py

clean:
	rm -rf $(VENV) demo bench-out
