"""`python -m mtt.compare`: compare runs grouped by configuration, with intervals and paired verdicts (the code: mtt/analysis/compare.py)."""

import sys

from mtt.analysis.compare import main

if __name__ == "__main__":
    sys.exit(main())
