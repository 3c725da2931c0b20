# Two commands for a fresh clone (Python 3.11 and make are all they need):
#   make up     start the bus (proxy + writer + reader) on ./bus.db; Ctrl-C stops it
#   make test   run the whole test suite
# Each creates or refreshes .venv when pyproject.toml has changed.

PYTHON ?= python3
VENV ?= .venv
STAMP := $(VENV)/.installed

.PHONY: up test bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $(STAMP)

up: $(STAMP)
	$(VENV)/bin/bus-cli up

test: $(STAMP)
	$(VENV)/bin/python -m pytest

bench: $(STAMP)
	$(VENV)/bin/python bench/bus_bench.py

clean:
	rm -rf $(VENV) *.egg-info build .pytest_cache
