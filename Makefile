# scangate developer entry points. `make test` and `make demo` work from a fresh
# checkout: they create the virtualenv and build the cached test binaries first.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
SANDBOX_DIR ?= $(CURDIR)/.sandbox

.PHONY: all deps venv testbin lint test test-realnode unit demo sandbox-up sandbox-down crds clean bench image \
	bench-scale bench-registry bench-admission bench-overhead

all: test

venv: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

deps:
	hack/deps

testbin: deps
	hack/testbin
	hack/promtool >/dev/null

lint: venv
	$(BIN)/ruff check operator tests bench sandbox
	$(BIN)/mypy

unit: venv
	$(BIN)/pytest -q -m "not sandbox"

# The fast tier (the emulated node), then the real-node tier (make test-realnode). The
# real node's binaries and the images build in the background, niced, while the fast tier
# runs (a few minutes when ~/.cache/scangate is cold, seconds when warm).
test: deps venv testbin lint
	@log="$${TMPDIR:-/tmp}/scangate-prebuild-$$$$.log"; \
	( nice -n 10 hack/testbin --node && nice -n 10 hack/image ) > "$$log" 2>&1 & prebuild=$$!; \
	fast=0; $(BIN)/pytest -v --durations=30 -m "not realnode" || fast=$$?; \
	if ! wait $$prebuild; then \
	  echo "the real node's binaries or the images failed to build:" >&2; cat "$$log" >&2; exit 1; fi; \
	rm -f "$$log"; \
	[ $$fast = 0 ] || exit $$fast; \
	$(MAKE) --no-print-directory test-realnode

# The real node (containerd, kubelet) with the shipped images and the chart; needs root.
test-realnode: deps venv testbin
	@[ "$$(id -u)" = 0 ] || { echo "make test-realnode needs root (bridges, mounts, cgroups, buildah)" >&2; exit 1; }
	hack/testbin --node >/dev/null
	$(BIN)/pytest -v --durations=10 -m realnode tests/realnode

# The operator image (the Dockerfile) and the scan image, with buildah (hack/image);
# make image SANDBOX_DIR=DIR also pushes them to that sandbox's registry.
image: deps venv
	hack/image $(if $(filter command line environment,$(origin SANDBOX_DIR)),--push $(SANDBOX_DIR))

sandbox-up: deps venv testbin
	hack/sandbox up --dir $(SANDBOX_DIR)

sandbox-down: venv
	hack/sandbox down --dir $(SANDBOX_DIR)

# make demo: the whole story, then the sandbox stays up until Ctrl-C;
# make demo ARGS=--no-wait: unattended, cleans up at the end.
demo: deps venv testbin
	hack/demo $(ARGS)

# Every benchmark on one sandbox of its own, each target's PASS or MISS, the figures into
# bench/results.json and the admission latency plot into bench/admission-latency.png
# (bench/README.md); about 15 minutes on 2 cores. Try it small: make bench ARGS=--quick
bench: deps testbin $(VENV)/.bench-installed
	$(BIN)/python bench/all.py $(ARGS)

$(VENV)/.bench-installed: $(VENV)/.installed
	$(BIN)/pip install -q -e '.[dev,bench]'
	touch $@

# The scale benchmark on a sandbox of its own (bench/README.md); e.g.
# make bench-scale ARGS="--count 1000 --new 100 --sandbox-dir /tmp/sb"
bench-scale: deps venv testbin
	$(BIN)/python bench/scale.py $(ARGS)

# Push latency and the enumeration of 5,000 tags (bench/README.md), e.g.
# make bench-registry ARGS="--repositories 20 --tags 5 --sandbox-dir /tmp/sb"
bench-registry: deps venv testbin
	$(BIN)/python bench/registry.py $(ARGS)

# Admission latency through the API server and under vegeta (bench/README.md), e.g.
# make bench-admission ARGS="--scans 1000 --creates 100 --sandbox-dir /tmp/sb"
bench-admission: deps venv testbin
	$(BIN)/python bench/admission.py $(ARGS)

# ImageScan against the same `trivy image` run directly, ClientServer and Standalone, e.g.
# make bench-overhead ARGS="--rounds 1 --sandbox-dir /tmp/sb"
bench-overhead: deps venv testbin
	$(BIN)/python bench/overhead.py $(ARGS)

clean:
	-hack/sandbox down --dir $(SANDBOX_DIR)
	rm -rf $(VENV) $(SANDBOX_DIR) .mypy_cache .ruff_cache .pytest_cache
