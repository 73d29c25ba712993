# The two commands: `make up` runs the whole site on this machine, `make test` runs the tests.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: up down status demo test lint bench-ingest bench-drain bench-read bootstrap clean

bootstrap:
	@scripts/bootstrap.sh

up: bootstrap
	@$(VENV)/bin/opsync-stack up

down:
	@$(VENV)/bin/opsync-stack down

status:
	@$(VENV)/bin/opsync-stack status

demo: bootstrap
	@$(PY) -m opsync.demo

test: bootstrap
	$(PY) -m pytest $(PYTEST_ARGS)

bench-ingest: bootstrap
	$(PY) bench/ingest.py

bench-drain: bootstrap
	$(PY) bench/drain.py

bench-read: bootstrap
	$(PY) bench/read.py

lint: bootstrap
	$(VENV)/bin/ruff check .

clean: down
	rm -rf .run
