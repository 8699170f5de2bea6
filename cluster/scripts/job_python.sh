#!/bin/sh
# Runs "$@" with the Python that runs Ray on this node: `make submit`'s job entrypoint
# (`sh cluster/scripts/job_python.sh -m pipeline train ...`).
#
# A Ray job's entrypoint runs in a shell with the node's PATH, so a bare `python` is whatever
# that PATH finds first, not the Python that `ray start` ran from: nodes started as
# `.venv/bin/ray start` without the venv on PATH would run the system Python, without torch.
# The Python that runs Ray is the one this node's raylet starts its workers with (its
# --python_worker_command); the raylet is an ancestor of this process (raylet -> JobSupervisor
# -> sh). Order: $PIPELINE_PYTHON when set, that Python, then `python3` / `python` on PATH.
# Whichever is picked must import the project's dependencies, or this stops with exit 2 and says
# what to do, before any work.

raylet_python() {
    p=$$
    while [ -n "$p" ] && [ "$p" -gt 1 ] 2>/dev/null; do
        cmd=$(tr '\0' '\n' < "/proc/$p/cmdline" 2>/dev/null | sed -n 's/^--python_worker_command=//p' | head -n 1)
        if [ -n "$cmd" ]; then
            echo "${cmd%% *}"
            return 0
        fi
        # /proc/PID/stat: "pid (comm) state ppid ..."; comm may hold spaces, so cut after ")".
        p=$(sed 's/.*) //' "/proc/$p/stat" 2>/dev/null | cut -d' ' -f2)
    done
    return 1
}

py=${PIPELINE_PYTHON:-}
how="PIPELINE_PYTHON"
if [ -z "$py" ]; then
    py=$(raylet_python) && how="this node's Ray (raylet)"
fi
if [ -z "$py" ]; then
    py=$(command -v python3 || command -v python) && how="PATH"
fi
if [ -z "$py" ] || ! "$py" -c "import torch, torchvision, ray, nvidia.dali, wandb, yaml" 2>/dev/null; then
    echo "error: no Python with the project's dependencies on this node: tried ${py:-none} (from $how)." >&2
    echo "  Start Ray on every node from the project's environment (PATH=/path/to/.venv/bin:\$PATH ray start ...)," >&2
    echo "  set PIPELINE_PYTHON=/path/to/python in the job's runtime env (env_vars), or submit with" >&2
    echo "  RUNTIME_ENV=cluster/runtime_env_pip.yaml to install the pins per job (cluster/README.md)." >&2
    exit 2
fi
exec "$py" "$@"
