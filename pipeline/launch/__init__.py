"""Where a run is started from: SLURM and torchrun environments (cluster), the command line (cli) and
sweeps over it (sweep: `python -m pipeline.sweep`)."""
