"""`python -m pipeline.evaluate`: runs pipeline.analysis.evaluate (where the code and its docs live)."""
import sys

from pipeline.analysis.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
