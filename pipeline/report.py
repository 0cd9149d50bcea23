"""`python -m pipeline.report`: runs pipeline.analysis.report (where the code and its docs live)."""
import sys

from pipeline.analysis.report import main

if __name__ == "__main__":
    sys.exit(main())
