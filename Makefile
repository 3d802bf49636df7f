# Development tasks. `make test` and `make demo` set up .venv first (once; again when setup.py or pyproject.toml
# change). Works on a fresh clone: only python3 (>= 3.10) with venv and pip is needed.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
SAMPLE_MODEL := hf_vitprune/sample_model

.PHONY: venv test lint demo sample-model bench

venv: $(STAMP)

# torch first, pinned: the versions the project is tested with (pip may take them from a local wheel cache).
$(STAMP): setup.py pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -e ".[dev,space,timm]"
	touch $@

test: venv
	$(BIN)/pytest -q -x --timeout=900 tests

lint: venv
	$(BIN)/ruff check .

# Prune the shipped sample ViT to 50 % MACs with NViT, fine-tune with distillation, evaluate, save the Hub-ready
# folder demo_output/nvit-digits-50 and print dense vs pruned (a few minutes on a 2-core CPU).
demo: venv
	$(BIN)/python -m hf_vitprune.demo

# Retrain the shipped sample model from scratch (about 10 minutes on a 2-core CPU) and evaluate it.
sample-model: venv
	$(BIN)/python -m hf_vitprune.sample --train --evaluate --output $(SAMPLE_MODEL)

bench: venv
	$(BIN)/python benchmarks/run.py
