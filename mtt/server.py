"""`python -m mtt.server`: a lab's MLflow tracking server (the code: mtt/tracking/server.py)."""

from mtt.tracking.server import main

if __name__ == "__main__":
    main()
