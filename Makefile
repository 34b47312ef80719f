# tradingsite developer commands (GNU make). `make run` and `make test` are all a new user needs.
#
# Every target builds the virtualenv first; pip runs again only when a requirements file
# is newer than the stamp $(VENV)/.installed.

SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
MANAGE := $(PY) manage.py
STAMP := $(VENV)/.installed
REQUIREMENTS := $(wildcard requirements*.txt)

PG_URL ?= postgres://postgres@127.0.0.1:5432/tradingsite
PYTEST_ARGS ?=
WEB_BIND ?= 127.0.0.1
WEB_PORT ?= 8000
DRILL_SECONDS ?= 300

.PHONY: help venv migrate run web test test-pg lint typecheck check bench drill

help:
	@echo "make run        migrate, seed demo data (when available), run the scheduler on SQLite + simulated exchange"
	@echo "make test       the test suite on SQLite (the default settings)"
	@echo "make test-pg    the test suite on PostgreSQL (PG_URL=$(PG_URL))"
	@echo "make lint       ruff check + ruff format --check"
	@echo "make typecheck  mypy with the django-stubs and DRF plugins (config in pyproject.toml)"
	@echo "make check      lint + typecheck + runscheduler --check + makemigrations --check"
	@echo "make bench      benchmarks in bench/ (BENCH_SECONDS, default 300)"
	@echo "make drill      the HA/chaos drill on PostgreSQL (DRILL_SECONDS, default 300; DRILL_PG_ADMIN_URL)"
	@echo "make web        migrate, collectstatic, then daphne on $(WEB_BIND):$(WEB_PORT)"

venv: $(STAMP)

$(STAMP): $(REQUIREMENTS)
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' \
		|| { echo "tradingsite needs Python 3.11; '$(PYTHON)' is $$($(PYTHON) --version 2>&1). Use PYTHON=python3.11" >&2; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q -r requirements-dev.txt
	touch $@

migrate: venv
	$(MANAGE) migrate --noinput

# `exec` replaces the recipe's shell, so Ctrl-C and SIGTERM reach runscheduler directly.
run: migrate
	@if $(MANAGE) help seed_demo >/dev/null 2>&1; then $(MANAGE) seed_demo; \
		else echo "seed_demo is not available yet; starting without demo data"; fi
	exec $(MANAGE) runscheduler

# Static files are collected into STATIC_ROOT (var/static) and served by WhiteNoise inside daphne.
web: migrate
	$(MANAGE) collectstatic --noinput -v 0
	exec $(VENV)/bin/daphne -b $(WEB_BIND) -p $(WEB_PORT) tradingsite.asgi:application

# pytest exit 5 means "no tests collected": a pass that ran nothing proves nothing, so it fails.
define run_pytest
	@rc=0; $(1) $(PY) -m pytest $(PYTEST_ARGS) || rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "FAIL: pytest collected no tests (exit 5)" >&2; fi; \
	exit $$rc
endef

# The SQLite pass ignores a DATABASE_URL exported in the caller's shell.
test: venv
	$(call run_pytest,env -u DATABASE_URL)

test-pg: venv
	$(call run_pytest,env DATABASE_URL=$(PG_URL))

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: venv
	$(VENV)/bin/mypy .

check: lint typecheck migrate
	$(MANAGE) runscheduler --check
	$(MANAGE) makemigrations --check --dry-run

bench: venv
	$(PY) -m bench.lateness
	$(PY) -m bench.prices
	$(PY) -m bench.queue
	$(PY) -m bench.fills
	$(PY) -m bench.fanout
	$(PY) -m bench.memory

# The whole system on a fresh PostgreSQL database under load and chaos (SPEC §9); exits non-zero on a
# violated invariant. DRILL_PG_ADMIN_URL (default postgres://postgres@127.0.0.1:5432/postgres) names the server.
drill: venv
	$(PY) -m drill --seconds $(DRILL_SECONDS)
