# Paper experiments. Included by the top Makefile (which defines PY, STAMP and ARGS).
#
#   make degradation [DATA=data/cifar10] [DEGRADATION_ARGS="schedule.max_iters=200"] [ARGS=...]
#   make degradation SEEDS=5 [DEGRADATION_NETS="plain20 plain32 plain44 plain56 resnet20 resnet32 resnet44 resnet56 resnet110"]
#   make degradation-report [SEEDS=5]  # only redo the figure and table from finished runs
#
# The degradation problem (He et al. 2015, Sec. 4.2 and Fig. 6): on CIFAR-10, plain-56 has
# higher training *and* test error than plain-20, while ResNet-56 beats ResNet-20. The four
# networks train one after another (each uses the whole machine) into
# <checkpoint.storage_path>/<name>/ (runs/<name>/ by default), all in the W&B group
# `degradation-cifar10` so one dashboard chart holds them; then `pipeline report` draws the
# curves and the table against the paper into DEGRADATION_REPORT, and the last lines give the
# command that builds the same view as a W&B report (`pipeline dashboard`, docs/wandb.md).
#
# DEGRADATION_ARGS and ARGS are dotted config overrides appended to every run (and used to
# find the run folders for the report), e.g. a short CPU check:
#   make degradation DATA=data/cifar-synth DEGRADATION_ARGS="schedule.max_iters=200"
# DEGRADATION_TRAIN_FLAGS go to `pipeline train` itself, e.g. --no-ray (one process, no Ray).
#
# SEEDS=k: each network k times (seeds 0..k-1) as Ray Tune trials (`pipeline sweep`), as many at
# once as the cluster's GPUs allow (one after another on a machine without GPUs), run folders and
# W&B runs named <config name>-seed<i>. Re-running the same command finishes only what is missing:
# runs with a summary.json are skipped, interrupted ones resume from their checkpoints. The report
# then shows per network the mean curves with min-max bands over seeds, mean ± std of the final
# errors, and the verdict (plain-56 vs plain-20, ResNet-56 vs ResNet-20) with margin and spread.
# DEGRADATION_SWEEP_ARGS go to `pipeline sweep`, e.g. "--cpus-per-trial 1 --max-concurrent 4".

DEGRADATION_NETS ?= plain20 plain56 resnet20 resnet56
DEGRADATION_CONFIGS ?= $(foreach net,$(DEGRADATION_NETS),configs/cifar10/$(net).yaml)
SEEDS ?=
DEGRADATION_SWEEP_ARGS ?=
DEGRADATION_DATA ?= $(if $(DATA),$(DATA),data/cifar10)
DEGRADATION_ARGS ?=
DEGRADATION_TRAIN_FLAGS ?=
DEGRADATION_REPORT ?= runs/degradation-report
# Group first so that DEGRADATION_ARGS / ARGS can still rename it.
DEGRADATION_OVERRIDES = data.root=$(DEGRADATION_DATA) tracking.group=degradation-cifar10 $(DEGRADATION_ARGS) $(ARGS)

# Prints each config's run folder exactly as training resolves it (name, storage path and
# overrides included), so the report finds the runs wherever they went.
define _DEGRADATION_RUN_DIRS_PY
import sys
from pipeline.config import load_config
from pipeline.store.rundir import run_location
for path in sys.argv[1].split():
    cfg = load_config(path, sys.argv[2:])
    print(run_location(cfg.checkpoint.storage_path, cfg.name))
endef
export _DEGRADATION_RUN_DIRS_PY

# Prints the `pipeline dashboard` command for these runs, with the W&B entity, project and group
# they were logged under (the first config's, overrides included).
define _DEGRADATION_DASHBOARD_PY
import sys
from pipeline.config import load_config
from pipeline.tracking.dashboard import print_dashboard_command
t = load_config(sys.argv[1].split()[0], sys.argv[2:]).tracking
print_dashboard_command("degradation", t, " (the paper's Fig. 6)")
endef
export _DEGRADATION_DASHBOARD_PY

.PHONY: degradation degradation-report

# The configs and seeds as `pipeline sweep` arguments (SEEDS set).
DEGRADATION_SWEEP = --configs $(DEGRADATION_CONFIGS) --seeds $(SEEDS)

degradation: $(STAMP)
ifeq ($(strip $(SEEDS)),)
	@set -e; for cfg in $(DEGRADATION_CONFIGS); do \
		echo "== degradation: $$cfg"; \
		$(PY) -m pipeline train $(DEGRADATION_TRAIN_FLAGS) --config $$cfg $(DEGRADATION_OVERRIDES); \
	done
else
	$(PY) -m pipeline sweep $(DEGRADATION_SWEEP) $(DEGRADATION_SWEEP_ARGS) $(DEGRADATION_OVERRIDES)
endif
	@$(MAKE) --no-print-directory degradation-report

degradation-report: $(STAMP)
	@set -e; dirs="$$($(if $(strip $(SEEDS)),$(PY) -m pipeline sweep $(DEGRADATION_SWEEP) --list $(DEGRADATION_OVERRIDES),$(PY) -c "$$_DEGRADATION_RUN_DIRS_PY" "$(DEGRADATION_CONFIGS)" $(DEGRADATION_OVERRIDES)))"; \
	$(PY) -m pipeline report --runs $$dirs --out $(DEGRADATION_REPORT); \
	$(PY) -c "$$_DEGRADATION_DASHBOARD_PY" "$(DEGRADATION_CONFIGS)" $(DEGRADATION_OVERRIDES)
