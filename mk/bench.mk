# Throughput benchmarks. Included by the top Makefile (which defines PY and STAMP).
#
#   make bench                  # loader, model, ray and engine benches on generated data -> bench-results/
#   make bench-loader           # one of them (bench-model, bench-ray likewise), then `make bench-table`
#   make bench BENCH_MODEL_ARGS="--model resnet18 --batch-size 16 --steps 10"
#
# Each bench writes bench-results/<name>.json (the full result: every run, the machine and its
# load, the exact command); bench-table renders them into bench-results/bench.md. They run
# one after another even under `make -j`: they measure the same cores. Copy the figures that
# matter into docs/benchmarks.md with the machine line.

BENCH_DATA := data/synth-bench
BENCH_OUT ?= bench-results
# The GPU count decides the model bench's default: on CUDA the ResNet-50 bf16 channels_last run at
# batch 256 whose figure docs/benchmarks.md asks for; on CPU a batch small enough for two cores,
# fp32 only (this CPU has no native bf16: `--variants bf16-cl` runs, emulated, about 10x slower).
BENCH_GPUS := $(shell nvidia-smi -L 2>/dev/null | grep -c '^GPU')
BENCH_LOADER_ARGS ?=
BENCH_MODEL_ARGS ?= $(if $(filter-out 0,$(BENCH_GPUS)),\
	--model resnet50_v1_5 --batch-size 256 --steps 30 --warmup 10 --variants bf16-cl$(comma)bf16-cl-compile$(comma)fp32-cl,\
	--model resnet50_v1_5 --batch-size 8 --steps 20 --warmup 2 --variants fp32$(comma)fp32-cl)
BENCH_RAY_ARGS ?= --global-batch 48 --max-worker-batch 8
# The training loop against the commit before the GPU-step changes: it must not be slower.
BENCH_ENGINE_ARGS ?= --baseline b9c611b
comma := ,

BENCH_LOADER = $(PY) -m pipeline bench loader --data $(BENCH_DATA) $(BENCH_LOADER_ARGS) --out $(BENCH_OUT)/loader.json
BENCH_MODEL = $(PY) -m pipeline bench model $(BENCH_MODEL_ARGS) --out $(BENCH_OUT)/model.json
BENCH_RAY = $(PY) -m pipeline bench ray $(BENCH_RAY_ARGS) --out $(BENCH_OUT)/ray.json
BENCH_ENGINE = $(PY) -m pipeline bench engine --data $(BENCH_DATA) $(BENCH_ENGINE_ARGS) --out $(BENCH_OUT)/engine.json

.PHONY: bench bench-loader bench-model bench-ray bench-engine bench-table

$(BENCH_DATA)/.complete: | $(STAMP)
	$(PY) -m pipeline data synth --out $(BENCH_DATA) --classes 8 --train-per-class 40 --val-per-class 8
	@touch $@

# Sequential in one recipe rather than as prerequisites, so that -j cannot overlap them.
bench: $(STAMP) $(BENCH_DATA)/.complete
	@echo "== bench loader (load average: $$(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null))"
	$(BENCH_LOADER)
	@echo "== bench model (load average: $$(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null))"
	$(BENCH_MODEL)
	@echo "== bench ray (load average: $$(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null))"
	$(BENCH_RAY)
	@echo "== bench engine (load average: $$(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null))"
	$(BENCH_ENGINE)
	@$(MAKE) --no-print-directory bench-table

bench-loader: $(STAMP) $(BENCH_DATA)/.complete
	$(BENCH_LOADER)

bench-model: $(STAMP)
	$(BENCH_MODEL)

bench-ray: $(STAMP)
	$(BENCH_RAY)

bench-engine: $(STAMP) $(BENCH_DATA)/.complete
	$(BENCH_ENGINE)

bench-table: $(STAMP)
	$(PY) -m pipeline bench table $(wildcard $(BENCH_OUT)/loader.json $(BENCH_OUT)/model.json $(BENCH_OUT)/ray.json $(BENCH_OUT)/engine.json) \
		--out $(BENCH_OUT)/bench.md
	@cat $(BENCH_OUT)/bench.md
