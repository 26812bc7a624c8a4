# Two commands for a fresh machine: `make demo` and `make test`. Both create/update .venv.
VENV   ?= .venv
PYTHON ?= python3
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp

.PHONY: install install-runtime test unit integration typecheck demo bench bench-micro chaos gpu-check \
	gpu-baseline clean

# pyproject keeps a torch range; here we pin the CPU build that lies on this kind of machine, so
# an unpinned install never pulls a multi-GB CUDA build. Override with TORCH_SPEC=... elsewhere.
TORCH_SPEC ?= torch==2.13.0

RUNTIME_STAMP := $(VENV)/.runtime-stamp

# What a node needs (make demo); the dev extras add the test and baseline tools (make test).
$(RUNTIME_STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q '$(TORCH_SPEC)'
	$(PY) -m pip install -q -e .
	touch $(RUNTIME_STAMP)

$(STAMP): $(RUNTIME_STAMP)
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install-runtime: $(RUNTIME_STAMP)

install: $(STAMP)

typecheck: install
	$(PY) -m mypy

test: install typecheck
	$(PY) -m pytest -q tests

unit: install
	$(PY) -m pytest -q tests/unit

integration: install
	$(PY) -m pytest -q tests/integration

demo: install-runtime
	$(PY) -m bench.demo

chaos: install-runtime
	$(PY) -m bench.chaos

bench: install-runtime
	$(PY) -m bench

bench-micro: install
	$(PY) -m bench.rpc_latency
	$(PY) -m bench.engine_throughput

# On the GPU machine: its own python3 (torch + triton), plus the wheels of bench/gpu_wheels.sh
# carried in .whl/ because it has no network. Prints a table; see bench/gpu_check.py.
GPU_SITE ?= /tmp/p2psched-site
gpu-check:
	@if ls .whl/*.whl >/dev/null 2>&1; then python3 -m pip install -q --no-index --no-deps --no-compile \
		--no-cache-dir --upgrade --target $(GPU_SITE) .whl/*.whl; fi
	PYTHONPATH=$(GPU_SITE):$$PYTHONPATH python3 -m bench.gpu_check

# The kernels/ of an earlier revision in .baseline/ (git-ignored): gpu-check measures them too, as
# its "before" rows. Default: the last commit before issue 13 changed the kernels.
BASELINE_REV ?= fc38747
gpu-baseline:
	rm -rf .baseline && mkdir -p .baseline
	git archive $(BASELINE_REV) kernels | tar -x -C .baseline
	git rev-parse --short $(BASELINE_REV) > .baseline/REV

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache
