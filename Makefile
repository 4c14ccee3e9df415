# The single task entry point. On a fresh clone:
#   make demo   set up .venv, start the local mesh, place a demo order
#   make test   run the whole test suite (what .ci/run runs)
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
STATE ?= .state

.PHONY: setup demo up down status test unit compose-test bench protos system-deps clean

setup: $(STAMP)

# Host tools the local runner needs (network namespaces, a bridge, a rule for
# Docker's FORWARD policy). Installed from Debian's packages when missing.
system-deps:
	@scripts/install-system-deps.sh

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev]'
	@# xds-protos and opentelemetry-proto both install opentelemetry/proto/**;
	@# pip unpacks in no fixed order, and xds-protos' copy is older (no
	@# InstrumentationScope: OTLP export breaks). Put opentelemetry-proto's back.
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps --force-reinstall \
	  "$$(grep -o 'opentelemetry-proto==[0-9.]*' pyproject.toml)"
	touch $@

demo: setup system-deps
	$(BIN)/shopmesh up -d --state-dir $(STATE)
	$(BIN)/shopmesh demo --state-dir $(STATE)
	@echo
	@echo "The mesh keeps running: '$(BIN)/shopmesh status --state-dir $(STATE)', and '$(BIN)/shopmesh down --state-dir $(STATE)' to stop it."

up: setup system-deps
	$(BIN)/shopmesh up -d --state-dir $(STATE)

down: setup
	$(BIN)/shopmesh down --state-dir $(STATE)

status: setup
	$(BIN)/shopmesh status --state-dir $(STATE)

test: setup system-deps
	$(BIN)/python -m pytest

unit: setup
	$(BIN)/python -m pytest -m "not mesh"

# The compose suite alone: builds the images (and, without a registry, the
# local base image, docker/base/build.sh), runs the real compose.yaml under
# the Docker engine, tears it down. `make test` runs it too when an engine
# answers; SHOPMESH_REQUIRE_DOCKER=1 makes a missing engine a failure.
compose-test: setup
	$(BIN)/python -m pytest tests/compose

# The benchmarks (bench/): what the mesh costs and how it behaves under load.
# Under 10 minutes on 2 cores; prints the figures, writes bench/results.json
# and docs/benchmarks.md. Run it on a quiet machine (see the load average it prints).
bench: setup system-deps
	$(BIN)/python -m bench

protos: setup
	$(BIN)/python scripts/gen_protos.py

clean:
	rm -rf $(VENV) $(STATE) *.egg-info
