# One entry point for set-up, demo, tests, lint and benchmarks. Every target creates and
# fills .venv first if it is missing or older than pyproject.toml.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
ARTIFACTS ?= artifacts
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: setup demo nightly test test-fast lint format bench bench-quick bench-gpu redis haproxy wrk clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch pinned exactly first: a range would pull a multi-GB CUDA build.
	$(BIN)/python -m pip install --quiet torch==2.13.0 fbgemm-gpu-cpu==1.8.0
	$(BIN)/python -m pip install --quiet -e '.[dev,ray]'
	# torchrec declares the CUDA-only fbgemm-gpu; fbgemm-gpu-cpu provides the same module.
	$(BIN)/python -m pip install --quiet --no-deps torchrec==1.8.0
	$(BIN)/python -c "import torchrec, fbgemm_gpu, polars, annoy, redis; print('environment ok')"
	touch $(STAMP)

setup: $(STAMP)  ## create .venv with `recsys` on its PATH

demo: $(STAMP)  ## fetch MovieLens-100K, build a version, serve it, ask it over HTTP
	$(BIN)/recsys build --data "$$($(BIN)/recsys data fetch ml-100k)" --artifacts $(ARTIFACTS)/ml-100k --no-progress
	$(BIN)/python -m recsys.demo --artifacts $(ARTIFACTS)/ml-100k --user 1 --k 10

# `make nightly ARTIFACTS=/srv/recsys [DATA=/srv/logs]`: a rebuild of the current version from
# the inputs and settings it remembers (DATA overrides the log); by default the MovieLens-100K
# version of `make demo`. Schedulers call `recsys build` directly (docs/operations.md): make
# reports every failure as 2, which hides the gate's 3.
DATA ?=
KEEP ?= 5
nightly: $(STAMP)  ## one nightly rebuild: warm start, quality gate, atomic promotion, pruning
	$(BIN)/recsys build --artifacts $(if $(filter artifacts,$(ARTIFACTS)),$(ARTIFACTS)/ml-100k,$(ARTIFACTS)) \
	  $(if $(DATA),--data "$(DATA)") --keep $(KEEP) --no-progress

redis:  ## make sure a redis-server binary exists (tests start one if none answers)
	@command -v redis-server >/dev/null 2>&1 || redis-cli -u "$${REDIS_URL:-redis://127.0.0.1:6379/0}" ping >/dev/null 2>&1 \
	  || (apt-get update -qq && apt-get install -y -qq redis-server)

haproxy:  ## make sure haproxy exists (the load-balancer tests run it in front of several hosts)
	@command -v haproxy >/dev/null 2>&1 || test -x /usr/sbin/haproxy \
	  || (apt-get update -qq && apt-get install -y -qq haproxy)

test: $(STAMP) redis haproxy  ## the whole test suite (what CI runs)
	$(BIN)/python -m pytest -q

test-fast: $(STAMP) redis  ## unit and property tests, no model builds or services: under a minute
	$(BIN)/python -m pytest -q -m "not slow"

lint: $(STAMP)  ## ruff, mypy and the import contracts (pyproject.toml), as CI runs them
	$(BIN)/ruff check recsys features training serving data tests
	$(BIN)/ruff format --check recsys features training serving data tests
	$(BIN)/mypy
	MYPYPATH=tests $(BIN)/mypy -p bench
	$(BIN)/lint-imports --no-cache

format: $(STAMP)
	$(BIN)/ruff check --fix recsys features training serving data tests
	$(BIN)/ruff format recsys features training serving data tests

# Benchmarks live in tests/bench (dev-only, outside the installed package); ONLY=SECTION runs
# one section, e.g. `make bench ONLY=quality-sets`.
ONLY ?=
bench: $(STAMP) redis wrk  ## full benchmarks (tables + PNG plots in bench_results/)
	PYTHONPATH=tests $(BIN)/python -m bench $(if $(ONLY),--only $(ONLY))

bench-quick: $(STAMP) redis wrk  ## the same benchmarks on smaller data, for everyday use
	PYTHONPATH=tests $(BIN)/python -m bench --quick $(if $(ONLY),--only $(ONLY))

bench-gpu: $(STAMP)  ## on a machine with a GPU: the environment, then CPU and CUDA training examples/s
	PYTHONPATH=tests $(BIN)/python -m bench.gpu

wrk:  ## the HTTP load generator used by the serving benchmark
	@command -v wrk >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq wrk)

clean:
	rm -rf $(ARTIFACTS) bench_results .pytest_cache .mypy_cache .ruff_cache
