#!/bin/bash
# W&B sweep agents as an array job: each task asks the sweep for one run and trains it.
#
#   wandb sweep configs/sweep.yaml                     # prints ENTITY/PROJECT/SWEEP_ID
#   mkdir -p logs && sbatch --array=0-5 slurm/sweep.sh ENTITY/PROJECT/SWEEP_ID
#
# The agent runs the sweep's `command` (`python -m pipeline.train objective.beta=<value>`), so each
# run is an ordinary training run; its run directory is runs/sweep-<sweep id>-<W&B run id>
# (pipeline/launch/cluster.py). Needs a W&B login on the compute nodes; without internet use slurm/grid.sh.
# Not --requeue: a requeued task would ask the sweep for its next point, not resume this one; give
# --time enough for one full run (or use slurm/grid.sh, which resumes, on preemptible partitions).
#
#SBATCH --job-name=sweep
#SBATCH --array=0-5                  # at most one run per task (--count 1); 6 = the grid's size
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1          # one GPU per run: the agent starts one process
#SBATCH --gpus-per-node=1            # --gpus-per-node=0 on the command line for CPU nodes
#SBATCH --cpus-per-task=8
#SBATCH --mem=32G
#SBATCH --time=24:00:00
#SBATCH --output=logs/%x-%A_%a.out   # logs/ must exist
set -euo pipefail

# --- environment: module loads and venv/conda activation go here (as in slurm/train.sh) -------
# module load cuda/12.4
# source .venv/bin/activate            # the agent runs `python` from PATH: this environment's
# export WANDB_API_KEY=...             # or `wandb login` once; never commit a key
# -----------------------------------------------------------------------------------------------

SWEEP_ID="${1:?usage: sbatch --array=0-5 slurm/sweep.sh ENTITY/PROJECT/SWEEP_ID}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}"
echo "# $(date -Is) task ${SLURM_ARRAY_TASK_ID:-0} of sweep ${SWEEP_ID}"
exec wandb agent --count 1 "$SWEEP_ID"
