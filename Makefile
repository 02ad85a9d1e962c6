# idemhook: `make run` serves the demo, `make test` runs the tests. Nothing else is needed
# on a fresh machine but Python >= 3.11 (and, for the tests, PostgreSQL's server binaries
# or a running server; see docs/development.md).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install system-deps run test lint bench screenshots clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# System packages (Debian's): wrk, the load generator of the benchmark and of its smoke
# test, pgbouncer, the connection pooler the pooler tests run the receiver behind, and
# chromium (with chromium-driver), the headless browser of the dashboard's tests.
# Installed with apt-get when missing and we are root; otherwise a clear error.
system-deps: $(STAMP)
	@$(BIN)/python -c "from bench.load import ensure_wrk; ensure_wrk()"
	@$(BIN)/python -c "from app.testing.pgbouncer import ensure_pgbouncer; ensure_pgbouncer()"
	@$(BIN)/python -c "from tests.browser import ensure_chromium; ensure_chromium()"

# The ports are checked first, before anything is installed (scripts/ports_free.py).
run:
	@PORT=$${PORT:-8000}; $(PYTHON) scripts/ports_free.py PORT "$$PORT" \
		EMAIL_SMTP_PORT "$${EMAIL_SMTP_PORT:-$$((PORT + 25))}"
	@$(MAKE) --no-print-directory $(STAMP)
	@bash scripts/demo.sh

test: $(STAMP) system-deps
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The receiver against the bare baseline (docs/performance.md); BENCH_ARGS=--quick for a
# half-minute run. Installs wrk from Debian's packages if it is missing.
bench: $(STAMP) system-deps
	$(BIN)/python -m pip install --quiet -e '.[test,bench]'
	$(BIN)/python -m bench.run --docs $(BENCH_ARGS)

# docs/dashboard/*.png, the screenshots of docs/dashboard.md: the dashboard's browser
# tests take them on their round through the pages.
screenshots: $(STAMP) system-deps
	IDEMHOOK_SCREENSHOTS=docs/dashboard $(BIN)/python -m pytest tests/dashboard/test_browser.py -q

# ruff (style, and no `import app`), and import-linter's contracts: the package's layers
# import only downwards (pyproject.toml, [tool.importlinter]; tests/test_layers.py runs it).
lint: $(STAMP)
	$(BIN)/ruff check app tests migrations bench examples
	$(BIN)/lint-imports

clean:
	rm -rf $(VENV) instance .pytest_cache
