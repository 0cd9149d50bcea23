"""`python -m pipeline.bench`: runs pipeline.analysis.bench (where the code and its docs live)."""
import sys

from pipeline.analysis.bench import main

if __name__ == "__main__":
    sys.exit(main())
