# The two commands: `make up` runs the whole site on this machine, `make test` runs the tests.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=
# The suite mostly waits on servers starting and answering, so three workers on two cores finish in about half the
# time; each file stays on one worker (its module fixtures start once). TEST_WORKERS=0 runs it in this process.
TEST_WORKERS ?= 3

.PHONY: up down status demo test test-unit lint locks bench-ingest bench-drain bench-read bench-datasette-load bench-scripts bench-buffer-memory bench-outage bench-smoke bootstrap clean soak

bootstrap:
	@scripts/bootstrap.sh

up: bootstrap
	@$(PY) -m devstack.cli up

down:
	@$(PY) -m devstack.cli down

status:
	@$(PY) -m devstack.cli status

demo: bootstrap
	@$(PY) -m devstack.demo

test: bootstrap
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

# The pure functions alone (tests/unit): no service started, seconds; make test runs them too.
test-unit: bootstrap
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

# Fault-injection soak on a throwaway site: make soak DURATION=600 SEED=42 RECORDS=20000 (see README "Soak test").
DURATION ?= 300
RECORDS ?= 5000
SEED ?=
soak: bootstrap
	$(PY) -m devstack.soak --duration $(DURATION) --records $(RECORDS) $(if $(SEED),--seed $(SEED))

# Benchmarks (see README "Benchmarks"): make bench-drain SIZE=smoke runs every phase briefly; bench-smoke runs each at smoke size.
SIZE ?= full
# They measure the observatory's workload (its tables), whichever domain OPSYNC_DOMAIN or .env names.
bench-%: export OPSYNC_DOMAIN := observatory
bench-ingest: bootstrap
	$(PY) bench/ingest.py --size $(SIZE)

bench-drain: bootstrap
	$(PY) bench/drain.py --size $(SIZE)

bench-read: bootstrap
	$(PY) bench/read.py --size $(SIZE)

bench-smoke: bootstrap
	$(PY) bench/smoke.py

bench-datasette-load: bootstrap
	$(PY) bench/datasette_load.py --size $(SIZE)

bench-scripts: bootstrap
	$(PY) bench/scripts.py --size $(SIZE)

bench-buffer-memory: bootstrap
	$(PY) bench/buffer_memory.py --size $(SIZE)

bench-outage: bootstrap
	$(PY) bench/outage.py --size $(SIZE) $(if $(HOURS),--hours $(HOURS)) $(if $(RATE),--rate $(RATE))

# One lock per deployable (README "Packages and locks"); existing pins are kept unless an extra needs others.
EXTRAS := client api datasette airflow dev
locks: bootstrap
	@for extra in $(EXTRAS); do $(VENV)/bin/uv pip compile -q pyproject.toml --extra $$extra --python-version 3.11.13 \
	  --python-platform x86_64-manylinux_2_28 --custom-compile-command "make locks" -o locks/$$extra.txt; done

# mypy checks what [tool.mypy] in pyproject.toml names (opsync/ and ingest_api/).
lint: bootstrap
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	promtool check rules deploy/prometheus/opsync-rules.yml && promtool test rules deploy/prometheus/opsync-rules.test.yml
	$(VENV)/bin/mypy

clean: down
	rm -rf .run
