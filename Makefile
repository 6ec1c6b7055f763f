# One setup for everything: a venv with the package installed editable, which builds the ai.llmir
# custom-op library (CPU/MPI always; CUDA/NCCL whenever nvcc is present). Re-running is fast: the
# install is redone only when its inputs change, and CMake rebuilds incrementally.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.llmir-installed
LIBRARY := llmir_onnx/_lib/libllmir_ops.so
INSTALL_INPUTS := pyproject.toml setup.py $(shell find custom_ops -type f -not -name '*.pyc' 2>/dev/null)
DEMO_MODEL ?= models/llama-gqa-torch-legacy/model.onnx
DEMO_PLAN ?= build/demo-plan
DEMO_REPORT ?= build/demo-report.html
DEMO_TIMELINE ?= build/demo-timeline.json
PIP := $(BIN)/python -m pip install --quiet --disable-pip-version-check

.PHONY: setup demo test lint clean

setup: $(STAMP)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP) $(LIBRARY) &: $(BIN)/python $(INSTALL_INPUTS)
	$(PIP) "setuptools>=64" wheel "mpich>=4.2" "nvidia-nccl-cu13>=2.20"
	$(PIP) --no-build-isolation -e '.[dev]'
	touch $(STAMP)

demo: setup
	$(BIN)/llmir-onnx partition $(DEMO_MODEL) --tp 2 --pp 2 -o $(DEMO_PLAN)
	$(BIN)/llmir-onnx verify $(DEMO_PLAN)
	$(BIN)/llmir-onnx generate $(DEMO_PLAN) --prompt-ids '1,2,3;4,5,6' --micro-batches 2 --max-new-tokens 8 \
		--ignore-eos --check --timeline $(DEMO_TIMELINE)
	$(BIN)/llmir-onnx report $(DEMO_PLAN) -o $(DEMO_REPORT) --timeline $(DEMO_TIMELINE)

lint: setup
	$(BIN)/ruff check .
	$(BIN)/lint-imports --no-cache
	$(BIN)/mypy

test: lint
	$(BIN)/python -m pytest -q

clean:
	rm -rf build $(VENV) llmir_onnx/_lib/*.so
