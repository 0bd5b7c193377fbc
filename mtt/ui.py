"""`python -m mtt.ui`: the MLflow UI's address for a tracking store (the code: mtt/tracking/ui.py)."""

import sys

from mtt.tracking.ui import main

if __name__ == "__main__":
    sys.exit(main())
