"""``python -m mtt.preprocess [overrides]``: decode every clip of ``data`` and store its patches
(the feature store that mtt.run would otherwise build first; the code: mtt/features/preprocess.py).
The same checks as a run come first: bad values, the data's folder, then the clip index."""

import time

from mtt.config import exit_if_invalid, hydra_entry
from mtt.core.fs import exit_on_corrupt
from mtt.features.preprocess import build_feature_store, summary
from mtt.training.preflight import checked_index


@hydra_entry
def _run(cfg) -> None:
    exit_if_invalid(cfg)
    start = time.perf_counter()
    index = checked_index(cfg, batch=False)
    with exit_on_corrupt():
        store = build_feature_store(index, cfg.features)
    print(summary(store, time.perf_counter() - start), flush=True)


def main() -> None:
    _run()


if __name__ == "__main__":
    main()
