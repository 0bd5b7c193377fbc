"""Adding a backbone is one module and one YAML (CONTRIBUTING.md): a backbone defined here, in
the test, registers itself and trains through the same path as VGGish."""

from __future__ import annotations

import textwrap

import pytest
from mlflow.tracking import MlflowClient

from mtt.models import build_model
from mtt.models.registry import backbone_errors, get_backbone
from tests.helpers import TINY, compose_cfg, run_module

# The whole recipe: a module that defines the backbone and registers it...
MODULE = textwrap.dedent('''
    """A one-conv backbone: (B, frames, mels) -> (B, 8, frames // 2, mels // 2)."""
    from torch import nn

    from mtt.models.registry import BackboneSpec, register_backbone


    class OneConv(nn.Module):
        def __init__(self, channels):
            super().__init__()
            self.net = nn.Sequential(nn.Conv2d(1, channels, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))

        def forward(self, x):
            return self.net(x.unsqueeze(1))


    register_backbone(BackboneSpec(name="one_conv", front_end="vggish",
                                   build=lambda b, item_shape: OneConv(round(8 * b.width))))
''')
# ... and a YAML that names it and the module (on PYTHONPATH) that registers it.
YAML = textwrap.dedent("""
    # A backbone of one's own (tests/test_registry.py).
    name: one_conv
    module: my_backbones.one_conv
    freeze: false
    width: 1.0
""")


@pytest.fixture
def backbone_dir(tmp_path, monkeypatch):
    """``tmp_path/code/my_backbones/one_conv.py`` on sys.path, ``tmp_path/conf/backbone/one_conv.yaml``."""
    package = tmp_path / "code" / "my_backbones"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "one_conv.py").write_text(MODULE)
    (tmp_path / "conf" / "backbone").mkdir(parents=True)
    (tmp_path / "conf" / "backbone" / "one_conv.yaml").write_text(YAML)
    monkeypatch.syspath_prepend(str(tmp_path / "code"))
    return tmp_path


def test_a_registered_backbone_is_built_by_name_with_its_declared_output(backbone_dir):
    cfg = compose_cfg(
        ["backbone.name=one_conv", "backbone.module=my_backbones.one_conv", "backbone.freeze=false", "head.width=16"]
    )
    assert backbone_errors(cfg) == []
    spec = get_backbone("one_conv")
    model = build_model(cfg, n_tags=7)
    assert spec.output_shape(model.backbone, (96, 64)) == (8, 48, 32)  # measured by one forward
    assert model.head.net[0].num_features == 8  # the head is sized from the declared output
    # It consumes VGGish's front end; asked to read another, the config is refused before any work.
    assert backbone_errors(compose_cfg(["backbone=shortchunk_res", "backbone.name=one_conv"]))[0].startswith(
        "features.name=mel_db: backbone.name=one_conv consumes features.name=vggish patches"
    )


def test_the_typo_check_sees_the_search_path_of_the_primary_config(backbone_dir, tmp_path, monkeypatch):
    """The command line's unknown-option check looks where Hydra composes from: a conf/config.yaml
    that puts a folder on ``hydra.searchpath`` makes that folder's YAMLs options, as the command
    line's ``hydra.searchpath`` does (tests/test_contracts.py)."""
    import shutil

    import mtt.config
    from mtt.config import override_errors

    (backbone_dir / "conf" / "backbone" / "mine.yaml").write_text(YAML)  # named as no registered backbone
    conf = shutil.copytree(mtt.config.CONF_DIR, tmp_path / "repo_conf")
    primary = (conf / "config.yaml").read_text()
    assert override_errors(["backbone=mine"])[0].startswith("backbone=mine: no option 'mine' in config group backbone")
    (conf / "config.yaml").write_text(
        primary.replace("\nhydra:\n", f"\nhydra:\n  searchpath: [file://{backbone_dir / 'conf'}]\n", 1)
    )
    monkeypatch.setattr(mtt.config, "CONF_DIR", conf)
    assert override_errors(["backbone=mine"]) == []
    assert "(did you mean mine? options: " in override_errors(["backbone=mone"])[0]


@pytest.mark.slow
def test_a_backbone_defined_in_the_test_trains_through_mtt_run(backbone_dir, cache_dir):
    """``python -m mtt.run backbone=one_conv`` with the test's conf folder on Hydra's search path
    and its module on PYTHONPATH: nothing in mtt names it."""
    uri = f"sqlite:///{backbone_dir}/m.db"
    from mtt.core.paths import REPO_ROOT

    run_module(
        [
            "mtt.run",
            f"hydra.searchpath=[file://{backbone_dir / 'conf'}]",
            "backbone=one_conv",
            *TINY,
            "backbone.width=1.0",
            "trainer.epochs=2",
            f"paths.cache={cache_dir}",
            f"tracking.uri={uri}",
        ],
        env={"PYTHONPATH": f"{REPO_ROOT}:{backbone_dir / 'code'}"},
    )
    client = MlflowClient(uri)
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.status == "FINISHED"
    assert run.data.params["backbone.name"] == "one_conv" and run.data.tags["choice.backbone"] == "one_conv"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_roc_auc")] == [0, 1]
    assert "test_roc_auc_ci95_low" in run.data.metrics
    assert "test_predictions.npz" in {a.path for a in client.list_artifacts(run.info.run_id)}
