# Set-up and the two main jobs. Every step checks first and skips what is already there.
#   make run    install what is missing, build the betons, train the spec with --compile
#   make test   install what is missing, lint, run the test suite
#
# Which Python: a virtual environment in the checkout, .venv/ (made by `make setup` with python3's venv
# module), because a stock Debian or Ubuntu Python refuses `pip install` outside one (PEP 668). An active
# virtual or conda environment (VIRTUAL_ENV, CONDA_PREFIX) is used as it is, and so is PYTHON=... .
VENV        := .venv
BASE_PYTHON ?= python3
ifeq ($(origin PYTHON),undefined)
  ifneq ($(VIRTUAL_ENV),)
    PYTHON := $(VIRTUAL_ENV)/bin/python
  else ifneq ($(CONDA_PREFIX),)
    PYTHON := $(CONDA_PREFIX)/bin/python
  else
    PYTHON := $(VENV)/bin/python
    MAKE_VENV := 1
  endif
endif
PIP        ?= $(PYTHON) -m pip
TORCH_SPEC ?= torch==2.13.0
DATA_DIR   ?= data
# Local CIFAR-10 python archive; empty = download the official one.
SOURCE     ?= $(FASTCIFAR_CIFAR_ARCHIVE)
SUDO       := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
APT        := $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends
TRAIN_ARGS ?=

# make gpu-check [DATA=<betons folder, CIFAR archive or synthetic>] [OUT=<folder>] [BUDGET=<s>] [STAGES=a,b]
#   no DATA: full-size synthetic data made there; SMOKE=1: CPU, tiny synthetic data, few steps
DATA       ?=
OUT        ?= results/gpu-check
SMOKE      ?=
BUDGET     ?=
STAGES     ?=

.PHONY: setup venv system-deps python-deps dali spdl betons run test lint bench gpu-check results docs docs-check clean

setup: venv system-deps python-deps

# .venv/, unless another environment was chosen above. python3 -m venv needs ensurepip, which Debian and
# Ubuntu ship apart (python3-venv): installed with apt when missing.
venv:
ifdef MAKE_VENV
	@test -x $(VENV)/bin/python || { \
	  $(BASE_PYTHON) -c "import ensurepip, venv" 2>/dev/null || { \
	    echo "installing python3-venv (apt): $(BASE_PYTHON) lacks ensurepip"; \
	    $(SUDO) apt-get update -q && $(APT) python3-venv; }; \
	  $(BASE_PYTHON) -m venv $(VENV) && \
	  echo "created $(VENV)/ with $$($(VENV)/bin/python --version): everything installs there, the system's Python is untouched"; }
endif

# ffcv 1.0.2 builds from source against OpenCV and libjpeg-turbo, and the Python's own headers.
system-deps: venv
	@pkg-config --exists opencv4 libturbojpeg 2>/dev/null || { \
	  echo "installing pkg-config libturbojpeg0-dev libopencv-dev (apt)"; \
	  $(SUDO) apt-get update -q && $(APT) pkg-config libturbojpeg0-dev libopencv-dev g++; }
	@$(PYTHON) -c "import ffcv" 2>/dev/null || $(PYTHON) -c "import os, sysconfig; \
	  assert os.path.exists(os.path.join(sysconfig.get_paths()['include'], 'Python.h'))" 2>/dev/null || { \
	  echo "installing python3-dev (apt): $(PYTHON) has no headers to build ffcv against"; \
	  $(SUDO) apt-get update -q && $(APT) python3-dev; }

# torch first and pinned, only when none is importable (which build: docs/usage.md, "Which torch";
# TORCH_SPEC may carry pip flags, e.g. --index-url), so nothing later pulls another; then ffcv without build
# isolation (its setup.py needs numpy and the system libraries above); then fastcifar itself.
python-deps:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install -q $(TORCH_SPEC)
	@$(PYTHON) -c "import ffcv, PIL" 2>/dev/null || { \
	  $(PIP) install -q setuptools wheel "numpy>=2" numba pillow && \
	  $(PIP) install -q --no-build-isolation ffcv==1.0.2; }
	@$(PYTHON) -c "from importlib.metadata import version as v; \
	  [v(p) for p in ('fastcifar', 'tensorboard', 'torch-tb-profiler', 'matplotlib', 'pydantic', 'pytest', 'ruff')]" 2>/dev/null || \
	  $(PIP) install -q -e ".[test]"

# Optional: NVIDIA DALI for --loader dali (CI installs it so the DALI tests run on its CPU-only pipeline).
dali: setup
	@$(PYTHON) -c "import nvidia.dali" 2>/dev/null || $(PIP) install -q -e ".[dali]"

# Optional: Meta's SPDL pipeline for --loader spdl (CI installs it so its tests run; where no wheel exists for
# this Python, make says so and the spdl tests skip with that reason).
spdl: setup
	@$(PYTHON) -c "import spdl.pipeline" 2>/dev/null || $(PIP) install -q -e ".[spdl]" || \
	  echo "make spdl: no spdl-core wheel for $$($(PYTHON) --version) here; --loader spdl and its tests are skipped"

betons: setup
	$(PYTHON) tools/make_beton.py --data-dir $(DATA_DIR) $(if $(SOURCE),--source $(SOURCE))

run: betons
	$(PYTHON) -m fastcifar.train --compile --data-dir $(DATA_DIR) $(TRAIN_ARGS)

lint: setup
	$(PYTHON) -m ruff check fastcifar tools tests

test: setup lint
	$(PYTHON) -m pytest -q

bench: betons
	$(PYTHON) tools/bench_loader.py --data-dir $(DATA_DIR)

# No set-up here on purpose: a GPU machine brings its own CUDA build of torch (and may be offline). So
# .venv's Python where `make setup` made one, else python3 (an explicit PYTHON= or active env as above).
GPU_PYTHON := $(if $(MAKE_VENV),$(if $(wildcard $(VENV)/bin/python),$(VENV)/bin/python,$(BASE_PYTHON)),$(PYTHON))
gpu-check:
	$(GPU_PYTHON) tools/gpu_check.py --out $(OUT) $(if $(SMOKE),--smoke,$(if $(DATA),--data $(DATA))) \
	  $(if $(BUDGET),--budget-s $(BUDGET)) $(if $(STAGES),--stages $(STAGES))

# make results [SEEDS=3] [STAGES=a,b] [BUDGET=<s>]: every published figure re-measured at this commit into
#   docs/results/<machine>/ (resumable), then the README's and docs/benchmarks.md's tables rendered from them
SEEDS      ?= 3
results: betons
	$(PYTHON) -m fastcifar.measure --data-dir $(DATA_DIR) --seeds $(SEEDS) \
	  $(if $(BUDGET),--budget-s $(BUDGET)) $(if $(STAGES),--stages $(STAGES))
	$(PYTHON) -m fastcifar.render

# The tables between the markers in README.md and docs/benchmarks.md, rendered from docs/results/*/.
docs: venv
	$(PYTHON) -m fastcifar.render

# Seconds, no training, no torch: the rendered tables match the committed JSONs, every relative link
# resolves. Needs only pytest (installed into the chosen Python when missing).
docs-check: venv
	@$(PYTHON) -c "import pytest, pydantic" 2>/dev/null || $(PIP) install -q pytest "pydantic>=2.7,<3"
	$(PYTHON) -m pytest -q -p no:cacheprovider --noconftest tests/reporting/test_docs.py

clean:  # keeps .venv/ (rm -r .venv to start over)
	rm -rf results profiles/*/ .pytest_cache
