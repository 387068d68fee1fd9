# The README's two commands. Both create .venv on first use; nothing is downloaded at run time.
PYTHON ?= python3
# Another interpreter gets its own venv (`make test PYTHON=python3.12` -> .venv-python3.12), so
# a venv built for one Python is never reused by another.
VENV ?= $(if $(filter python3,$(PYTHON)),.venv,.venv-$(notdir $(PYTHON)))
BIN := $(VENV)/bin

.PHONY: train test lint

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Stamps re-run the install when pyproject.toml changes.
$(VENV)/.installed-run: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -e .
	touch $@

# libtpu (for `jaxlm aot --topology`, compiling for TPUs on this CPU) goes to its own folder, not
# into the venv: installed there, jax would try to start a TPU on every run. The version is the
# one the installed jax asks for in its `tpu` extra.
$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -e '.[dev,hf]'
	$(BIN)/python -m pip install --no-deps --upgrade --target $(VENV)/tpu "$$($(BIN)/python -c \
	  'import importlib.metadata as m; print(next(r.split(";")[0] for r in m.requires("jax") if r.startswith("libtpu")))')"
	touch $@ $(VENV)/.installed-run

train: $(VENV)/.installed-run
	$(BIN)/jaxlm train --config=configs/tiny.py --workdir=runs/tiny

test: $(VENV)/.installed-dev
	$(BIN)/python -m pytest

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check .
