# Tally developer commands. `make run` and `make test` are the README's quick start.
SHELL := /bin/bash
PYTHON ?= python3.11
TOOLS := .tools
UV := $(TOOLS)/bin/uv
VENV := .venv
PY := $(VENV)/bin/python
BUF := $(TOOLS)/node/node_modules/.bin/buf
UV_VERSION := 0.13.8
BUF_VERSION := 1.75.0
export UV_PYTHON_DOWNLOADS := never

.PHONY: env gen run demo test lint fmt bench bench-ledger bench-gateway bench-purchases dev-token validate-deploy image

$(UV):
	$(PYTHON) -m venv $(TOOLS)
	$(TOOLS)/bin/pip install --quiet --disable-pip-version-check uv==$(UV_VERSION)

$(VENV)/.synced: $(UV) pyproject.toml uv.lock
	$(UV) sync --frozen --python $(PYTHON)
	touch $@

env: $(VENV)/.synced  ## create or update the virtual environment from uv.lock

GENERATED := gen/.generated
PROTO_FILES := $(shell find protos -name '*.proto')

$(GENERATED): $(VENV)/.synced $(PROTO_FILES) scripts/gen_protos.py
	$(PY) scripts/gen_protos.py
	touch $@

gen: $(GENERATED)  ## generate the protobuf/gRPC package into gen/

run: gen  ## start the suite as local processes (catalog for now)
	$(PY) -m tally_launcher

demo: gen  ## drive a merchant's first day through the HTTP gateway (needs `make run` running)
	$(PY) scripts/demo.py

test: gen  ## run every test against the local PostgreSQL and RabbitMQ
	$(PY) -m pytest $(PYTEST_ARGS)

$(BUF):
	npm install --silent --prefix $(TOOLS)/node @bufbuild/buf@$(BUF_VERSION)

PROTODEPS := $(TOOLS)/protodeps

$(PROTODEPS): $(VENV)/.synced
	$(PY) scripts/copy_proto_deps.py $@

lint: env $(BUF) $(PROTODEPS)  ## buf lint (STANDARD) and ruff
	$(BUF) lint
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

fmt: env
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

bench: gen  ## catalog benchmark: GetProduct/ListProducts throughput and merchant provisioning time
	$(PY) bench/catalog_bench.py $(BENCH_ARGS)

bench-ledger: gen  ## ledger operations end to end, at a fixed rate, GetBalance by history length, pgbench ratio, soak
	$(PY) bench/ledger_bench.py $(BENCH_ARGS)

bench-purchases: gen  ## purchases through the payment gateway and the simulator until lot and receipt exist
	$(PY) bench/purchase_bench.py $(BENCH_ARGS)

bench-gateway: gen  ## GET balance through the HTTP gateway and direct over gRPC
	$(PY) bench/gateway_bench.py $(BENCH_ARGS)

validate-deploy: env  ## Dockerfile, compose, Prometheus rules and tests, dashboards, RabbitMQ definitions, Helm chart
	bash scripts/validate_deploy.sh

image:  ## build the suite's image (needs a Docker engine)
	docker build -t tally:dev .

dev-token: gen  ## print a development JWT: make dev-token ROLE=admin MERCHANT=acme
	@$(PY) -m tally_kit.auth --role $(or $(ROLE),app) $(if $(MERCHANT),--merchant $(MERCHANT))
