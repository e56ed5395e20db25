# Two commands do everything on a fresh machine:
#   make serve   create .venv, install Wafer and its default models, start the server
#   make test    the same set-up, then lint, type checks and the whole test suite

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.wafer-installed
# The Node.js client (clients/node) is the second-language check of the API: the suite runs it.
NPM ?= npm
NODE_CLIENT := clients/node
# Inside node_modules: `npm ci` wipes the folder, so a deleted or half-done install runs again.
NODE_STAMP := $(NODE_CLIENT)/node_modules/.wafer-installed
# llama.cpp is compiled by pip (minutes; pip's wheel cache makes later installs quick). Without
# OpenMP, ggml uses its own thread pool, which does not slow down when called from a worker thread.
LLAMA_CMAKE_ARGS ?= -DGGML_OPENMP=OFF
# Empty: the server's own setting (WAFER_ADDRESS, else 127.0.0.1:50051).
ADDRESS ?=
PYTEST_ARGS ?=

.PHONY: serve test install lock lint typecheck format proto unasync docs unit integration e2e bench clean

serve: install
	$(BIN)/wafer serve $(if $(ADDRESS),--address $(ADDRESS))

test: install lint typecheck
	$(BIN)/pytest $(PYTEST_ARGS)

install: $(STAMP) $(NODE_STAMP)

$(BIN)/python:
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Wafer needs Python 3.11 or newer")'
	$(PYTHON) -m venv $(VENV)

# Exactly the locked versions, each file checked against its hash; pip resolves nothing itself
# (--no-deps), and builds from source with the locked build tools (--no-build-isolation).
# Wafer itself goes in last, editable: pip cannot hash a source tree.
PIP_INSTALL := $(BIN)/python -m pip install --disable-pip-version-check --no-deps

$(STAMP): $(BIN)/python pyproject.toml requirements.lock requirements-build.lock
	$(PIP_INSTALL) --require-hashes -r requirements-build.lock
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PIP_INSTALL) --require-hashes --no-build-isolation -r requirements.lock
	$(PIP_INSTALL) --no-build-isolation -e .
	touch $@

$(NODE_STAMP): $(NODE_CLIENT)/package.json $(NODE_CLIENT)/package-lock.json
	$(NPM) ci --prefix $(NODE_CLIENT) --ignore-scripts --no-audit --no-fund
	touch $@

# Re-resolve every pinned version against the package index, on purpose: review the diff, then
# `make test`. tests/unit/test_lock.py fails while pyproject.toml and the locks disagree.
lock: install
	$(BIN)/python tools/lock.py

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

typecheck: install
	$(BIN)/mypy

# The only place code is generated from protos/. tests/unit/test_proto_drift.py fails if the
# committed stubs differ from what this would write.
proto: install
	$(BIN)/python tools/genproto.py

# The blocking client (_sync.py) is generated from the asyncio one (_async.py);
# tests/unit/test_sync_client_drift.py fails if the committed file differs.
unasync: install
	$(BIN)/python tools/unasync.py

# docs/api.md is generated from the proto comments; tests/unit/test_docs_drift.py fails on drift.
docs: install
	$(BIN)/python tools/gendocs.py

unit: install
	$(BIN)/pytest tests/unit $(PYTEST_ARGS)

integration: install
	$(BIN)/pytest tests/integration $(PYTEST_ARGS)

e2e: install
	$(BIN)/pytest tests/e2e $(PYTEST_ARGS)

# Each benchmark also runs alone (`.venv/bin/python -m bench.throughput --help`); they write their
# sections of bench/RESULTS.md. Run on a quiet machine: they compare against in-process baselines.
bench: install
	$(BIN)/python -m bench.throughput --write
	$(BIN)/python -m bench.ceiling --write
	$(BIN)/python -m bench.latency --write
	$(BIN)/python -m bench.contention --write
	$(BIN)/python -m bench.lifecycle --write
	$(BIN)/python -m bench.quantize --write
	$(BIN)/python -m bench.search --write
	$(BIN)/python -m bench.edge_threads --write
	$(BIN)/python -m bench.indexing --write
	$(BIN)/python -m bench.jobs --write
	$(BIN)/python -m bench.cde --write
	$(BIN)/python -m bench.decoder_embed --write
	$(BIN)/python -m bench.generation --write $(if $(LLAMA_SERVER),--llama-server $(LLAMA_SERVER))

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache $(NODE_CLIENT)/node_modules
