"""`python -m pipeline.train`: runs pipeline.training.train, the training entry point (where the code and its docs live)."""
import sys

from pipeline.training.train import main

if __name__ == "__main__":
    sys.exit(main())
