#!/bin/bash
# Offline twin of the W&B sweep: array task i trains grid point i of configs/sweep.yaml, W&B offline,
# grouped under the sweep's name. Same sweep file, no W&B server needed (sync later with wandb sync).
#
#   mkdir -p logs && sbatch --array=0-5 slurm/grid.sh                  # all 6 points of the grid
#   sbatch --array=0-$(( $(python -m pipeline.sweep configs/sweep.yaml --count) - 1 )) slurm/grid.sh
#   SWEEP_FILE=configs/other.yaml sbatch --array=0-3 slurm/grid.sh trainer.max_steps=2000
#
# Extra arguments are `pipeline.train` overrides applied to every point (after the point's own).
# Each task's run directory is runs/<job name>-<array job id>_<task id>, stable across requeues.
#
#SBATCH --job-name=grid
#SBATCH --array=0-5                  # one task per grid point (see --count above)
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1          # one GPU per grid point
#SBATCH --gpus-per-node=1            # --gpus-per-node=0 on the command line for CPU nodes
#SBATCH --cpus-per-task=8
#SBATCH --mem=32G
#SBATCH --time=24:00:00
#SBATCH --signal=USR1@90             # checkpoint and requeue before the time limit (Lightning)
#SBATCH --requeue                    # a requeued task re-runs the same point, in the same run dir
#SBATCH --open-mode=append
#SBATCH --output=logs/%x-%A_%a.out   # logs/ must exist
set -euo pipefail

# --- environment: module loads and venv/conda activation go here (as in slurm/train.sh) -------
# module load cuda/12.4
# source .venv/bin/activate
# -----------------------------------------------------------------------------------------------

SWEEP_FILE="${SWEEP_FILE:-configs/sweep.yaml}"
TASK="${SLURM_ARRAY_TASK_ID:?grid.sh is an array job: sbatch --array=0-N slurm/grid.sh}"
# The exact arguments a W&B agent would pass for this point (one per line; a value may hold spaces).
POINT_ARGS="$(python -m pipeline.sweep "$SWEEP_FILE" --index "$TASK")"
mapfile -t POINT <<< "$POINT_ARGS"
GROUP="$(python -m pipeline.sweep "$SWEEP_FILE" --name)"
echo "# $(date -Is) task ${TASK} restart ${SLURM_RESTART_COUNT:-0}: ${POINT[*]} (group ${GROUP})"

[[ -n "${SLURM_CPUS_PER_TASK:-}" ]] && export SRUN_CPUS_PER_TASK="$SLURM_CPUS_PER_TASK"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}"
exec srun --kill-on-bad-exit=1 python -m pipeline.train "${POINT[@]}" \
    logger.wandb.mode=offline logger.wandb.group="$GROUP" "$@"
