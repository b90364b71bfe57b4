# Two commands on a fresh machine with Python 3.11+:  make demo  and  make test
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test lint bench clean

$(BIN)/baragg: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

demo: $(BIN)/baragg
	$(BIN)/baragg demo

test: $(BIN)/baragg
	$(BIN)/ruff check src tests bench
	$(BIN)/python -m pytest -n auto --maxprocesses=4

lint: $(BIN)/baragg
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
