"""`python -m pipeline.bench`: runs pipeline.analysis.bench (where the code and its docs live); `python -m
pipeline.bench profile` runs pipeline.analysis.step_profile (where each training step's time goes)."""
import sys

from pipeline.analysis.bench import main

if __name__ == "__main__":
    if sys.argv[1:2] == ["profile"]:
        from pipeline.analysis.step_profile import main as profile

        sys.exit(profile(sys.argv[2:]))
    sys.exit(main())
