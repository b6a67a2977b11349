# `make run` and `make test` set everything up on a fresh machine: a pip virtual environment in .venv,
# the project in editable mode with its dev extras, the MNIST files, and the system packages the tests use.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
DATA   ?= data

.PHONY: help setup data run test test-fast notebook bench clean

help:
	@echo "make run       set up, fetch MNIST, train and evaluate the seed CNN"
	@echo "make test      set up and run the whole test suite"
	@echo "make test-fast the suite without the slow full-data runs"
	@echo "make notebook  open notebooks/mnist_classifier.ipynb in Jupyter"
	@echo "make bench     run the benchmarks in benchmarks/"

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	@touch $(STAMP)

setup: $(STAMP)

data: setup
	$(BIN)/mnist data --data-dir $(DATA)

run: data
	$(BIN)/mnist train --data-dir $(DATA)

test: data
	$(BIN)/python -m pytest

test-fast: data
	$(BIN)/python -m pytest -m "not slow"

notebook: data
	$(BIN)/jupyter notebook notebooks/mnist_classifier.ipynb

bench: data
	$(BIN)/python benchmarks/train_speed.py --data-dir $(DATA)

clean:
	rm -rf runs .pytest_cache
