# The two commands of a fresh clone: `make demo` and `make test`. Both set up what they need.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build on this project's machines; on a GPU machine use e.g. TORCH_SPEC='torch>=2.11'.
TORCH_SPEC ?= torch==2.13.0
export OMP_NUM_THREADS ?= 2

.PHONY: demo test setup clean

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

test: setup
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) runs
