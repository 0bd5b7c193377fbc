"""Hydra entry point: ``python -m mtt.run [overrides]`` / ``python -m mtt.run -m ...`` (sweeps).

Thin on purpose: compose the config, open the MLflow run, train, return the monitored metric
(so Hydra sweepers can optimise it).
"""

from __future__ import annotations

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from mtt.config import CONF_DIR


def run_name(overrides: list[str]) -> str:
    """``+head=autopool trainer.epochs=2`` -> ``head=autopool,epochs=2`` (the last key part)."""
    parts = []
    for o in overrides:
        key, _, value = o.lstrip("+~").partition("=")
        # Where things are stored and how they are shown say nothing about the experiment.
        if key.startswith(("tracking.", "hydra", "paths.", "trainer.progress")):
            continue
        parts.append(f"{key.split('.')[-1]}={value}")
    return ",".join(parts) or "default"


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float:
    from mtt.tracking import MlflowTracker
    from mtt.train import train

    hc = HydraConfig.get()
    tags = {f"choice.{k}": v for k, v in hc.runtime.choices.items()
            if v is not None and not k.startswith("hydra/")}
    tags["overrides"] = " ".join(hc.overrides.task)
    name = cfg.tracking.run_name or run_name(list(hc.overrides.task))
    with MlflowTracker(cfg.tracking.uri, cfg.tracking.experiment, name, tags) as tracker:
        metrics = train(cfg, tracker)
    return metrics.get(cfg.trainer.monitor, float("nan"))


if __name__ == "__main__":
    main()
