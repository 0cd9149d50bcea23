"""`python -m pipeline.prepare ...` and the `vae-prepare` script: the CLI lives in pipeline.data.prepare."""
import sys

from pipeline.data.prepare import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
