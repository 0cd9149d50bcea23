"""`python -m pipeline.sync`: runs pipeline.run.sync, W&B offline-run syncing (where the code and its docs live)."""
import sys

from pipeline.run.sync import main

if __name__ == "__main__":
    sys.exit(main())
