"""Bad values fail when the config is composed: one line naming the key, the value and what is
allowed, exit status 2, and nothing done (no MLflow store or run, no data), for every numeric and
enumerated setting (mtt.config.RULES)."""

from __future__ import annotations

import pytest

from mtt.config import REPO_ROOT, RULES, ConfigError, config_errors, validate
from tests.helpers import TINY, compose_cfg, run_module

PRESETS = sorted(
    p.relative_to(REPO_ROOT / "experiments").with_suffix("").as_posix()
    for p in (REPO_ROOT / "experiments").rglob("*.yaml")
)

# key -> (override, the value as the error shows it, words of what is allowed); an override of a
# pool's own setting comes with the option that has it (a list)
BAD = {
    "data.tags": ("data.tags=freq0", "freq0", "freqN with N >= 1"),
    "data.split": ("data.split=random", "random", "one of standard, report"),
    "data.clip_seconds": ("data.clip_seconds=0", "0.0", "a number > 0, or null"),
    "data.synth.clips_per_folder": ("data.synth.clips_per_folder=0", "0", "an integer >= 1"),
    "data.synth.seconds": ("data.synth.seconds=0.01", "0.01", "a number in [0.1, 600]"),
    "data.synth.seed": ("data.synth.seed=-1", "-1", "an integer >= 0"),
    "features.name": ("features.name=mfcc", "mfcc", "one of vggish, mel_db"),
    "features.sample_rate": ("features.sample_rate=0", "0", "an integer >= 1"),
    "features.window_seconds": ("features.window_seconds=0", "0.0", "a number > 0"),
    "features.hop_seconds": ("features.hop_seconds=-0.01", "-0.01", "a number > 0"),
    "features.n_mels": ("features.n_mels=0", "0", "an integer >= 1"),
    "features.fmin": ("features.fmin=-5", "-5.0", "a number >= 0"),
    "features.fmax": ("features.fmax=0", "0.0", "a number > 0"),
    "features.log_offset": ("features.log_offset=0", "0.0", "a number > 0"),
    "features.patch_frames": ("features.patch_frames=0", "0", "an integer >= 1"),
    "features.patch_hop_frames": ("features.patch_hop_frames=0", "0", "an integer >= 1"),
    "features.workers": ("features.workers=-1", "-1", "an integer >= 0"),
    "backbone.finetune_last": ("backbone.finetune_last=7", "7", "an integer in [0, 6]"),
    "backbone.width": ("backbone.width=0", "0.0", "a number > 0"),
    "pool.name": ("pool.name=maxpool", "maxpool", "one of gap, autopool"),
    "pool.alpha_init": (["pool=autopool", "pool.alpha_init=inf"], "inf", "a finite number"),
    "pool.constraint": (["pool=autopool", "pool.constraint=clip"], "clip", "one of none, cap"),
    "pool.alpha_max": (["pool=autopool", "pool.alpha_max=0"], "0.0", "a number > 0"),
    "pool.alpha_l2": (["pool=autopool", "pool.alpha_l2=-0.1"], "-0.1", "a number >= 0"),
    "head.name": ("head.name=mlp", "mlp", "one of bn_dropout_dense, dense_bn"),
    "head.blocks": ("head.blocks=0", "0", "an integer >= 1"),
    "head.width": ("head.width=0", "0", "an integer >= 1"),
    "head.dropout": ("head.dropout=1.0", "1.0", "a number in [0, 1)"),
    "head.output": ("head.output=relu", "relu", "one of sigmoid, softmax"),
    "head.bias_init": ("head.bias_init=random", "random", "one of prior, zero"),
    "steps.policy": ("steps.policy=all", "all", "one of declared, cached, patches, fixed"),
    "steps.n": ("steps.n=0", "0", "an integer >= 1, or null"),
    "stream.n_active": ("stream.n_active=0", "0", "an integer >= 1"),
    "stream.rate": ("stream.rate=null", "null", "a number > 0 (null never replaces an active clip)"),
    "stream.mode": ("stream.mode=exhaustive", "exhaustive", "one of with_replacement, single_active"),
    "stream.patches_per_clip": ("stream.patches_per_clip=0", "0", "an integer >= 1, or null"),
    "stream.num_workers": ("stream.num_workers=-2", "-2", "an integer >= 0"),
    "stream.weights": ("stream.weights=by_size", "by_size", "one of uniform, length"),
    "eval.aggregate": ("eval.aggregate=median", "median", "one of mean, max"),
    "eval.patches_per_clip": ("eval.patches_per_clip=-1", "-1", "an integer >= 1, or null"),
    "eval.batch_size": ("eval.batch_size=0", "0", "an integer >= 1"),
    "eval.spacing": ("eval.spacing=middle", "middle", "one of random, even"),
    "eval.chunk_samples": ("eval.chunk_samples=0", "0", "an integer >= 1, or null"),
    "trainer.epochs": ("trainer.epochs=0", "0", "an integer >= 1"),
    "trainer.batch_size": ("trainer.batch_size=0", "0", "an integer >= 1"),
    "trainer.lr": ("trainer.lr=-1", "-1.0", "a number > 0"),
    "trainer.weight_decay": ("trainer.weight_decay=-0.001", "-0.001", "a number >= 0"),
    "trainer.optimizer": ("trainer.optimizer=rmsprop", "rmsprop", "one of adam, sgd"),
    "trainer.momentum": ("trainer.momentum=1.0", "1.0", "a number in [0, 1)"),
    "trainer.seed": ("trainer.seed=-3", "-3", "an integer in [0, 4294967295]"),
    "trainer.device": ("trainer.device=gpu", "gpu", "auto, cpu, cuda or cuda:N"),
    "trainer.precision": ("trainer.precision=fp16", "fp16", "one of auto, fp32, bf16"),
    "trainer.monitor": ("trainer.monitor=val_auc", "val_auc", "one of val_roc_auc, val_pr_auc"),
    "trainer.patience": ("trainer.patience=0", "0", "an integer >= 1, or null"),
    "trainer.lr_schedule": ("trainer.lr_schedule=cosine", "cosine", "one of none, plateau"),
    "trainer.phases": (
        "trainer.phases=[{epoch:0,lr:0.001}]",
        "[{'epoch': 0, 'lr': 0.001, 'optimizer': None, 'reload_best': False}]",
        "a list of {epoch: an integer >= 1, lr: a number > 0, optimizer: adam, sgd or null}",
    ),
    "trainer.lr_patience": ("trainer.lr_patience=-1", "-1", "an integer >= 0"),
    "trainer.lr_factor": ("trainer.lr_factor=1.0", "1.0", "a number in (0, 1)"),
    "probe.C": ("probe.C=[]", "[]", "a non-empty list of numbers > 0"),
    "tracking.experiment": ("tracking.experiment=' '", " ", "a non-empty name"),
    "tracking.run_name": (
        f"tracking.run_name={'r' * 251}",
        f"{'r' * 40}... (251 characters)",
        "at most 250 characters",
    ),
    "tracking.flush_timeout_s": ("tracking.flush_timeout_s=-1", "-1.0", "a number >= 0"),
}


def test_every_rule_has_a_bad_value_in_the_table():
    assert sorted(BAD) == sorted(RULES)


@pytest.mark.parametrize("key", sorted(BAD))
def test_a_bad_value_is_named_with_what_is_allowed(key):
    override, shown, allowed = BAD[key]
    cfg = compose_cfg(override if isinstance(override, list) else [override])
    with pytest.raises(ConfigError) as info:
        validate(cfg)
    message = str(info.value)
    assert message.startswith(f"{key}={shown}: expected ") and allowed in message, message
    assert "\n" not in message


def test_values_that_depend_on_each_other():
    assert config_errors(compose_cfg(["features.fmin=8000"])) == [
        "features.fmin=8000.0, features.fmax=7500.0: expected fmin < fmax <= sample_rate / 2 = 8000"
    ]
    assert config_errors(compose_cfg(["features.fmax=9000"]))  # above Nyquist for 16 kHz
    assert config_errors(compose_cfg(["steps=fixed", "steps.n=null"])) == [
        "steps.n=null: expected an integer >= 1 with steps.policy=fixed"
    ]
    assert config_errors(compose_cfg(["steps=epoch"])) == [
        "steps.policy=epoch, stream.mode=with_replacement: steps=epoch counts the passes of stream.mode=epoch"
    ]
    assert config_errors(compose_cfg(["steps=epoch", "stream.mode=epoch"])) == []
    assert config_errors(compose_cfg(["trainer.lr_schedule=phases"])) == [
        "trainer.phases=[] (epochs): expected a non-empty list in increasing epoch order with trainer.lr_schedule=phases"
    ]
    assert config_errors(
        compose_cfg(["trainer.lr_schedule=phases", "trainer.phases=[{epoch:9,lr:0.1},{epoch:3,lr:0.1}]"])
    ) == [
        "trainer.phases=[9,3] (epochs): expected a non-empty list in increasing epoch order with trainer.lr_schedule=phases"
    ]
    assert config_errors(compose_cfg(["trainer.nesterov=true", "trainer.momentum=0"])) == [
        "trainer.nesterov=true, trainer.momentum=0.0: expected a momentum > 0 for Nesterov"
    ]
    # A backbone is checked against its registry entry: its name, its front end, its own limits.
    unknown = config_errors(compose_cfg(["backbone.name=resnet50"]))[0]  # (a test may have registered more)
    assert unknown.startswith("backbone.name=resnet50: not a registered backbone; registered: ")
    assert {"shortchunk", "shortchunk_res", "vggish"} <= set(
        unknown.split("registered: ")[1].split(" (")[0].split(", ")
    )
    assert config_errors(compose_cfg(["backbone.name=shortchunk_res", "backbone.freeze=false"])) == [
        "features.name=vggish: backbone.name=shortchunk_res consumes features.name=mel_db patches "
        "(choose its YAML: backbone=shortchunk_res)"
    ]
    assert config_errors(compose_cfg(["backbone=shortchunk_res", "backbone.weights=audioset"])) == [
        "backbone.weights=audioset: shortchunk_res has no published AudioSet weights (those at backbone.url "
        "are VGGish's); use none or the path of a state dict"
    ]
    assert config_errors(compose_cfg(["backbone.module=no_such_module"]))[0].startswith(
        "backbone.module=no_such_module: cannot be imported"
    )
    both = str(pytest.raises(ConfigError, validate, compose_cfg(["trainer.lr=0", "trainer.epochs=0"])).value)
    assert "trainer.lr=0.0" in both and "trainer.epochs=0" in both and "\n" not in both


@pytest.mark.parametrize(
    "overrides",
    [
        [],
        TINY,
        ["data=mtat", "data.root=/data/mtat"],
        ["+head=autopool"],
        ["+head=autopool3", "pool.constraint=cap"],
        ["steps=fixed"],
        ["trainer.device=cuda:1", "trainer.precision=bf16", "stream.rate=0.5"],
        ["backbone=shortchunk_res"],
        ["backbone=shortchunk"],
    ]
    + [[f"+experiment={name}"] for name in PRESETS],
)
def test_defaults_options_and_presets_are_valid(overrides):
    assert config_errors(compose_cfg(overrides)) == []


def assert_refused(proc, message: str, store) -> None:
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines() == [f"error: {message}"]
    assert not store.exists(), "the MLflow store was created"


def test_cli_refuses_a_bad_value_before_any_work(tmp_path):
    """The user's view: exit status 2, one line on stderr, no MLflow store (so no run), no data."""
    cache, store = tmp_path / "cache", tmp_path / "m.db"
    proc = run_module(
        ["mtt.run", *TINY, "trainer.batch_size=0", f"paths.cache={cache}", f"tracking.uri=sqlite:///{store}"],
        check=False,
    )
    assert_refused(proc, "trainer.batch_size=0: expected an integer >= 1", store)
    assert not cache.exists(), "data work started"


def test_swept_values_are_checked_one_by_one_and_interpolations_left_to_the_job():
    from mtt.tracking.runs import swept_value_errors

    assert swept_value_errors(
        ["trainer.lr=0.1,-1", "trainer.seed=0,1", "+head=gap2,autopool", "trainer.epochs=${oc.env:EPOCHS},0"]
    ) == ["trainer.lr=-1: expected a number > 0", "trainer.epochs=0: expected an integer >= 1"]


def test_a_swept_group_glob_is_left_to_hydra():
    """+experiment=glob(report/*) (the report sweep) has no rule; expanding it needs Hydra's loader."""
    from mtt.tracking.runs import swept_value_errors

    assert swept_value_errors(["+experiment=glob(report/*)", "trainer.seed=0,1"]) == []
    assert swept_value_errors(["+experiment=glob(report/*)", "trainer.seed=0,-1"]) != []


def test_a_bad_swept_value_stops_the_sweep_before_its_first_job(tmp_path):
    cache, store = tmp_path / "cache", tmp_path / "m.db"
    proc = run_module(
        [
            "mtt.run",
            "-m",
            *TINY,
            "trainer.lr=0.1,-1",
            "stream.mode=with_replacement,exhaustive",
            f"paths.cache={cache}",
            f"tracking.uri=sqlite:///{store}",
        ],
        check=False,
    )
    assert_refused(
        proc,
        "trainer.lr=-1: expected a number > 0; stream.mode=exhaustive: expected one of "
        "with_replacement, single_active, epoch (exhaustive would end the endless stream)",
        store,
    )
    assert not cache.exists(), "a job started"


def test_probe_refuses_a_bad_value_too(tmp_path):
    cache, store = tmp_path / "cache", tmp_path / "m.db"
    proc = run_module(
        [
            "mtt.probe",
            *TINY,
            "probe.C=[]",
            "trainer.lr_factor=1.5",
            f"paths.cache={cache}",
            f"tracking.uri=sqlite:///{store}",
        ],
        check=False,
    )
    assert_refused(
        proc,
        "trainer.lr_factor=1.5: expected a number in (0, 1); probe.C=[]: expected a non-empty list of numbers > 0",
        store,
    )
    assert not cache.exists()


def test_preprocess_refuses_a_bad_value_too(tmp_path):
    cache, store = tmp_path / "cache", tmp_path / "m.db"
    proc = run_module(
        ["mtt.preprocess", "features.n_mels=0", f"paths.cache={cache}", f"tracking.uri=sqlite:///{store}"], check=False
    )
    assert_refused(proc, "features.n_mels=0: expected an integer >= 1", store)
    assert not cache.exists()


# A mistyped key or group: (override, the one line that refuses it). Hydra would accept the
# first two (the default head trains, the run named after the typo) and refuse the rest in
# several lines with exit status 1.
TYPOS = {
    "+hed=autopool": "+hed=autopool: no config key or config group 'hed'; did you mean the config group head "
    "(+head=autopool)?",
    "+trainer.epochz=3": "+trainer.epochz=3: no config key 'trainer.epochz'; did you mean the key trainer.epochs "
    "(trainer.epochs=3)?",
    "head.blockz=3": "head.blockz=3: no config key 'head.blockz'; did you mean the key head.blocks (head.blocks=3)?",
    "+data.synth.sede=2": "+data.synth.sede=2: no config key 'data.synth.sede'; did you mean the key data.synth.seed "
    "(data.synth.seed=2)?",
    "+experimnt=search": "+experimnt=search: no config key or config group 'experimnt'; did you mean the config group "
    "experiment (+experiment=search)?",
    "+head=gap2,autopol": "+head=gap2,autopol: no option 'autopol' in config group head (did you mean autopool? "
    "options: autopool, autopool3, gap2, gap3)",
    "data=mtatt": "data=mtatt: no option 'mtatt' in config group data (did you mean mtat? options: mtat, toy)",
    "hydra.sweeper.params.trainer.lrr=interval(0.1,1)": "hydra.sweeper.params.trainer.lrr=interval(0.1,1): no config "
    "key 'trainer.lrr'; did you mean the key trainer.lr (trainer.lr=interval(0.1,1))?",
    "+zzz=1": "+zzz=1: no config key or config group 'zzz'; the top-level ones: backbone, data, eval, experiment, "
    "features, head, paths, pool, probe, steps, stream, tracking, trainer",
}


@pytest.mark.parametrize("override", sorted(TYPOS))
def test_a_mistyped_key_or_group_is_named_with_the_closest_known_one(override):
    from mtt.config import override_errors

    assert override_errors([override]) == [TYPOS[override]]


def test_what_hydra_and_the_presets_add_is_not_a_typo():
    from mtt.config import override_errors

    legit = [
        "+head=autopool",
        "+experiment=report/prelim",
        "+experiment=glob(report/*)",
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
        "hydra/sweeper=optuna",
        "hydra.sweeper.n_trials=3",
        "hydra.sweeper.params.trainer.lr=interval(1e-4,1e-2)",
        "trainer.weight_decay=interval(0,1e-3)",
        "trainer.lr=0.1,0.01",
        "trainer.phases=[{epoch:1,lr:0.1}]",
        "~trainer.phases",
        "data=mtat",
        "data.root=/data/mtat",
        "backbone=shortchunk_res",
    ]
    assert override_errors(legit) == []


def test_a_key_added_by_composition_is_refused_too():
    """What did not come from the command line (a compose call, a preset) is checked as composed."""
    assert sorted(config_errors(compose_cfg(["+hed=autopool", "+trainer.epochz=3"]))) == [
        "hed=autopool: no config key or config group 'hed'; did you mean the config group head (+head=autopool)?",
        "trainer.epochz=3: no config key 'trainer.epochz'; did you mean the key trainer.epochs (trainer.epochs=3)?",
    ]


EPOCHZ = "no config key 'trainer.epochz'; did you mean the key trainer.epochs"


@pytest.mark.parametrize(
    "command, message",
    [
        (["mtt.run", "+hed=autopool"], TYPOS["+hed=autopool"]),
        (["mtt.run", "-m", "+trainer.epochz=1,2"], f"+trainer.epochz=1,2: {EPOCHZ} (trainer.epochs=1,2)?"),
        (["mtt.preprocess", "+trainer.epochz=3"], TYPOS["+trainer.epochz=3"]),
        (["mtt.probe", "+trainer.epochz=3"], TYPOS["+trainer.epochz=3"]),
        (
            ["mtt.data.download", "data=mtat", "data.root=/nonexistent/mtat", "+trainer.epochz=3"],
            TYPOS["+trainer.epochz=3"],
        ),
    ],
)
def test_every_entry_point_refuses_a_typo_in_one_line_before_any_work(tmp_path, command, message):
    cache, store = tmp_path / "cache", tmp_path / "m.db"
    proc = run_module([*command, f"paths.cache={cache}", f"tracking.uri=sqlite:///{store}"], check=False)
    assert_refused(proc, message, store)
    assert not cache.exists()
