"""`python -m pipeline.sweep`: runs pipeline.launch.sweep, W&B and SLURM-array sweeps (where the code lives)."""
import sys

from pipeline.launch.sweep import main

if __name__ == "__main__":
    sys.exit(main())
