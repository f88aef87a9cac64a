# One entry point for set-up, demo, tests and benchmarks. Every target creates .venv when missing.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# A CPU-only machine gets the CPU build of torch (plain `torch` would pull a multi-GB CUDA build);
# where nvidia-smi exists, keep whatever CUDA build the user's index gives.
TORCH_SPEC ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo torch || echo torch==2.13.0)
export NO_ALBUMENTATIONS_UPDATE := 1

.PHONY: demo test test-gpu bench bench-pipelines bench-e2e bench-photos bench-decoders bench-trainer degradation recipes augmentation-effect tune-pruners bench-control-plane bench-ddp clean

$(VENV)/.installed: pyproject.toml setup.py augserve/sources/_libjpeg_region.c
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	bash tools/native_deps.sh
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

# The main job: a daemon with two augmentation workers feeds a LeNet-5 trainer on digits. Everything
# else (pipeline, batch size, optimiser, learning rate, run length) comes from LeNet-5's recipe.
demo: $(VENV)/.installed
	mkdir -p out
	$(VENV)/bin/augserve preview --pipeline lenet5 --dataset digits --out out/preview-lenet5.png
	$(PY) -m trainer train --model lenet5 --dataset digits --workers 2 --out out/demo-lenet5

# Two processes (pytest-xdist; a file stays on one process, so its daemons are started once): 11 min
# on a 2-core machine instead of 17-19 in one. TEST_PROCESSES=0 runs everything in this process.
TEST_PROCESSES ?= 2
test: $(VENV)/.installed
	$(PY) -m pytest -q --durations=15 -n $(TEST_PROCESSES) --dist loadfile tests

test-gpu: $(VENV)/.installed
	$(PY) -m pytest -q tests/gpu

bench: bench-pipelines bench-e2e bench-photos bench-decoders bench-trainer

bench-pipelines: $(VENV)/.installed
	$(VENV)/bin/augserve bench pipelines --per-op

bench-e2e: $(VENV)/.installed
	$(VENV)/bin/augserve bench e2e

# JPEG photos (500×375 and 1600×1200) → random-resized-crop 224 + mirror + normalize, 2 workers.
bench-photos: $(VENV)/.installed
	$(VENV)/bin/augserve bench e2e --photos --no-npz --photo-count 96 --batch-size 32 --batches 20 --rounds 3 --workers 2

bench-decoders: $(VENV)/.installed
	$(VENV)/bin/augserve bench decoders

bench-trainer: $(VENV)/.installed
	$(VENV)/bin/augserve bench trainer

# How many tasks/s one daemon schedules and acknowledges (fake workers, descriptors only).
bench-control-plane: $(VENV)/.installed
	$(VENV)/bin/augserve bench control-plane

# 1 vs 4 DDP ranks (gloo) on one daemon.
bench-ddp: $(VENV)/.installed
	$(PY) tools/ddp_scale.py

# The ResNet paper's degradation figure in miniature (plain vs residual, 20 vs 56 layers).
degradation: $(VENV)/.installed
	$(PY) -m trainer.experiments.degradation --depths 20 56 --epochs 8 --out out/degradation.png

# Do the default recipes learn? One model of each family, nothing but --model and --dataset.
recipes: $(VENV)/.installed
	$(PY) -m trainer.experiments.recipes_check --out docs/recipes.md

# No augmentation vs the preset vs a tuned spec, and PCA lighting on vs off, 3 seeds each.
augmentation-effect: $(VENV)/.installed
	$(PY) -m trainer.experiments.augmentation_effect --out docs/augmentation-effect

# Median pruning vs Hyperband vs none for the same wall time.
tune-pruners: $(VENV)/.installed
	$(PY) -m trainer.experiments.pruners --model lenet5_relu --dataset digits --seconds 120

clean:
	rm -rf $(VENV) out .pytest_cache
