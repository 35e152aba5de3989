# modelgrid: `make up` runs the mesh locally, `make test` runs the suite. Both install what is missing first.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
RUN_DIR := .run
CONSUL := .tools/consul/usr/bin/consul
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
DEBIAN_PACKAGES := redis-server redis-sentinel docker-compose chromium iproute2
# The stamp is named after the package list, so that adding a package to the list installs it on the next run.
DEBIAN_STAMP := .tools/.debian-packages-$(shell echo '$(DEBIAN_PACKAGES)' | sha256sum | cut -c1-12)
PROTO_FILES := $(shell find protos -name '*.proto')
GEN_STAMP := clients/python/src/modelgrid/.generated
PYTEST_ARGS ?=
# make test runs the test files on PYTEST_WORKERS pytest-xdist workers (each file on one worker, its module fixtures
# once), then the multi-host tests alone: their three-host labs keep their time bounds only without another worker's
# tests beside them. PYTEST_WORKERS=1 runs every file one after another (about 30 minutes on 2 cores instead of
# about 20); PYTEST_ARGS runs only what it names.
PYTEST_WORKERS ?= 2
XDIST = $(if $(filter-out 1,$(PYTEST_WORKERS)),-n $(PYTEST_WORKERS) --dist loadfile)

.PHONY: help setup protos web up down status test test-fast fuzz lint format clean lock demo settings-doc bench-registry bench-predictor bench-trainer bench-gateway bench-large bench-peers

help:
	@echo "make up              install what is missing, start Consul, Redis and the services locally"
	@echo "make down            stop everything make up started"
	@echo "make test            install what is missing, run the whole suite against real Consul and Redis"
	@echo "make test-fast       the unit tier only (tests/unit: in-process, real Consul and Redis), a few minutes"
	@echo "make fuzz            the fuzz targets of tests/fuzz for MODELGRID_FUZZ_SECONDS (600) instead of a few cases"
	@echo "make demo            make up, then train on two workers, register, promote, predict through the gateway"
	@echo "make bench-registry  registry push/pull throughput vs a plain file copy, metadata ops/s"
	@echo "make bench-predictor predictor throughput/latency: in-process limit, batching off/on, Flask baseline"
	@echo "make bench-trainer   a training run bare vs through the trainer; recovery after kill -9 of a worker"
	@echo "make bench-gateway   predictor throughput and latency directly and through the gateway"
	@echo "make bench-large     push, pull and load a 2.25 GiB SavedModel: time and peak RSS of each process, bounded"
	@echo "make bench-peers     predictor (direct, via gateway) vs MLServer and KServe over OIP gRPC, same models"
	@echo "                     (BENCH_ARGS=--quick for a short run of any bench)"
	@echo "make lint            ruff check and format check"
	@echo "make protos          regenerate Python code from protos/ into clients/python/src/modelgrid/"
	@echo "make settings-doc    regenerate docs/settings.md from the settings classes"
	@echo "make web             build the web console (TypeScript from protos/, Vite) into web/dist/"

setup: $(VENV)/.installed $(CONSUL) $(DEBIAN_STAMP) $(GEN_STAMP) web

# Debian packages: installed only when one of them is missing.
$(DEBIAN_STAMP):
	@missing=""; for p in $(DEBIAN_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:$$missing"; \
		$(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$missing; \
	fi
	@mkdir -p .tools && rm -f .tools/.debian-packages* && touch $@

$(CONSUL):
	bash scripts/install-consul.sh

# The client distribution (clients/python: the code generated from protos/ and the typed clients) is installed first,
# editable: the services depend on it. Its build generates the code when protos/ changed since the last generation.
$(VENV)/.installed: pyproject.toml constraints.txt clients/python/pyproject.toml
	@[ -x $(PY) ] || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt grpcio-tools
	PY=$(PY) bash scripts/gen-protos.sh
	$(PY) -m pip install -q -c constraints.txt -e clients/python
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	@touch $@

protos: $(VENV)/.installed
	PY=$(PY) bash scripts/gen-protos.sh

$(GEN_STAMP): $(PROTO_FILES) | $(VENV)/.installed
	PY=$(PY) bash scripts/gen-protos.sh

# Web console: npm packages from web/package-lock.json (again only when it changes), TypeScript generated from
# protos/ into web/src/gen (not committed), then a Vite build into web/dist, which the gateway serves at /.
WEB_SOURCES := $(shell find web/src -name '*.ts' -not -path '*/gen/*' 2>/dev/null) web/src/style.css web/index.html \
	web/vite.config.js web/tsconfig.json

web: web/dist/index.html

web/node_modules/.installed: web/package.json web/package-lock.json
	cd web && npm ci --no-audit --no-fund
	@touch $@

web/dist/index.html: web/node_modules/.installed $(PROTO_FILES) $(WEB_SOURCES) | $(VENV)/.installed
	cd web && npm run generate && npm run build

up: setup
	$(PY) -m services.kit.localinfra up --state-dir $(RUN_DIR)
	$(PY) scripts/mesh.py up --state-dir $(RUN_DIR)

down:
	-[ -x $(PY) ] && $(PY) scripts/mesh.py down --state-dir $(RUN_DIR)
	-[ -x $(PY) ] && $(PY) -m services.kit.localinfra down --state-dir $(RUN_DIR)

status: setup
	$(PY) -m services.kit.localinfra status --state-dir $(RUN_DIR); $(PY) scripts/mesh.py status --state-dir $(RUN_DIR)

# docs/settings.md from the settings classes (a unit test fails when it is out of date).
settings-doc: $(VENV)/.installed $(GEN_STAMP)
	$(PY) scripts/settings_reference.py

# Tiers: tests/unit (in-process), tests/integration (services as subprocesses), tests/e2e (web console, compose).
test: setup
ifeq ($(strip $(PYTEST_ARGS)),)
	rc=0; $(PY) -m pytest $(XDIST) --ignore=tests/multihost || rc=$$?; $(PY) -m pytest tests/multihost || rc=$$?; exit $$rc
else
	$(PY) -m pytest $(XDIST) $(PYTEST_ARGS)
endif

# The inner loop: no web console build, no subprocess meshes.
test-fast: $(VENV)/.installed $(CONSUL) $(DEBIAN_STAMP) $(GEN_STAMP)
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

# tests/fuzz runs MODELGRID_FUZZ_EXAMPLES cases per target from fixed seeds in `make test`; this gives all its targets
# MODELGRID_FUZZ_SECONDS together (split evenly) with fresh random cases. The web console is not needed.
MODELGRID_FUZZ_SECONDS ?= 600
fuzz: $(VENV)/.installed $(CONSUL) $(DEBIAN_STAMP) $(GEN_STAMP)
	MODELGRID_FUZZ_SECONDS=$(MODELGRID_FUZZ_SECONDS) $(PY) -m pytest tests/fuzz \
		--timeout=$$(( $(firstword $(subst ., ,$(MODELGRID_FUZZ_SECONDS))) + 600 )) $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check services tests bench scripts
	$(VENV)/bin/ruff format --check services tests bench scripts

format: setup
	$(VENV)/bin/ruff format services tests bench scripts
	$(VENV)/bin/ruff check --fix services tests bench scripts

# Trains a model on two workers, registers it, promotes it and predicts through the gateway (starts the mesh first).
demo: up
	$(PY) scripts/demo.py

bench-registry: setup
	$(PY) bench/registry_bench.py $(BENCH_ARGS)

# py-spy samples a service for the benches' --profile; a bench tool, not a dependency of the services.
PY_SPY := $(VENV)/bin/py-spy
$(PY_SPY): $(VENV)/.installed
	$(PY) -m pip install -q py-spy==0.4.3

bench-predictor: setup
	$(PY) bench/predictor_bench.py $(BENCH_ARGS)

bench-trainer: setup
	$(PY) bench/trainer_bench.py $(BENCH_ARGS)

bench-gateway: setup $(PY_SPY)
	$(PY) bench/gateway_bench.py $(BENCH_ARGS)

bench-large: setup
	$(PY) bench/large_bench.py $(BENCH_ARGS)

# The serving peers of bench-peers, each in a virtualenv of its own under .bench/peers/<name>/ made with $(PYTHON),
# pinned by bench/peers/<name>-requirements.txt (MLServer 1.7.1, KServe 0.21.0, TensorFlow as in constraints.txt) and
# installed again only when that file changes.
PEERS_DIR := .bench/peers
PEER_STAMPS := $(PEERS_DIR)/mlserver/.installed $(PEERS_DIR)/kserve/.installed

bench-peers: setup $(PEER_STAMPS) $(PY_SPY)
	$(PY) bench/peers_bench.py --peers-dir $(PEERS_DIR) $(BENCH_ARGS)

$(PEERS_DIR)/%/.installed: bench/peers/%-requirements.txt
	rm -rf $(PEERS_DIR)/$*
	$(PYTHON) -m venv $(PEERS_DIR)/$*
	$(PEERS_DIR)/$*/bin/python -m pip install -q --upgrade pip
	$(PEERS_DIR)/$*/bin/python -m pip install -q -r $<
	@touch $@

# Re-pins constraints.txt to what the venv has now (after changing pyproject.toml dependencies).
lock: $(VENV)/.installed
	{ echo "# Exact versions that install together on Python 3.11 (pip install -c constraints.txt). Regenerate: make lock"; \
	  $(PY) -m pip freeze --exclude-editable; } > constraints.txt

clean: down
	rm -rf $(RUN_DIR) build *.egg-info .pytest_cache .ruff_cache web/dist web/src/gen clients/python/build clients/python/src/*.egg-info
	find clients/python/src/modelgrid -mindepth 1 -maxdepth 1 ! -name client ! -name __init__.py ! -name py.typed \
		-exec rm -rf {} +
