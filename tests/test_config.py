"""Every config option composes, the schema catches typos, the design card's command shapes work."""

from __future__ import annotations

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigKeyError

from mtt.config import CONF_DIR
from tests.helpers import compose_cfg, run_module


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


@pytest.mark.parametrize("group", ["data", "features", "backbone", "pool", "steps", "trainer", "tracking"])
def test_every_group_option_composes(group):
    for option in options(group):
        overrides = [f"{group}={option}"] + (["data.root=/tmp/mtat"] if option == "mtat" else [])
        cfg = compose_cfg(overrides)
        assert cfg[group] is not None


@pytest.mark.parametrize("head", ["gap2", "gap3", "autopool", "autopool3"])
def test_head_options_set_blocks_and_pool(head):
    cfg = compose_cfg([f"+head={head}"])
    assert cfg.head.blocks == (3 if head.endswith("3") else 2)
    assert cfg.pool.name == ("autopool" if head.startswith("autopool") else "gap")


def test_default_is_report_baseline_head():
    cfg = compose_cfg([])
    assert (cfg.head.blocks, cfg.pool.name, cfg.head.output) == (2, "gap", "sigmoid")
    assert (cfg.trainer.batch_size, cfg.stream.n_active) == (32, 20)
    assert cfg.data.name == "toy" and cfg.data.split == "standard"


def test_default_recipe_converges_rather_than_stopping_at_a_fixed_count():
    cfg = compose_cfg([])
    assert cfg.steps.policy == "patches"  # an epoch sees every stored patch
    assert (cfg.trainer.epochs, cfg.trainer.patience, cfg.trainer.lr_schedule) == (60, 10, "plateau")
    assert cfg.head.bias_init == "prior" and cfg.trainer.monitor == "val_roc_auc"


def test_misspelt_key_is_rejected_at_composition():
    with pytest.raises((ConfigCompositionException, ConfigKeyError), match="blockz"):
        compose_cfg(["head.blockz=3"])


def test_unknown_head_option_is_rejected():
    with pytest.raises(ConfigCompositionException, match="nope"):
        compose_cfg(["+head=nope"])


def test_wrong_type_is_rejected():
    with pytest.raises(ConfigCompositionException, match="epochs"):
        compose_cfg(["trainer.epochs=many"])


@pytest.mark.slow
def test_cli_typo_fails_before_any_data_work(tmp_path):
    for bad, word in [("head.blockz=3", "blockz"), ("+head=nope", "nope")]:
        proc = run_module(["mtt.run", bad, f"paths.cache={tmp_path}"], check=False, timeout=120)
        assert proc.returncode != 0
        assert word in proc.stderr
        assert not any(tmp_path.iterdir()), "nothing may be generated before the config is valid"


def test_two_runs_started_in_the_same_second_get_their_own_hydra_folder():
    """Hydra writes .hydra/*.yaml and the log into hydra.run.dir: two runs must never share one.
    The clock is pinned to two moments 1 microsecond apart, in the same second."""
    from datetime import datetime

    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    dirs = []
    try:
        for moment in (datetime(2026, 1, 2, 3, 4, 5, 1), datetime(2026, 1, 2, 3, 4, 5, 2)):
            with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):  # (re-registers "now")
                OmegaConf.register_new_resolver("now", moment.strftime, use_cache=True, replace=True)
                dirs.append(compose("config", return_hydra_config=True).hydra.run.dir)
    finally:  # Hydra's own clock back
        OmegaConf.register_new_resolver("now", lambda p: datetime.now().strftime(p), use_cache=True, replace=True)
    assert dirs[0].endswith("03-04-05-000001") and dirs[1].endswith("03-04-05-000002"), dirs
