# Entry points: `make demo`, `make test`, `make train-imagenet DATA=/path/to/imagenet`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
CONFIG ?= configs/imagenet/resnet50.yaml
ARGS ?=
DEMO_DATA := data/synth-demo
export PYTHONUNBUFFERED := 1
export RAY_DEDUP_LOGS := 0
.DEFAULT_GOAL := install

.PHONY: install demo test test-fast lint clean train-imagenet

# Cluster submission (mk/cluster.mk) and experiment targets (mk/experiments.mk, mk/bench.mk).
-include $(wildcard mk/*.mk)

# Says which torch and DALI builds are installed and the NVIDIA driver they need (README,
# "Older NVIDIA drivers").
install: $(STAMP)
	@$(PY) -m pipeline.build_info

# Re-installs only when pyproject.toml changes; a re-run is instant. uv installs the pinned
# dependencies (7 GB unpacked) in parallel and from its cache, linked rather than copied: a fresh
# clone's install took 20 s warm, 41 s cold, against about 100 s with pip. It compiles them here,
# once: where PYTHONDONTWRITEBYTECODE is set (as on CI), Python would otherwise compile torch and
# Ray again in every process, about 6 s per Ray worker or CLI run. pip stays in .venv for users.
UV_VERSION := 0.13.10
$(STAMP): pyproject.toml
	@test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check uv==$(UV_VERSION)
	$(VENV)/bin/uv pip install --quiet --python $(PY) --compile-bytecode -e '.[dev]'
	@touch $(STAMP)

$(DEMO_DATA)/.complete: | $(STAMP)
	$(PY) -m pipeline data synth --out $(DEMO_DATA) --classes 10 --train-per-class 100 --val-per-class 20 --seed 0
	@touch $@

# A fresh run every time (a kept runs/demo would be resumed, not retrained).
demo: $(STAMP) $(DEMO_DATA)/.complete
	rm -rf runs/demo
	WANDB_MODE=$${WANDB_MODE:-offline} $(PY) -m pipeline train --config configs/demo.yaml data.root=$(DEMO_DATA) $(ARGS)

# Tests run in TEST_WORKERS processes (pytest-xdist). `make test` keeps each file's tests in one
# process and the multi-node files in one group (tests/conftest.py), so two clusters of Ray nodes
# never run at once; `make test-fast` hands out single tests. TEST_WORKERS=0: no extra process.
TEST_WORKERS ?= 2
test: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadgroup --no-loadscope-reorder $(PYTEST_ARGS)

# The inner loop: the unit tiers only (about 2 minutes on two cores); `make test` is the whole suite CI runs.
test-fast: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist worksteal -m "not slow and not ray and not cluster" $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check pipeline tests cluster
	$(VENV)/bin/ruff format --check pipeline tests cluster

# One Ray worker per local GPU (none: one CPU worker); ARGS may still set cluster.num_workers.
GPUS ?= $(shell nvidia-smi -L 2>/dev/null | grep -c '^GPU')
train-imagenet: $(STAMP)
	@if [ -z "$(DATA)" ]; then echo "error: DATA is not set. Usage: make train-imagenet DATA=/path/to/imagenet [CONFIG=$(CONFIG)] [ARGS=\"key=value ...\"]" >&2; exit 2; fi
	$(PY) -m pipeline data check-layout $(DATA)
	$(PY) -m pipeline train --config $(CONFIG) data.root=$(DATA) $(if $(filter-out 0,$(GPUS)),cluster.num_workers=$(GPUS)) $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache runs wandb data/synth-* bench-results
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
