# The GPU proof (docs/gpu-check.md). Included by the top Makefile.
#
#   make gpu-check                               # every part this machine can run -> bench-results/gpu-check.json
#   make gpu-check GPU_CHECK_ARGS="--only dali_mixed_vs_cpu,ddp_nccl"   # some parts (--list names them)
#   make gpu-check GPU_PY=.venv/bin/python       # another interpreter
#   make gpu-bundle                              # DALI wheels for the GPU machine -> .gpu-bundle/, and its commands
#
# gpu-check needs torch, torchvision, DALI, NumPy, Pillow and PyYAML (no Ray, no W&B) and does
# not depend on the venv: on the GPU machine there is none, only that machine's python3 with
# the bundle on PYTHONPATH. It exits 0 (all passed), 1 (a check failed), 2 (bad arguments) or 3
# (no GPU: the CPU parts passed, the GPU parts were skipped). make itself exits 2 whenever a
# recipe fails, so the recipe prints the script's own code last. With $OUT set (the GPU
# machine's returned folder) the report goes to $OUT/gpu-check.json.

GPU_PY ?= $(if $(wildcard $(PY)),$(PY),python3)
GPU_CHECK_ARGS ?=
GPU_BUNDLE_DIR ?= .gpu-bundle
GPU_BUNDLE_PYTHON ?= 3.12
GPU_BUNDLE_ARGS ?=

.PHONY: gpu-check gpu-bundle

gpu-check:
	@echo "$(GPU_PY) -m pipeline.gpu.check $(GPU_CHECK_ARGS)"
	@$(GPU_PY) -m pipeline.gpu.check $(GPU_CHECK_ARGS); code=$$?; case $$code in \
	  0) ;; \
	  3) echo "gpu-check: exit 3, no GPU here: the CPU parts passed, the GPU parts were skipped (make exits 2)" >&2 ;; \
	  *) echo "gpu-check: exit $$code, see the report's failed parts (make exits 2)" >&2 ;; \
	esac; exit $$code

gpu-bundle:
	$(GPU_PY) -m pipeline.gpu.bundle build --out $(GPU_BUNDLE_DIR) --python-version $(GPU_BUNDLE_PYTHON) $(GPU_BUNDLE_ARGS)
