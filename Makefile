# Everything a fresh machine needs: `make serve`, `make test`. The virtual environment lives in .venv.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The CPU build of torch this machine keeps on disk; any other spec downloads a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0

.PHONY: install system-deps serve test lint clean

install: $(STAMP) system-deps

# redis-server (Debian's package) for the transfer ledger and its tests; needs root, as CI has.
system-deps:
	@command -v redis-server >/dev/null 2>&1 || { echo "installing redis-server"; \
	  apt-get install -y -q redis-server >/dev/null 2>&1 || \
	  { apt-get update -q >/dev/null && apt-get install -y -q redis-server >/dev/null; }; }

$(STAMP): pyproject.toml proto/clsa/v1/generation.proto
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e ".[dev]"
	$(BIN)/python -m services.api.stubs
	touch $(STAMP)

# The whole service on the shipped model: a private redis-server, a local Ray with one prefill and one
# decode worker, the gateway on $(PORT) and metrics on $(METRICS_PORT).
PORT ?= 50051
# The trained clsa-small shipped in models/ (MODEL=clsa-tiny: random weights, the smallest).
MODEL ?= models/clsa-small
METRICS_PORT ?= 9090
serve: install
	$(BIN)/clsa serve --model $(MODEL) --port $(PORT) --metrics-port $(METRICS_PORT)

test: install
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check services kernels tests bench
	$(BIN)/mypy

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache
