# epochlens: everything runs from the project's own virtual environment (.venv).
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

NODE_DIR := clients/node
NODE_STAMP := $(NODE_DIR)/node_modules/.installed

.PHONY: browser install node-deps proto descriptors proto-check contracts pg pgbouncer test test-unit test-integration test-e2e fuzz up down demo smoke bench lint clean

$(PY):
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# Re-installs when pyproject.toml changes. torch is pinned to the CPU build on this disk.
$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e '.[dev,trainer]'
	touch $(STAMP)

install: $(STAMP)

# buf (contract lint and breaking checks) and the Node.js example's gRPC packages, pinned by
# clients/node/package-lock.json, into clients/node/node_modules. Re-installs when they change.
$(NODE_STAMP): $(NODE_DIR)/package.json $(NODE_DIR)/package-lock.json
	@command -v npm >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm)
	npm ci --prefix $(NODE_DIR) --no-audit --no-fund
	touch $(NODE_STAMP)

node-deps: $(NODE_STAMP)

# Headless Chromium and its driver (Debian packages) for the HTML report tests.
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver)

proto: install
	PATH="$(abspath $(BIN)):$$PATH" PYTHON=$(PY) scripts/gen_protos.sh
	PYTHON=$(PY) scripts/gen_descriptors.sh

# protos/epochlens.binpb: the contracts as one self-contained FileDescriptorSet (imports and
# comments included) for other languages' tooling; committed, made by `make proto` too.
descriptors: install
	PYTHON=$(PY) scripts/gen_descriptors.sh

# buf lint (buf.yaml) and buf breaking against EPOCHLENS_BUF_AGAINST (default HEAD~1); a clone
# without that commit skips the breaking check and says so (exit status 3 of the script).
contracts: install node-deps
	$(PY) scripts/check_contracts.py || [ $$? -eq 3 ]

# Fails when the committed generated code differs from what the protos give.
proto-check: install node-deps
	$(BIN)/pytest -q tests/unit/test_repository_hygiene.py tests/unit/test_contracts.py

# Starts the local PostgreSQL cluster when it is not accepting connections.
pg:
	@pg_isready -q -h 127.0.0.1 -p 5432 || pg_ctlcluster --skip-systemctl-redirect $$(ls /etc/postgresql) main start
	@for i in $$(seq 1 30); do pg_isready -q -h 127.0.0.1 -p 5432 && exit 0; sleep 1; done; \
	  echo "PostgreSQL did not start on 127.0.0.1:5432" >&2; exit 1

# PgBouncer (Debian package) for the tests that run the services behind it in transaction
# pooling mode (tests/pgbouncer.py starts a private one; the package's own service stays off).
pgbouncer:
	@command -v pgbouncer >/dev/null || test -x /usr/sbin/pgbouncer || \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq pgbouncer)

test: install pg pgbouncer browser node-deps
	$(BIN)/pytest $(PYTEST_ARGS)

test-unit: install node-deps
	$(BIN)/pytest tests/unit $(PYTEST_ARGS)

test-integration: install pg pgbouncer
	$(BIN)/pytest tests/integration $(PYTEST_ARGS)

test-e2e: install pg node-deps
	$(BIN)/pytest tests/e2e $(PYTEST_ARGS)

# The property-based fuzz suite at length (every RPC, 1500 examples each; `make test` runs
# the same suite with 100 each).
fuzz: install pg
	EPOCHLENS_FUZZ_PROFILE=long $(BIN)/pytest tests/fuzz -k postgres $(PYTEST_ARGS)

# A new .env: .env.example with fresh random secrets in place of its public example ones
# (an existing .env is left alone; `epochlens up` refuses the example secrets).
.env:
	python3 scripts/make_env.py .env.example .env

up: install .env
	$(BIN)/epochlens up

down: install
	$(BIN)/epochlens down

smoke: install .env
	$(BIN)/epochlens smoke

# The main job: a tiny model trained on CPU with predictions streamed every epoch and read
# back per epoch (trainer_client/demo.py, settings EPOCHLENS_DEMO_*). A stack already up
# (`make up`) is used and left running; with none up, the demo starts one on embedded
# SQLite and stops it again, also when a step fails or is interrupted.
demo: install .env
	$(PY) -m trainer_client.demo

bench: install pg browser
	$(PY) bench/ingest.py
	$(PY) bench/storage.py
	$(PY) bench/query.py
	$(PY) bench/generation.py
	$(PY) bench/distributed_pass.py
	$(PY) bench/trainer_overhead.py
	$(PY) bench/export.py
	$(PY) bench/report.py
	$(PY) bench/client_install.py
	$(PY) bench/metrics.py
	$(PY) bench/web.py
	$(PY) bench/replicas.py

lint: install
	$(BIN)/ruff check services tests bench trainer_client scripts clients/python

clean:
	rm -rf .epochlens .run
