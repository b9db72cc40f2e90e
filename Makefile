# Two commands a newcomer needs: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: help venv js demo test check lint typecheck unit loadtest loadtest-smoke clean

help:
	@echo "make demo      start a throwaway PostgreSQL (unless DATABASE_URL is set), the gateway and a live demo page"
	@echo "make test      ruff, mypy and the whole test suite against a real PostgreSQL, sockets and browser"
	@echo "make loadtest  the end-to-end benchmark; writes loadtest/report/"
	@echo "make clean     remove the virtual environment and caches"

# The environment is built from the lock file so every machine gets the same versions.
# gateway/__init__.py holds the version: the editable install's metadata is refreshed with it.
$(STAMP): requirements.lock pyproject.toml gateway/__init__.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements.lock
	$(BIN)/python -m pip install -q --no-deps -e .
	touch $(STAMP)

venv: $(STAMP)

# The npm package's (clients/js) development tools, TypeScript and React, at the versions of its
# package-lock.json. Only when npm is installed: the gateway itself needs no Node, and the tests
# that do skip, saying why, without it.
NPM := $(shell command -v npm 2>/dev/null)
JS_STAMP := clients/js/node_modules/.installed
ifneq ($(NPM),)
$(JS_STAMP): clients/js/package.json clients/js/package-lock.json
	cd clients/js && $(NPM) ci --no-audit --no-fund --loglevel=error
	touch $@

js: $(JS_STAMP)
else
js:
	@echo "no npm here: the tests of the npm package (clients/js) will be skipped"
endif

demo: $(STAMP)
	$(BIN)/gateway demo

lint: $(STAMP)
	$(BIN)/ruff check gateway tests loadtest deploy
	$(BIN)/ruff format --check gateway tests loadtest deploy

typecheck: $(STAMP)
	$(BIN)/mypy

check: lint typecheck

unit: $(STAMP) js
	$(BIN)/pytest -q

test: check unit

loadtest: $(STAMP)
	$(BIN)/python -m loadtest $(ARGS)

loadtest-smoke: $(STAMP)
	$(BIN)/python -m loadtest --smoke --out /tmp/loadtest-smoke

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
