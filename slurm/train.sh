#!/bin/bash
# Train one VAE on SLURM (DDP: one task per GPU), requeued on preemption; or locally without SLURM.
#
#   mkdir -p logs && sbatch slurm/train.sh objective.beta=4 trainer.max_steps=50000
#   sbatch --nodes=2 --ntasks-per-node=4 --gpus-per-node=4 slurm/train.sh configs/dsprites_beta.yaml
#   sbatch --gpus-per-node=0 --ntasks-per-node=2 slurm/train.sh trainer.accelerator=cpu   # CPU nodes
#   bash slurm/train.sh trainer.max_steps=100                                             # no SLURM
#
# Arguments are `python -m pipeline.train` arguments (CONFIG.yaml files, key=value overrides).
# trainer.devices / trainer.num_nodes come from the allocation (pipeline/launch/cluster.py): change
# --ntasks-per-node / --gpus-per-node / --nodes instead; a contradicting value stops the job.
# The run directory is runs/<job name>-<job id> (array: -<array id>_<task id>) unless run.name= or
# run.dir= is given: a requeued job keeps its id, so it resumes from that directory's checkpoint
# and continues the same W&B run.
#
#SBATCH --job-name=train
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1          # = GPUs per node: one DDP process per GPU
#SBATCH --gpus-per-node=1            # not --gres, so that --gpus-per-node=0 selects CPU nodes
#SBATCH --cpus-per-task=8            # data.num_workers + 1 is a good floor
#SBATCH --mem=32G
#SBATCH --time=24:00:00
#SBATCH --signal=USR1@90             # 90 s before the time limit: checkpoint, then requeue (Lightning)
#SBATCH --requeue                    # may be requeued after preemption or node failure
#SBATCH --open-mode=append           # a requeued job appends to its log instead of truncating it
#SBATCH --output=logs/%x-%j.out      # logs/ must exist: SLURM does not create it
set -euo pipefail

# --- environment: module loads and venv/conda activation go here -----------------------------
# module load cuda/12.4
# source .venv/bin/activate            # or: conda activate vae
# --- NCCL (multi-GPU / multi-node) ----------------------------------------------------------
# export NCCL_DEBUG=WARN                # INFO to debug hangs
# export NCCL_SOCKET_IFNAME=ib0         # the interface nodes talk over (e.g. ib0, eth0)
# export NCCL_IB_DISABLE=1              # only where there is no InfiniBand
# export TORCH_NCCL_ASYNC_ERROR_HANDLING=1   # a dead rank ends the job instead of hanging it
# -----------------------------------------------------------------------------------------------

if [[ -n "${SLURM_JOB_ID:-}" ]]; then
    # Slurm >= 22.05 srun no longer inherits --cpus-per-task from sbatch; pass it on explicitly.
    [[ -n "${SLURM_CPUS_PER_TASK:-}" ]] && export SRUN_CPUS_PER_TASK="$SLURM_CPUS_PER_TASK"
    # One torch thread pool per task, sized to its CPUs (not all of the node's cores per rank).
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}"
    echo "# $(date -Is) job ${SLURM_JOB_ID} restart ${SLURM_RESTART_COUNT:-0} on ${SLURM_JOB_NODELIST:-?}"
    # Resolve the config once, here in the batch step: a bad key fails now, not in every rank, and
    # the log names the run directory that a requeue resumes from.
    python -m pipeline.train --dry-run "$@"
    # srun: one process per task (rank); a rank that dies ends the step instead of hanging the others.
    exec srun --kill-on-bad-exit=1 python -m pipeline.train "$@"
else
    exec python -m pipeline.train "$@"
fi
