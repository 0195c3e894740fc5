# Two commands do all set-up on a fresh machine:
#   make demo   - virtual environment, torch + triton + the package, then the demo
#   make test   - the same environment, then the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch 2.13.0 (CPU build) lies on the development machines' disk; override TORCH_SPEC
# elsewhere (e.g. TORCH_SPEC="torch>=2.4").
TORCH_SPEC ?= torch==2.13.0
# The CUTLASS / CuTe headers of the CUDA kernel (tested range: setup.py's CUTLASS_RANGE).
# Always installed with --no-deps: only the headers are used, not the Python package's
# dependencies (cuda-python, scipy, networkx, ...).
CUTLASS_SPEC ?= nvidia-cutlass>=4.2,<4.3
PYTEST_ARGS ?=

.PHONY: demo test env bench clean cutlass-include

$(VENV)/.installed: pyproject.toml setup.py Makefile $(wildcard csrc/*.h csrc/*.cpp csrc/*/*.h csrc/*/*.cpp csrc/*/*.cu)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q "$(TORCH_SPEC)" triton pybind11 ninja pytest matplotlib tqdm numpy \
		hypothesis pytorch-metric-learning
	# Cut Cross-Entropy, for the comparison tests: its own dependencies are torch and
	# triton, installed above
	$(PY) -m pip install -q --no-deps cut-cross-entropy
	$(PY) -m pip install -q --no-deps "$(CUTLASS_SPEC)"
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

env: $(VENV)/.installed

demo: env
	$(PY) -m arcface_kernels demo

test: env
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench: env
	$(PY) -m bench

# Copies the CUTLASS headers setup.py would use ($$CUTLASS_PATH, else the installed
# nvidia-cutlass package) to third_party/cutlass/include (git-ignored, about 27 MB), where
# setup.py, CMakeLists.txt and bench/gpu_check.sh find them on a machine without a package
# registry. Run again to refresh the copy.
cutlass-include:
	$(if $(wildcard $(PY)),$(PY),$(PYTHON)) -c 'import runpy; \
		runpy.run_path("setup.py", run_name="arcface_setup")["copy_cutlass_include"]()'

clean:
	rm -rf $(VENV) build *.egg-info arcface_kernels/*.so
