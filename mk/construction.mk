# The paper's constructed solution as an experiment. Included by the top Makefile (PY, STAMP, ARGS).
#
#   make construction [DATA=data/cifar10] [SEEDS=3] [CONSTRUCTION_ARGS="schedule.max_iters=200"] [ARGS=...]
#   make construction-report [SEEDS=3]   # only redo the figures, table and verdict from the runs
#
# He et al. (2015, Sec. 1): a deeper net built from a trained shallower one (copied layers, added
# identity blocks) has no higher training error, yet solvers trained from scratch do worse. For
# plain-20 -> plain-56 and ResNet-20 -> ResNet-56, `python -m pipeline construction` trains the
# shallower net, builds the deeper one from it (`pipeline deepen`), then trains three runs on the
# same budget and seeds: the deeper net from the construction, from scratch, and the shallower
# one continued; all as Ray Tune trials (`pipeline sweep`'s) in the W&B group construction-cifar10,
# resumable (re-running finishes only what is missing). Then `pipeline report --kind construction`
# writes CONSTRUCTION_REPORT/report.md (table, verdict) and one figure per family.
#
# SEEDS=k: each run k times (seeds 0..k-1; default 1). CONSTRUCTION_ARGS and ARGS: dotted config
# overrides for every run. CONSTRUCTION_SWEEP_ARGS go to the command, e.g. "--cpus-per-trial 1".

CONSTRUCTION_DATA ?= $(if $(DATA),$(DATA),data/cifar10)
CONSTRUCTION_ARGS ?=
CONSTRUCTION_SWEEP_ARGS ?=
CONSTRUCTION_REPORT ?= runs/construction-report
CONSTRUCTION_SEEDS = $(if $(strip $(SEEDS)),$(SEEDS),1)
CONSTRUCTION_OVERRIDES = data.root=$(CONSTRUCTION_DATA) $(CONSTRUCTION_ARGS) $(ARGS)

define _CONSTRUCTION_DASHBOARD_PY
import sys
from pipeline.config import load_config
from pipeline.construction.experiment import GROUP
from pipeline.tracking.dashboard import print_dashboard_command
t = load_config("configs/cifar10/plain20.yaml", [f"tracking.group={GROUP}", *sys.argv[1:]]).tracking
print_dashboard_command("construction", t)
endef
export _CONSTRUCTION_DASHBOARD_PY

.PHONY: construction construction-report

construction: $(STAMP)
	$(PY) -m pipeline construction --seeds $(CONSTRUCTION_SEEDS) $(CONSTRUCTION_SWEEP_ARGS) $(CONSTRUCTION_OVERRIDES)
	@$(MAKE) --no-print-directory construction-report

construction-report: $(STAMP)
	@set -e; dirs="$$($(PY) -m pipeline construction --seeds $(CONSTRUCTION_SEEDS) --list $(CONSTRUCTION_OVERRIDES))"; \
	$(PY) -m pipeline report --kind construction --runs $$dirs --out $(CONSTRUCTION_REPORT); \
	$(PY) -c "$$_CONSTRUCTION_DASHBOARD_PY" $(CONSTRUCTION_OVERRIDES)
