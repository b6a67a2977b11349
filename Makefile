# `make run` and `make test` set everything up on a fresh machine: a pip virtual environment in .venv,
# the project in editable mode with its dev extras, the MNIST files, and the system packages the tests use.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
DATA   ?= data

.PHONY: help setup system-deps data run test test-fast notebook bench clean

help:
	@echo "make run       set up, fetch MNIST, train and evaluate the guide's CNN"
	@echo "make test      set up and run the whole test suite"
	@echo "make test-fast the suite without the slow full-data runs"
	@echo "make notebook  open notebooks/mnist_classifier.ipynb in Jupyter"
	@echo "make bench     run the benchmarks in benchmarks/"

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	@touch $(STAMP)

setup: $(STAMP)

# Debian packages the tests use: chromium for the browser test (driven by Playwright, never downloaded),
# dataset-fashion-mnist for the Fashion-MNIST tests (its IDX files in /usr/share/datasets/fashion-mnist),
# postgresql for the test of a sweep shared by two workers (the test starts its own server), g++ to build the
# package's CPU kernels on first use (models/*.cpp, ~0.2 s each; without a compiler torch's layers run).
APT_PACKAGES := chromium dataset-fashion-mnist postgresql g++
system-deps:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing$$missing"; apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  else echo "note: install$$missing with apt-get for the full test suite (tests that need them are skipped)"; fi; \
	fi

data: setup
	$(BIN)/mnist data --data-dir $(DATA)

run: data
	$(BIN)/mnist train --data-dir $(DATA)

# Two phases. Most tests run on both cores at once (pytest-xdist), each with one torch thread: two 1-thread
# jobs get more done on 2 cores than one 2-thread job (1.37x from the second thread, BENCHMARKS.md), and the
# time spent starting processes and waiting overlaps. Then the `serial` tests (model servers under load or
# with time bounds) run one at a time with the default threads, so nothing else competes for their cores.
PYTEST_PARALLEL := OMP_NUM_THREADS=1 $(BIN)/python -m pytest -n 2
test: data system-deps
	$(PYTEST_PARALLEL) -m "not serial"
	$(BIN)/python -m pytest -m serial

# The short tests only, all on both cores: the short server tests' bounds hold beside a neighbour (measured).
test-fast: data
	$(PYTEST_PARALLEL) -m "not slow"

notebook: data
	$(BIN)/jupyter notebook notebooks/mnist_classifier.ipynb

bench: data
	$(BIN)/python benchmarks/train_speed.py --data-dir $(DATA)

clean:
	rm -rf runs .pytest_cache .test-cache
