# courtbot: `make demo` books a court against the bundled sandbox club; `make test` runs the whole suite;
# `make docs` serves the documentation on http://127.0.0.1:8000.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: venv test lint docs docs-build demo bench bench-scale clean postgres-server faketime compile

# The suite also runs on a throwaway PostgreSQL server (tests/pg_server.py) made from Debian's
# server binaries. Where they are missing and we are root (CI, a fresh machine), install
# Debian's postgresql package, without the default cluster it would otherwise create and start.
PG_SERVER_GLOB ?= /usr/lib/postgresql/*/bin/postgres

venv: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "courtbot needs Python 3.11 or newer (set PYTHON=python3.11)")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements.txt -r requirements-dev.txt
	@touch $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/hadolint --failure-threshold warning Dockerfile

# pytest exits 5 when it collected no test: that fails here like any other error. Two workers
# (pytest-xdist): the end-to-end tests run one at a time on one of them, the rest beside them
# (tests/conftest.py, SERIAL).
# PYTEST_ARGS: more options, e.g. `make test PYTEST_ARGS=--durations=40`.
test: lint docs-build postgres-server faketime compile
	$(BIN)/python -m pytest -n 2 $(PYTEST_ARGS)

# Our modules compiled once, ahead: the suite starts hundreds of `python main.py ...`, and where
# PYTHONDONTWRITEBYTECODE is set (as on this project's CI machines) Python never writes what it
# compiles, so each of them would compile all 18,000 lines again (0.2 s of CPU each). The
# Dockerfile does the same for the image.
compile: $(STAMP)
	$(BIN)/python -m compileall -q -l . tools

# The docs site (mkdocs.yml, docs/). Built with --strict before the tests, so a broken link, a
# missing anchor or a page left out of nav fails `make test` (and CI); `make docs` serves it.
# Not --quiet: it hides the warnings that --strict counts, and a broken link would pass.
# The mkdocs script, not `python -m mkdocs`: from this directory the latter would import our
# watchdog.py in place of the watchdog package mkdocs needs.
MKDOCS := NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs

docs-build: $(STAMP)
	$(MKDOCS) build --strict --site-dir site

docs: $(STAMP)
	$(MKDOCS) serve --strict --dev-addr 127.0.0.1:8000

postgres-server:
	@if ls $(PG_SERVER_GLOB) >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing Debian's postgresql package (server binaries for the test suite)"; \
	  mkdir -p /etc/postgresql-common/createcluster.d && \
	  echo "create_main_cluster = false" > /etc/postgresql-common/createcluster.d/courtbot-tests.conf && \
	  DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql >/dev/null; \
	else \
	  echo "note: no PostgreSQL server binaries ($(PG_SERVER_GLOB)): the PostgreSQL tests will be skipped; install them with: sudo apt-get install postgresql"; \
	fi

demo: $(STAMP) compile
	$(BIN)/python tools/demo.py

# The precision, burst and rivals' cases, the club's clock, then reload cost and memory at 5,200
# and 52,000 pending.
bench: $(STAMP) compile
	$(BIN)/python tools/bench.py
	$(BIN)/python tools/bench.py clock
	$(BIN)/python tools/bench.py load-trigger
	$(BIN)/python tools/bench.py reload
	$(BIN)/python tools/bench.py memory

# 100 and 1,000 schedules on SQLite and on PostgreSQL (docs/performance.md).
bench-scale: $(STAMP) postgres-server compile
	$(BIN)/python tools/bench.py scale

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis demo-data site

# libfaketime, for the wall-clock jump test (tests/test_e2e_watchdog.py): Debian's `faketime`,
# installed when missing if we are root with apt-get; otherwise that one test is skipped and
# says why. `make test` asks for it.
faketime:
	@if command -v faketime >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing Debian's faketime package (libfaketime, for the clock-jump test)"; \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends faketime >/dev/null 2>&1 || \
	  { DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends faketime >/dev/null; }; \
	else \
	  echo "note: faketime is not installed (needs root and apt-get): the clock-jump test will be skipped; install it with: sudo apt-get install faketime"; \
	fi
