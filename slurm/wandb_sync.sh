#!/bin/bash
# Live W&B dashboards for jobs on compute nodes without internet: run THIS on a login node (it has internet),
# not through sbatch. The jobs write a sync request to a shared directory after each checkpoint and validation;
# this watcher runs `wandb sync` for each, one at a time per run, in segment order (a requeued job's parts).
#
#   SYNC=/shared/$USER/wandb-requests                      # a directory both the nodes and the login node see
#   sbatch slurm/train.sh configs/dsprites_beta.yaml logger.wandb.mode=offline logger.wandb.sync_dir=$SYNC
#   nohup bash slurm/wandb_sync.sh $SYNC > logs/wandb-sync.log 2>&1 &     # keeps watching (every 30 s)
#   # or from cron, one pass every 5 minutes (a pass still running makes the next one exit at once):
#   # */5 * * * * cd /path/to/repo && bash slurm/wandb_sync.sh /shared/$USER/wandb-requests --once >> logs/wandb-sync.log 2>&1
#
# Needs `wandb login` (or WANDB_API_KEY) on the login node only. One log line per sync; a failed sync is
# retried with a back-off (30 s doubling to 15 min) and holds back that run's later parts.
set -euo pipefail
# --- environment: module loads and venv/conda activation go here (the same as in train.sh) --------------
exec python -m pipeline.sync watch "$@"
