"""`python -m pipeline.science`: runs pipeline.analysis.science (where the code and its docs live)."""
import sys

from pipeline.analysis.science import main

if __name__ == "__main__":
    sys.exit(main())
