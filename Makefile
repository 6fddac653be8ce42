# The two commands of a fresh clone: `make demo` and `make test`. Both set up what they need.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build on this project's machines; on a GPU machine use e.g. TORCH_SPEC='torch>=2.11'.
TORCH_SPEC ?= torch==2.13.0
export OMP_NUM_THREADS ?= 2

.PHONY: demo test lint setup system-deps clean

setup: $(VENV)/.installed

# torch first: left to pip's resolver, deepspeed's unpinned torch pulls a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

demo: setup
	$(PY) launchers/pretrain.py --config demo

# System programs that tests launch: Open MPI's mpirun, and SLURM with munge for a one-node test
# cluster. Installed when missing and we may (root with apt, as in CI); otherwise those tests say
# how to install them and are skipped.
SYSTEM_PACKAGES := openmpi-bin slurm-wlm munge
system-deps:
	@command -v mpirun >/dev/null 2>&1 && command -v slurmctld >/dev/null 2>&1 && command -v munged >/dev/null 2>&1 || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	    echo "make test: installing the system packages $(SYSTEM_PACKAGES) with apt-get (as root), for the mpirun and SLURM tests" && \
	    apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(SYSTEM_PACKAGES) >/dev/null; } || \
	  echo "note: could not install $(SYSTEM_PACKAGES); the mpirun and SLURM tests will be skipped"

# Two pytest-xdist workers, a whole test file each at a time (module fixtures such as the SLURM
# cluster are then set up once): most tests wait on the ranks they start, so one process keeps
# about one core busy, and two halve the suite on CI's 2-core machine. TEST_WORKERS=0: one process.
# --no-loadscope-reorder: files go out in the order tests/conftest.py sorts them (longest first,
# those that need DeepSpeed's Adam ops late); xdist's default reorders them by how many tests they
# hold, which sent a file of many short tests, and its Muon test, ahead of the Adam build.
# --maxfail: a fault of the whole machine fails every test after it, each at its timeout; the run
# then stops at the fifth failure and prints what failed, where CI's run of b87fa9d went on to
# CI's 90-minute limit and printed no test's name (docs/reliability.md, the build lock).
TEST_WORKERS ?= 2
test: setup system-deps lint
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=15 --maxfail=5 tests

# ruff: lint (pycodestyle, pyflakes, import order, bugbear) and the formatter's check, configured in
# pyproject.toml. `.venv/bin/ruff format .` formats in place.
lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

clean:
	rm -rf $(VENV) runs
