# Two commands for a fresh clone (Python 3.11 and make are all they need):
#   make up     start the bus (proxy + writer + reader) on ./bus.db; Ctrl-C stops it
#   make test   run the whole test suite
# Each creates or refreshes .venv when pyproject.toml has changed.

PYTHON ?= python3
VENV ?= .venv
STAMP := $(VENV)/.installed

PREFIX ?= /opt/bus

.PHONY: up test bench install clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $(STAMP)

# On a terminal, bus-cli up runs as a job of its own (set -m): the terminal's
# Ctrl-C reaches it alone, it stops the bus and exits 0, and make exits as it
# did. make itself, given the SIGINT, would exit 130 whatever bus-cli did.
# Elsewhere it replaces the shell (exec): a signal to make's process group
# reaches it (it stops the bus cleanly), and make, signalled too, exits 130;
# make does not pass on a signal sent to its pid alone. A supervisor runs
# bus-cli up itself (or the units: deploy/systemd).
up: $(STAMP)
	@if [ -t 0 ]; then set -m; $(VENV)/bin/bus-cli up; else exec $(VENV)/bin/bus-cli up; fi

# Two test processes (pytest-xdist); TEST_WORKERS=0 runs the suite in one.
TEST_WORKERS ?= 2

test: $(STAMP)
	$(VENV)/bin/python -m pytest -n $(TEST_WORKERS) --dist loadgroup --durations=15

bench: $(STAMP)
	$(VENV)/bin/python bench/bus_bench.py

# A production install: its own virtual environment under PREFIX, the package
# without the test tools, not editable (the checkout can go), and the docs and
# deploy files the units point to. PYTHON must be one the units' dynamic user
# can run: Debian's /usr/bin/python3 (apt-get install python3-venv), not one
# under a home directory. The commit installed is kept beside the environment
# (bus/build.py: `bus-cli ping` and bus_build_info show it).
install:
	$(PYTHON) -m venv $(PREFIX)/.venv
	$(PREFIX)/.venv/bin/python -m pip install --quiet --disable-pip-version-check .
	install -d $(PREFIX)/docs $(PREFIX)/deploy/systemd
	install -m 0644 README.md $(PREFIX)/
	install -m 0644 docs/*.md $(PREFIX)/docs/
	(git rev-parse HEAD 2>/dev/null || echo unknown) > $(PREFIX)/.venv/bus-revision
	install -m 0644 deploy/bus.toml $(PREFIX)/deploy/
	install -m 0644 deploy/systemd/* $(PREFIX)/deploy/systemd/
	@echo "installed in $(PREFIX): $(PREFIX)/.venv/bin/bus-cli --version"

clean:
	rm -rf $(VENV) *.egg-info build .pytest_cache
