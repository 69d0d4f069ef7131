# Set-up and the two everyday commands. Everything installs into .venv from the package
# registry; FFmpeg comes inside the PyAV wheel, so no system packages are needed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-colossalai bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[test,models,train,dj]"
	touch $(STAMP)

# Generate a synthetic brick-film corpus and run the demo recipe over it (output in demo/out).
demo: $(STAMP)
	$(BIN)/bricks-dj demo

# The test suite (fast, CPU only, generated data).
test: $(STAMP)
	$(BIN)/python -m pytest -q

# parallel.strategy=colossalai in its own environment: ColossalAI 0.5.0 pins torch 2.5.1 and
# transformers 4.51.3. BUILD_EXT unset: ColossalAI's CUDA kernels are not built.
CAI_VENV := .venv-colossalai
CAI_STAMP := $(CAI_VENV)/.installed

$(CAI_STAMP): pyproject.toml
	$(PYTHON) -m venv $(CAI_VENV)
	$(CAI_VENV)/bin/pip install --quiet --upgrade pip
	env -u BUILD_EXT $(CAI_VENV)/bin/pip install --quiet -e ".[colossalai,test,train]" "torch==2.5.1" \
		"torchvision==0.20.1" diffusers sentencepiece safetensors huggingface_hub pillow
	touch $(CAI_STAMP)

test-colossalai: $(CAI_STAMP)
	$(CAI_VENV)/bin/python -m pytest -q tests/test_train_colossalai.py

# Decode-once benchmark: ratios against PyAV decode-only on real footage (the test extra's videos).
bench: $(STAMP)
	$(BIN)/python benchmarks/decode_once.py

clean:
	rm -rf $(VENV) $(CAI_VENV) demo bench-out
