"""``python -m mtt.probe [overrides]``: the linear-probe reference, logged beside the trained
runs (same config, data, feature store and backbone cache as mtt.run; the code and its protocol:
mtt/training/probe.py)."""

import functools

from mtt.config import exit_if_invalid, hydra_entry
from mtt.core.fs import exit_on_corrupt
from mtt.run import cli, tracked
from mtt.training.preflight import checked
from mtt.training.probe import REFERENCE, run_probe


@hydra_entry
def _probe(cfg) -> float:
    exit_if_invalid(cfg)
    # before the run: the weights (before any data work), freqN, the data's folder
    probe = functools.partial(run_probe, checked=checked(cfg, batch=False))
    with exit_on_corrupt():
        metrics = tracked(cfg, probe, name_prefix=REFERENCE, entry="mtt.probe")
    return metrics.get("val_roc_auc", float("nan"))


def main() -> None:
    cli(_probe, "mtt.probe")


if __name__ == "__main__":
    main()
