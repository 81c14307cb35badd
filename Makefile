# Set-up and checks. Everything runs inside .venv, created on first use.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip --disable-pip-version-check -q

.PHONY: test test-all wheel-check demo bench lint clean docs

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# `make test`: install the package with its test extras, lint, type-check jattn/ (mypy, ~15 s), run the suite
# (one pytest worker per core: the suite is compile-bound and single-threaded per test).
test: $(BIN)/python
	$(PIP) install -e '.[test]'
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/python -m pytest -q -n auto --dist loadgroup -m "not slow"

# `make test-all`: the same, plus the slow tier (exhaustive cross-product sweeps; see pyproject's markers)
# and the wheel check below.
test-all: $(BIN)/python
	$(PIP) install -e '.[test,packaging]'
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/python -m pytest -q -n auto --dist loadgroup

# `make wheel-check`: build the sdist and wheel, `twine check` them, install the wheel into a fresh
# venv and run jattn there without flax, then jattn.nnx with the nnx extra (tests/test_packaging.py;
# about 45 s on 2 cores, most of it pip installing jax and flax from the package index).
wheel-check: $(BIN)/python
	$(PIP) install -e '.[test,packaging]'
	$(BIN)/python -m pytest -q -n 0 -s tests/test_packaging.py

# `make demo`: the tutorial notebook, done with jattn.
demo: $(BIN)/python
	$(PIP) install -e '.[demo]'
	$(BIN)/python examples/notebook.py
	$(BIN)/python -m bench --quick

lint: $(BIN)/python
	$(PIP) install -e '.[test]'
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

clean:
	rm -rf $(VENV) examples/out .pytest_cache .ruff_cache .mypy_cache dist build docs/_build docs/_generated

# `make docs`: the documentation site (Sphinx + MyST, docs/) into docs/_build/html, strict: a warning, an
# unresolved cross-reference (-n) or a broken internal link fails it; -E rereads every page, so a second
# run cannot pass by skipping a page that warned. Offline: nothing is fetched while building.
docs: $(BIN)/python
	$(PIP) install -e '.[docs]'
	$(BIN)/python -m sphinx -W --keep-going -n -E -q -b html docs docs/_build/html
	@echo "docs: open docs/_build/html/index.html"

# `make bench`: the benchmark harness (full preset) on whatever backend JAX finds.
bench: $(BIN)/python
	$(PIP) install -e '.[bench]'
	$(BIN)/python -m bench
