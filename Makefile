# notify: the two commands that matter are `make run` and `make test`.
SHELL := /bin/bash
PYTHON_BOOT ?= $(shell command -v /usr/bin/python3.11 || command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Every process started from here (tests, the launcher, benchmarks) starts services as
# subprocesses while its own gRPC channels are open: gRPC's fork support would restart
# its poller in the forked child, where subprocess closes it, and the child aborts
# before exec (grpc/grpc#43055). Nothing uses gRPC in a forked child.
export GRPC_ENABLE_FORK_SUPPORT := false

.PHONY: run test venv gen gen-check certs lint typecheck buf pytest nightly bench lock clean

## run: start the whole system locally and send a demo notification (Ctrl-C stops it)
run: $(STAMP)
	$(PY) -m scripts.run_local

## test: every check CI runs: contracts, generated code, lint, types, the test suite
test: $(STAMP) buf gen-check lint typecheck pytest

venv: $(STAMP)
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON_BOOT) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

## gen: regenerate gen/ from proto/ (the only way gen/ changes)
gen: $(STAMP)
	$(PY) scripts/gen_protos.py

gen-check: $(STAMP)
	$(PY) scripts/gen_protos.py --check

certs: $(STAMP)
	$(PY) scripts/gen_certs.py --dir var/certs

## buf: lint the contracts and check them against the last released ones (proto/released.binpb)
buf: $(STAMP)
	$(VENV)/bin/buf lint
	$(VENV)/bin/buf breaking proto --against proto/released.binpb

## contracts-release: at a release, record the committed contracts as the new baseline
##   (REF=<tag or commit> to record another one; then commit proto/released.binpb)
REF ?= HEAD
.PHONY: contracts-release
contracts-release: $(STAMP)
	$(VENV)/bin/buf build '.git#ref=$(REF)' --exclude-source-info -o proto/released.binpb

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: $(STAMP)
	$(VENV)/bin/mypy .

pytest: $(STAMP)
	$(VENV)/bin/pytest -m "not nightly" -q

## nightly: the slow chaos/soak runs as well
nightly: $(STAMP)
	$(VENV)/bin/pytest -q

## bench: end-to-end throughput and latency through Envoy (see docs/BENCHMARKS.md)
bench: $(STAMP)
	$(PY) -m pip install -q -c constraints.txt -e '.[dev,bench]'
	$(PY) -m bench.e2e
	$(PY) -m bench.delivery

lock: $(STAMP)
	$(PY) -m pip freeze --exclude-editable | grep -v '^-e' > constraints.txt.new
	{ head -2 constraints.txt; cat constraints.txt.new; } > constraints.txt.tmp
	mv constraints.txt.tmp constraints.txt; rm constraints.txt.new

clean:
	rm -rf var build *.egg-info .pytest_cache .mypy_cache .ruff_cache
