# Two commands for a fresh machine (see README): `make demo` and `make test`.
# Each creates .venv and installs reslab into it on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# One extras list for everything the tests use: `dev` names the other extras it needs
# (pyproject.toml), so a new optional dependency is added there, not here.
EXTRAS ?= dev

.PHONY: demo test quick lint clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[$(EXTRAS)]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/reslab train

# What CI runs: lint, formatting, the type checker, the whole suite (under 10 minutes on 2 cores).
test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy reslab
	$(BIN)/python -m pytest -q

# The quick loop while editing: the suite without the few tests that train for minutes.
quick: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy reslab

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
