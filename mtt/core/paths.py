"""Repository paths, in one place. A leaf module (it imports nothing from mtt), so that any
module, including the Hydra plugins a worker process unpickles first, can import it."""

from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]  # this file is mtt/core/paths.py
CONF_DIR = REPO_ROOT / "conf"  # Hydra's config groups
