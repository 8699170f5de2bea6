# The drill: a cluster with no shared filesystem on this one machine, and what a run on it loses.
# Included by the top Makefile (which defines PY and STAMP). Needs root (a mount namespace per node).
#
#   make drill                      # rank 0's node, then the job, then the head: ~4 min on 2 cores
#   make drill DRILL_ARGS="--kill rank0"       # rank 0's node lost and replaced only
#   make drill DRILL_ARGS="--epochs 30 --model resnet18 --crop 64"   # any default can be changed
#   make drill DRILL_ARGS="--layout sharded"   # the dataset as `data shard`'s shards, a cache per node
#   make drill DRILL_ARGS="--layout sharded --kill rank0 --faults 503:10,cut:20"   # shard GETs fail too
#   make drill DRILL_ARGS="--kill head"        # the head and its workers lost, a new cluster, the job again
#   make drill DRILL_ARGS="--kill stop,head --epochs 8"   # `ray job stop` and the job again, then the head
#   make drill DRILL_ARGS=--keep    # keep the logs and the merged W&B run even when every check passes
#
# A local S3 server, a Ray head and three worker nodes (cluster/localnodes.py; each in its own
# mount namespace with a private /tmp), the demo (cifar_resnet20, 24 epochs on 256 images)
# submitted as `make submit` does; rank 0's node killed mid-epoch and replaced, the job stopped
# and submitted again, the head lost and the job submitted to a new cluster, each mid-epoch
# (cluster/drill_cluster.py); then one PASS/FAIL line per check
# (cluster/drill_checks.py). Exit 0 when all pass.

DRILL_ARGS ?=

.PHONY: drill

drill: $(STAMP)
	$(PY) cluster/drill.py $(DRILL_ARGS)
