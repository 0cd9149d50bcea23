"""Exit statuses of the pipeline's commands after a signal: 128 + the signal's number, what a shell reports
for a program the signal ended, so a script or SLURM sees why it stopped (training's RunInterrupted uses
the same rule for USR1: 138)."""

import signal

INTERRUPTED_EXIT = 128 + signal.SIGINT  # 130: Ctrl-C; training checkpoints first
TERMINATED_EXIT = 128 + signal.SIGTERM  # 143: kill, SLURM's time limit; training checkpoints first
