"""`python -m mtt.tag`: tag audio files with a trained model (the code: mtt/serving/tag.py)."""

import sys

from mtt.serving.tag import main

if __name__ == "__main__":
    sys.exit(main())
