"""`python -m mtt.sync`: ship what runs' journals hold to the tracking store; close the runs whose process died (the code: mtt/tracking/sync.py)."""

import sys

from mtt.tracking.sync import main

if __name__ == "__main__":
    sys.exit(main())
