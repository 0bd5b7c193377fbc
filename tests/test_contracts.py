"""The contract of every registry (mtt.core.components): a backbone, pool, head, dataset or steps
policy with a setting of its own is one module and one YAML (CONTRIBUTING.md). Each test writes
both from here alone (the module on PYTHONPATH, the YAML in a conf folder on Hydra's search path;
nothing in mtt names them) and trains through ``python -m mtt.run``; the setting of its own is
logged, and the trained model or run shows that it took effect."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from safetensors.numpy import load_file

from mtt.core.paths import REPO_ROOT
from tests.helpers import TINY, TINY_MODEL, compose_cfg, run_module

BACKBONE = '''
    """A stack of n_blocks conv + max-pool blocks: (B, frames, mels) -> (B, 4, T, F)."""
    from dataclasses import dataclass

    from torch import nn

    from mtt.core.components import BackboneConfig, integer, setting
    from mtt.models.registry import BackboneSpec, register_backbone


    @dataclass
    class StackConfig(BackboneConfig):
        name: str = "stack"
        n_blocks: int = setting(2, integer(1, 4))


    def build(cfg, item_shape):
        layers, cin = [], 1
        for _ in range(cfg.n_blocks):
            layers += [nn.Conv2d(cin, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
            cin = 4
        return Stack(nn.Sequential(*layers))


    class Stack(nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x):
            return self.net(x.unsqueeze(1))


    register_backbone(BackboneSpec("stack", front_end="vggish", build=build, config=StackConfig))
'''

POOL = '''
    """Log-sum-exp pooling with sharpness r: (B, C, T, F) -> (B, C)."""
    from dataclasses import dataclass

    import torch
    from torch import nn

    from mtt.core.components import POOLS, PoolConfig, number, setting
    from mtt.models.pooling import PoolSpec


    @dataclass
    class LseConfig(PoolConfig):
        name: str = "lse"
        r: float = setting(1.0, number(0, lo_open=True))


    class Lse(nn.Module):
        def __init__(self, r):
            super().__init__()
            self.register_buffer("r", torch.tensor(float(r)))

        def forward(self, x):
            x = x.flatten(2)
            return (torch.logsumexp(self.r * x, dim=2) - torch.log(torch.tensor(float(x.shape[2])))) / self.r


    POOLS.register(PoolSpec("lse", config=LseConfig, build=lambda cfg, channels: Lse(cfg.r)))
'''

HEAD = '''
    """One hidden layer of `hidden` units: (B, in) -> (B, n_tags)."""
    from dataclasses import dataclass

    from torch import nn

    from mtt.core.components import HEADS, HeadConfig, integer, setting
    from mtt.models.head import HeadSpec


    @dataclass
    class WideConfig(HeadConfig):
        name: str = "wide"
        hidden: int = setting(8, integer(1))


    class Wide(nn.Module):
        def __init__(self, cin, n_tags, hidden):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(cin, hidden), nn.ReLU(), nn.Linear(hidden, n_tags))

        @property
        def output_layer(self):
            return self.net[-1]

        def forward(self, x):
            return self.net(x)


    HEADS.register(HeadSpec("wide", config=WideConfig, build=lambda cfg, cin, n_tags: Wide(cin, n_tags, cfg.hidden)))
'''

DATASET = '''
    """The embedded generator's clips, but only `folders` of MTAT's 16 audio folders kept."""
    from dataclasses import dataclass

    from mtt.core.components import DATASETS, integer, setting
    from mtt.data.datasets import DatasetSpec, ToyConfig, mtat_index
    from mtt.data.embedded import ensure_dataset


    @dataclass
    class FewConfig(ToyConfig):
        name: str = "few"
        keep_every: int = setting(1, integer(1))


    def index(cfg, progress):
        ensure_dataset(cfg.root, cfg.synth, progress=progress)
        full = mtat_index(cfg)
        splits = {k: v[:: cfg.keep_every] for k, v in full.splits.items()}
        return type(full)(**{**vars(full), "splits": splits})


    DATASETS.register(DatasetSpec("few", config=FewConfig, index=index))
'''

STEPS = '''
    """A fraction of the patches policy's steps."""
    from dataclasses import dataclass

    from mtt.core.components import STEPS, StepsConfig, number, setting
    from mtt.features.streams import StepsSpec


    @dataclass
    class FractionConfig(StepsConfig):
        policy: str = "fraction"
        of_patches: float = setting(0.5, number(0, 1, lo_open=True))


    STEPS.register(
        StepsSpec(
            "fraction",
            config=FractionConfig,
            count=lambda counts, batch, cfg: max(1, int(counts["patches"] * cfg.of_patches) // batch),
        )
    )
'''


def write(tmp_path: Path, group: str, option: str, module: str, code: str, yaml: str) -> None:
    """``tmp_path/code/mine/<module>.py`` and ``tmp_path/conf/<group>/<option>.yaml``."""
    package = tmp_path / "code" / "mine"
    package.mkdir(parents=True, exist_ok=True)
    (package / "__init__.py").write_text("")
    (package / f"{module}.py").write_text(textwrap.dedent(code))
    (tmp_path / "conf" / group).mkdir(parents=True, exist_ok=True)
    (tmp_path / "conf" / group / f"{option}.yaml").write_text(textwrap.dedent(yaml))


def train(tmp_path: Path, cache_dir: Path, *overrides: str, tiny: list[str] = TINY):
    """``python -m mtt.run`` with the test's conf folder and code; the finished run."""
    uri = f"sqlite:///{tmp_path}/m.db"
    run_module(
        [
            "mtt.run",
            f"hydra.searchpath=[file://{tmp_path / 'conf'}]",
            *tiny,
            *overrides,
            f"paths.cache={cache_dir}",
            f"tracking.uri={uri}",
        ],
        env={"PYTHONPATH": f"{REPO_ROOT}:{tmp_path / 'code'}"},
    )
    client = MlflowClient(uri)
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.status == "FINISHED"
    return client, run


def weights(client: MlflowClient, run, tmp_path: Path) -> dict:
    path = client.download_artifacts(run.info.run_id, "checkpoint/best.safetensors", str(tmp_path))
    return load_file(path)


@pytest.mark.slow
def test_a_backbone_with_a_setting_of_its_own(tmp_path, cache_dir):
    write(
        tmp_path,
        "backbone",
        "stack3",
        "stack",
        BACKBONE,
        """
        # Three blocks of mine.stack (its own key: n_blocks); the rest is BackboneConfig's.
        name: stack
        module: mine.stack
        n_blocks: 3
        freeze: false
        """,
    )
    client, run = train(tmp_path, cache_dir, "backbone=stack3")
    assert run.data.params["backbone.n_blocks"] == "3" and run.data.params["backbone.weights"] == "none"
    state = weights(client, run, tmp_path)
    assert sorted(k for k in state if k.startswith("backbone.") and k.endswith(".weight")) == [
        "backbone.net.0.weight",
        "backbone.net.3.weight",
        "backbone.net.6.weight",
    ]


@pytest.mark.slow
def test_a_backbone_setting_outside_its_rule_is_refused_in_one_line(tmp_path, cache_dir):
    write(tmp_path, "backbone", "stack9", "stack", BACKBONE, "name: stack\nmodule: mine.stack\nn_blocks: 9\n")
    proc = run_module(
        ["mtt.run", f"hydra.searchpath=[file://{tmp_path / 'conf'}]", "backbone=stack9", f"paths.cache={cache_dir}"],
        env={"PYTHONPATH": f"{REPO_ROOT}:{tmp_path / 'code'}"},
        check=False,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["error: backbone.n_blocks=9: expected an integer in [1, 4]"]


@pytest.mark.slow
def test_a_pool_with_a_setting_of_its_own(tmp_path, cache_dir):
    write(tmp_path, "pool", "lse2", "lse", POOL, "name: lse\nmodule: mine.lse\nr: 2.5\n")
    client, run = train(tmp_path, cache_dir, "pool=lse2")
    assert run.data.params["pool.name"] == "lse" and run.data.params["pool.r"] == "2.5"
    assert float(weights(client, run, tmp_path)["pool.r"]) == 2.5


@pytest.mark.slow
def test_a_head_with_a_setting_of_its_own(tmp_path, cache_dir):
    write(tmp_path, "head", "wide24", "wide", HEAD, "name: wide\nmodule: mine.wide\nhidden: 24\n")
    client, run = train(tmp_path, cache_dir, "+head=wide24")
    assert run.data.params["head.hidden"] == "24"
    assert weights(client, run, tmp_path)["head.net.0.weight"].shape[0] == 24


@pytest.mark.slow
def test_a_dataset_with_a_setting_of_its_own(tmp_path, cache_dir):
    from mtt.data.datasets import index_from_config

    yaml = """
        # Every other clip of each split (its own key: keep_every) of a tiny embedded dataset.
        name: few
        module: mine.few
        keep_every: 2
        synth: {clips_per_folder: 2, seconds: 2.0}
        """
    write(tmp_path, "data", "few2", "few", DATASET, yaml)
    search = f"hydra.searchpath=[file://{tmp_path / 'conf'}]"
    cfg = compose_cfg([search, "data=few2", "data.keep_every=3"])
    assert (cfg.data.name, cfg.data.keep_every, cfg.data.synth.seconds) == ("few", 3, 2.0)
    client, run = train(tmp_path, cache_dir, "data=few2", "trainer.batch_size=8", tiny=TINY_MODEL)
    full = index_from_config(compose_cfg(TINY, cache=cache_dir).data, progress=False).splits["train"]
    assert run.data.params["data.keep_every"] == "2"
    assert int(run.data.params["derived.train_clips"]) == len(full[::2]) < len(full)


@pytest.mark.slow
def test_a_steps_policy_with_a_setting_of_its_own(tmp_path, cache_dir):
    write(
        tmp_path, "steps", "quarter", "fraction", STEPS, "policy: fraction\nmodule: mine.fraction\nof_patches: 0.25\n"
    )
    client, run = train(tmp_path, cache_dir, "steps=quarter", "trainer.batch_size=2")
    patches = int(run.data.params["derived.train_patches"])
    assert run.data.params["steps.of_patches"] == "0.25"
    assert int(run.data.params["derived.steps_per_epoch"]) == max(1, int(patches * 0.25) // 2)


def test_a_yaml_sets_what_differs_and_the_rest_comes_from_its_entry(tmp_path):
    """A YAML option of one's own over a built-in entry: composed with its keys only, then
    completed from the entry's dataclass (what ``hydra_entry`` does before every entry point)."""
    from mtt.config import complete, config_errors

    (tmp_path / "pool").mkdir()
    (tmp_path / "pool" / "capped.yaml").write_text("name: autopool\nconstraint: cap\n")
    cfg = compose_cfg([f"hydra.searchpath=[file://{tmp_path}]", "pool=capped"])
    assert "alpha_max" not in cfg.pool
    complete(cfg)
    assert (cfg.pool.constraint, cfg.pool.alpha_max, cfg.pool.alpha_l2) == ("cap", 10.0, 0.0)
    assert config_errors(cfg) == []


def test_a_key_of_a_yaml_option_of_ones_own_is_left_to_the_composed_check(tmp_path):
    """Before composition the keys of an entry outside mtt are unknown: with its YAML option on the
    command line they are checked once composed; without it a typo is still refused at once."""
    from mtt.config import override_errors

    (tmp_path / "backbone").mkdir()
    (tmp_path / "backbone" / "stack3.yaml").write_text("name: stack\nmodule: mine.stack\nn_blocks: 3\n")
    search = f"hydra.searchpath=[file://{tmp_path}]"
    assert override_errors([search, "backbone=stack3", "backbone.n_blocks=4"]) == []
    assert override_errors(["backbone.widht=0.5"]) == [
        "backbone.widht=0.5: no config key 'backbone.widht'; did you mean the key backbone.width (backbone.width=0.5)?"
    ]
    assert override_errors([search, "backbone=stack4"]) == [
        "backbone=stack4: no option 'stack4' in config group backbone (did you mean stack3? options: "
        "shortchunk, shortchunk_res, stack3, vggish)"
    ]
