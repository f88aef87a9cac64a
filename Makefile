# One entry point for set-up, demo, tests and benchmarks. Every target creates .venv when missing.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# A CPU-only machine gets the CPU build of torch (plain `torch` would pull a multi-GB CUDA build);
# where nvidia-smi exists, keep whatever CUDA build the user's index gives.
TORCH_SPEC ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo torch || echo torch==2.13.0)
export NO_ALBUMENTATIONS_UPDATE := 1

.PHONY: demo test test-gpu bench bench-pipelines clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

demo: $(VENV)/.installed
	mkdir -p out
	$(VENV)/bin/augserve preview --pipeline alexnet --dataset photos --out out/preview-alexnet.png
	$(VENV)/bin/augserve preview --pipeline lenet5 --dataset digits --out out/preview-lenet5.png

test: $(VENV)/.installed
	$(PY) -m pytest -q tests

test-gpu: $(VENV)/.installed
	$(PY) -m pytest -q tests/gpu

bench: bench-pipelines

bench-pipelines: $(VENV)/.installed
	$(VENV)/bin/augserve bench pipelines

clean:
	rm -rf $(VENV) out .pytest_cache
