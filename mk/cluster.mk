# Ray Jobs on a running cluster (cluster/README.md).
#
#   make submit CONFIG=configs/imagenet/resnet50.yaml ADDRESS=http://127.0.0.1:8265 ARGS="data.root=/mnt/imagenet"
#   make submit ... RUNTIME_ENV=cluster/runtime_env_pip.yaml   # opt in: install the pins per job
#   make job-logs JOB=<id>        # follows until the job ends; FOLLOW=0 prints what is there
#   make job-status JOB=<id>
#   make job-stop JOB=<id>
#
# ADDRESS is the dashboard URL, defaulting to $RAY_API_SERVER_ADDRESS or $RAY_ADDRESS. The
# templates keep the dashboard off the internet, so it is normally a local port forward
# (`ray dashboard cluster/aws/cluster.yaml`, `kubectl port-forward svc/resnet-head-svc 8265`).
# The default RUNTIME_ENV sends the code and a few environment variables, no packages: the
# cluster must already have the dependencies (cluster/Dockerfile's image, the launcher's
# setup_commands, or `ray start` from this project's .venv). cluster/README.md says when to use
# cluster/runtime_env_pip.yaml instead and what it costs.
#
# Every template runs Ray with token authentication: these targets default RAY_AUTH_MODE to
# `token` and need the cluster's token in $RAY_AUTH_TOKEN, in the file named by
# $RAY_AUTH_TOKEN_PATH, or in ~/.ray/auth_token (RAY_AUTH_MODE=disabled opts out).

.PHONY: submit job-logs job-status job-stop

ADDRESS ?= $(or $(RAY_API_SERVER_ADDRESS),$(RAY_ADDRESS))
RUNTIME_ENV ?= cluster/runtime_env.yaml
SUBMISSION_ID ?=
FOLLOW ?= 1
JOB ?=
CLUSTER_RAY := $(VENV)/bin/ray
# The Ray CLI colours its own lines whenever TERM is set; only a terminal should get colour codes.
CLUSTER_COLOR = $$([ -t 1 ] || echo --log-color=false)

# $(call cluster_require,VAR,usage): shell code that stops with exit 2 when VAR is empty.
cluster_require = if [ -z "$(strip $($(1)))" ]; then echo "error: $(1) is not set. Usage: $(2)" >&2; exit 2; fi

# A plain host:port or "auto" would make the Jobs client go looking for a local GCS instead.
define cluster_check_address
$(call cluster_require,ADDRESS,$(1)); \
case "$(ADDRESS)" in http://*|https://*) ;; \
  *) echo "error: ADDRESS must be the dashboard URL, e.g. http://127.0.0.1:8265 (got '$(ADDRESS)')" >&2; exit 2;; esac; \
if [ "$${RAY_AUTH_MODE:-token}" = token ] && [ -z "$$RAY_AUTH_TOKEN" ] \
   && [ ! -s "$${RAY_AUTH_TOKEN_PATH:-$$HOME/.ray/auth_token}" ]; then \
  echo "error: no Ray auth token: set RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH, or put it in ~/.ray/auth_token (cluster/README.md, 'Auth token')" >&2; exit 2; fi
endef

SUBMIT_USAGE := make submit CONFIG=configs/... ADDRESS=http://HEAD:8265 [ARGS=\"key=value ...\"]
JOB_USAGE = make $@ JOB=<submission id> [ADDRESS=http://HEAD:8265]

submit: | $(STAMP)
	@# CONFIG has a default in the Makefile; a submission must name its experiment explicitly.
	@if [ "$(origin CONFIG)" = file ] || [ -z "$(strip $(CONFIG))" ]; then \
	  echo "error: CONFIG is not set. Usage: $(SUBMIT_USAGE)" >&2; exit 2; fi
	@$(call cluster_check_address,$(SUBMIT_USAGE))
	@# The job runs from the uploaded working dir, so the config must be a file inside it.
	@case "$(CONFIG)" in /*|../*) echo "error: CONFIG must be a path inside this checkout (it is uploaded with the job), got '$(CONFIG)'" >&2; exit 2;; esac; \
	if [ ! -f "$(CONFIG)" ]; then echo "error: CONFIG file not found: $(CONFIG)" >&2; exit 2; fi; \
	if [ ! -f "$(RUNTIME_ENV)" ]; then echo "error: RUNTIME_ENV file not found: $(RUNTIME_ENV)" >&2; exit 2; fi
	@# Say which environment the job gets: a pip section costs minutes per node (cluster/README.md).
	@if grep -qE '^(pip|uv|conda):' "$(RUNTIME_ENV)"; then \
	  echo "runtime env: $(RUNTIME_ENV) (installs packages on every node the job uses)"; \
	else echo "runtime env: $(RUNTIME_ENV) (no packages: the nodes must already have the project's dependencies)"; fi
	@id='$(SUBMISSION_ID)'; \
	[ -n "$$id" ] || id="$(notdir $(basename $(CONFIG)))-$$(date -u +%Y%m%d-%H%M%S)-$$(od -An -N3 -tx1 /dev/urandom | tr -d ' \n')"; \
	RAY_AUTH_MODE=$${RAY_AUTH_MODE:-token} $(CLUSTER_RAY) job submit --address "$(ADDRESS)" --submission-id "$$id" \
	  --working-dir . --runtime-env "$(RUNTIME_ENV)" --no-wait \
	  -- sh cluster/scripts/job_python.sh -m pipeline train --config $(CONFIG) $(ARGS) >&2 || exit $$?; \
	echo "submitted: $$id"; \
	echo "  follow:  make job-logs JOB=$$id ADDRESS=$(ADDRESS)"; \
	echo "  status:  make job-status JOB=$$id ADDRESS=$(ADDRESS)"; \
	echo "  stop:    make job-stop JOB=$$id ADDRESS=$(ADDRESS)"

job-logs: | $(STAMP)
	@$(call cluster_require,JOB,$(JOB_USAGE)); $(call cluster_check_address,$(JOB_USAGE))
	@RAY_AUTH_MODE=$${RAY_AUTH_MODE:-token} $(CLUSTER_RAY) job logs $(CLUSTER_COLOR) --address "$(ADDRESS)" \
	  $(if $(filter 0 no false,$(FOLLOW)),,--follow) "$(JOB)"

job-status: | $(STAMP)
	@$(call cluster_require,JOB,$(JOB_USAGE)); $(call cluster_check_address,$(JOB_USAGE))
	@RAY_AUTH_MODE=$${RAY_AUTH_MODE:-token} $(CLUSTER_RAY) job status $(CLUSTER_COLOR) --address "$(ADDRESS)" "$(JOB)"

job-stop: | $(STAMP)
	@$(call cluster_require,JOB,$(JOB_USAGE)); $(call cluster_check_address,$(JOB_USAGE))
	@RAY_AUTH_MODE=$${RAY_AUTH_MODE:-token} $(CLUSTER_RAY) job stop --address "$(ADDRESS)" "$(JOB)"
