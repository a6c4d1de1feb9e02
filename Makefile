# courtbot: `make demo` books a court against the bundled sandbox club; `make test` runs the whole suite.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: venv test lint demo bench clean faketime

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

# pytest exits 5 when it collected no test: that fails here like any other error.
test: lint
	$(BIN)/python -m pytest

demo: $(STAMP)
	$(BIN)/python tools/demo.py

bench: $(STAMP)
	$(BIN)/python tools/bench.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis demo-data

# libfaketime, for the wall-clock jump test (tests/test_e2e_watchdog.py): Debian's `faketime`,
# installed when missing if we are root with apt-get; otherwise that one test is skipped and
# says why. `make test` asks for it.
faketime:
	@command -v faketime >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
		{ apt-get install -y --no-install-recommends faketime >/dev/null 2>&1 || \
		  { apt-get update >/dev/null && apt-get install -y --no-install-recommends faketime >/dev/null; }; }; } || \
		echo "faketime is not installed (needs root and apt-get): the clock-jump test will be skipped"

test: faketime
