# fastmerge: `make demo` and `make test` work on a fresh machine (they create .venv and build everything).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
export OMP_NUM_THREADS ?= 1
export MAX_JOBS ?= 2

.PHONY: setup build test test-lane-python test-lane-native test-triton check-cuda lint demo bench accuracy accuracy-quick clean

# torch first (pinned to the local CPU wheel where there is one), so nothing pulls CUDA wheels
$(VENV)/.deps: Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q torch==2.13.0 || $(PIP) install -q torch
	$(PIP) install -q numpy safetensors pybind11 pyyaml tqdm threadpoolctl triton pytest pytest-benchmark hypothesis ruff setuptools wheel ninja
	$(PIP) install -q mergekit==0.1.5  # the peer the engine's golden tests and benchmarks compare against
	touch $@

$(VENV)/.demo-deps: $(VENV)/.deps examples/minilm/requirements.txt examples/minilm/requirements-nodeps.txt
	$(PIP) install -q -r examples/minilm/requirements.txt
	$(PIP) install -q --no-deps -r examples/minilm/requirements-nodeps.txt
	touch $@

setup: $(VENV)/.deps

# the extension is rebuilt only when what it is built from changes (pip install -e rebuilds it from scratch:
# minutes on 2 cores); Python files are installed in editable mode and need no rebuild
BUILD_INPUTS := setup.py pyproject.toml $(shell find csrc kernels -type f \( -name '*.cpp' -o -name '*.cu' -o -name '*.cuh' -o -name '*.h' -o -name '*.inc' -o -name '*.py' \) 2>/dev/null)

$(VENV)/.built: $(BUILD_INPUTS) | $(VENV)/.deps
	$(PIP) install -q --no-build-isolation -e .
	touch $@

build: $(VENV)/.built

lint: setup
	$(VENV)/bin/ruff check .

# two lanes on the 2-core CI machine: the one-threaded test suites in one, nvcc and the accuracy smoke test in
# the other (~12 min instead of ~17 in a row); each lane's output is printed whole when it ends
test: build lint $(VENV)/.demo-deps
	$(MAKE) --no-print-directory -j2 --output-sync=target test-lane-python test-lane-native

test-lane-python: build
	$(PY) -m pytest -q
	$(MAKE) --no-print-directory test-triton

test-lane-native: build $(VENV)/.demo-deps
	$(PY) tools/check_cuda.py --jobs 1
	$(MAKE) --no-print-directory accuracy-quick

test-triton: build
	TRITON_INTERPRET=1 $(PY) -m pytest -q -m triton

check-cuda: setup
	$(PY) tools/check_cuda.py

demo: build $(VENV)/.demo-deps
	$(PY) examples/demo.py

# the real multi-task accuracy benchmark (design A: 8 tasks; ~30 min on 2 cores the first time) and its CI smoke test
accuracy: build $(VENV)/.demo-deps
	$(PY) benchmarks/accuracy/run.py

accuracy-quick: build $(VENV)/.demo-deps
	$(PY) benchmarks/accuracy/run.py --quick

bench: build
	$(PY) -m pytest benchmarks -m benchmark -o addopts="" --benchmark-json=benchmarks/results/latest.json

clean:
	rm -rf build *.egg-info fastmerge/*.so fastmerge/_build_info.json $(VENV)/.built
