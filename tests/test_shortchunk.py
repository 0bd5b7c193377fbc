"""Won et al. 2020's short-chunk CNNs (mtt/models/shortchunk.py) and their front end: the paper's
shapes and parameter count, their mel-dB input, their training recipe's options, and learning."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torchaudio.transforms as T
from mlflow.tracking import MlflowClient

from mtt.config import FeaturesConfig
from mtt.core import distributed
from mtt.features.frontend import MelDbFrontEnd
from mtt.models import build_model
from mtt.tracking.runs import MlflowTracker
from mtt.training.schedule import Phases
from mtt.training.train import train
from tests.helpers import LEARNABLE, TINY, compose_cfg

CHUNK = 59049  # the paper's input: 3.69 s at 16 kHz
# Small enough for 2 s generated clips and 2 CPU cores: 32-frame patches of 32 mel bands, 1/8 width.
SMALL = ["backbone=shortchunk_res", "features.patch_frames=32", "features.patch_hop_frames=16", "features.n_mels=32"]


def shortchunk_features() -> FeaturesConfig:
    cfg = compose_cfg(["backbone=shortchunk_res"])
    return FeaturesConfig(**{k: v for k, v in cfg.features.items()})


def test_the_front_end_is_torchaudio_mel_then_db_on_the_papers_chunk():
    """One 59,049-sample chunk is one (231 frames, 128 mels) patch equal to what the paper's model
    computes from it (MelSpectrogram(16 kHz, n_fft 512, 0-8000 Hz, 128 mels) -> AmplitudeToDB)."""
    cfg = shortchunk_features()
    wave = torch.from_numpy(np.random.default_rng(0).normal(scale=0.1, size=(1, CHUNK)).astype(np.float32))
    patches = MelDbFrontEnd(cfg)(wave)
    assert patches.shape == (1, 1, 231, 128)
    theirs = T.AmplitudeToDB()(
        T.MelSpectrogram(sample_rate=16000, n_fft=512, f_min=0.0, f_max=8000.0, n_mels=128)(wave)
    )
    torch.testing.assert_close(patches[0, 0], theirs[0].T)
    # A 29.1 s MTAT clip: 1 + 465,600 // 256 = 1,819 frames, 1 + (1819 - 231) // 99 = 17 patches.
    assert MelDbFrontEnd(cfg).n_patches(int(29.1 * 16000)) == 17


def conv(cin: int, cout: int) -> int:
    return 9 * cin * cout + cout  # 3x3 kernel + bias


def bn(c: int) -> int:
    return 2 * c  # weight + bias


def paper_parameter_count(residual: bool, n_tags: int) -> int:
    """From the paper's layer list: BatchNorm2d(1); 7 blocks 1->128->128->256->256->256->256->512,
    each (3x3 conv, BN, 3x3 conv, BN, shortcut 3x3 conv, BN) with residuals, (3x3 conv, BN)
    without; Dense 512->512, BN, Dense 512->n_tags."""
    channels = [1, 128, 128, 256, 256, 256, 256, 512]
    total = bn(1)
    for cin, cout in zip(channels, channels[1:]):
        if residual:
            total += conv(cin, cout) + bn(cout) + conv(cout, cout) + bn(cout) + conv(cin, cout) + bn(cout)
        else:
            total += conv(cin, cout) + bn(cout)
    return total + (512 * 512 + 512) + bn(512) + (512 * n_tags + n_tags)


@pytest.mark.parametrize(
    "backbone, residual, fmap", [("shortchunk_res", True, (512, 2, 1)), ("shortchunk", False, (512, 1, 1))]
)
def test_the_papers_shapes_and_parameter_count(backbone, residual, fmap):
    model = build_model(compose_cfg([f"backbone={backbone}"]), n_tags=50).eval()
    x = torch.randn(2, 231, 128)  # two (time, mel) chunks of 59,049 samples
    with torch.no_grad():
        assert tuple(model.encode(x).shape) == (2, *fmap)  # the frequency axis is 1 after the blocks
        assert tuple(model(x).shape) == (2, 50)
    assert sum(p.numel() for p in model.parameters()) == paper_parameter_count(residual, 50)
    # 12.1 M and 3.7 M, the sizes the paper's figures give for the two models
    assert round(paper_parameter_count(True, 50) / 1e6, 1) == 12.1
    assert round(paper_parameter_count(False, 50) / 1e6, 1) == 3.7


def test_every_block_has_the_shortcut_because_every_block_halves():
    model = build_model(compose_cfg(["backbone=shortchunk_res"]), n_tags=50)
    blocks = [getattr(model.backbone, f"layer{i}") for i in range(1, 8)]
    assert all(b.diff and b.conv_1.stride == (2, 2) and b.conv_3.stride == (2, 2) for b in blocks)
    head = [type(m).__name__ for m in model.head.net]
    assert head == ["Linear", "BatchNorm1d", "ReLU", "Dropout", "Linear"] and model.head.net[3].p == 0.5


def test_the_backbones_own_state_dict_loads_strictly():
    """A state dict of the backbone alone loads as it is; one key too many or too few is refused,
    named (nothing is dropped silently)."""
    from mtt.models.shortchunk import load_weights

    model = build_model(compose_cfg(["backbone=shortchunk_res"]), n_tags=50)
    mine = {k: v.clone() + 1 for k, v in model.backbone.state_dict().items()}
    load_weights(model.backbone, mine)
    assert torch.equal(model.backbone.layer7.conv_3.weight, mine["layer7.conv_3.weight"])
    with pytest.raises(ValueError, match=r"unexpected keys: \['layer8.conv_1.weight'\]"):
        load_weights(model.backbone, {**mine, "layer8.conv_1.weight": torch.zeros(1)})
    del mine["layer3.bn_2.weight"]
    with pytest.raises(ValueError, match=r"missing keys: \['layer3.bn_2.weight'\]"):
        load_weights(model.backbone, mine)


class TheirRes2d(torch.nn.Module):
    """sota-music-tagging-models training/modules.py ``Res_2d``, from its layer list: 3x3 conv
    (stride) -> BN -> ReLU -> 3x3 conv -> BN, plus 3x3 conv (stride) -> BN on the shortcut when
    the shape changes, ReLU after the sum."""

    def __init__(self, cin: int, cout: int, stride: int = 2):
        super().__init__()
        self.conv_1 = torch.nn.Conv2d(cin, cout, 3, stride=stride, padding=1)
        self.bn_1 = torch.nn.BatchNorm2d(cout)
        self.conv_2 = torch.nn.Conv2d(cout, cout, 3, padding=1)
        self.bn_2 = torch.nn.BatchNorm2d(cout)
        self.diff = stride != 1 or cin != cout
        if self.diff:
            self.conv_3 = torch.nn.Conv2d(cin, cout, 3, stride=stride, padding=1)
            self.bn_3 = torch.nn.BatchNorm2d(cout)
        self.relu = torch.nn.ReLU()

    def forward(self, x):
        out = self.bn_2(self.conv_2(self.relu(self.bn_1(self.conv_1(x)))))
        return self.relu((self.bn_3(self.conv_3(x)) if self.diff else x) + out)


class TheirShortChunkRes(torch.nn.Module):
    """Their training/model.py ``ShortChunkCNN_Res``, from its layer list: raw audio ``(B,
    samples)`` -> MelSpectrogram -> AmplitudeToDB -> BatchNorm2d(1) -> 7 ``Res_2d`` (n, n, 2n, 2n,
    2n, 2n, 4n channels) -> max over time -> dense1 -> bn -> ReLU -> dropout -> dense2 -> sigmoid."""

    def __init__(self, n_channels: int = 128, n_mels: int = 128, n_class: int = 50):
        super().__init__()
        self.spec = T.MelSpectrogram(sample_rate=16000, n_fft=512, f_min=0.0, f_max=8000.0, n_mels=n_mels)
        self.to_db = T.AmplitudeToDB()
        self.spec_bn = torch.nn.BatchNorm2d(1)
        widths = [1, n_channels, n_channels, 2 * n_channels, *[2 * n_channels] * 3, 4 * n_channels]
        for i in range(7):
            setattr(self, f"layer{i + 1}", TheirRes2d(widths[i], widths[i + 1]))
        self.dense1 = torch.nn.Linear(4 * n_channels, 4 * n_channels)
        self.bn = torch.nn.BatchNorm1d(4 * n_channels)
        self.dense2 = torch.nn.Linear(4 * n_channels, n_class)
        self.dropout = torch.nn.Dropout(0.5)
        self.relu = torch.nn.ReLU()

    def forward(self, x):
        x = self.spec_bn(self.to_db(self.spec(x)).unsqueeze(1))  # (B, 1, mel, time)
        for i in range(7):
            x = getattr(self, f"layer{i + 1}")(x)
        x = x.squeeze(2)  # (B, C, time): the mel axis is 1 by now
        if x.size(-1) != 1:
            x = torch.nn.MaxPool1d(x.size(-1))(x)
        x = self.dense2(self.dropout(self.relu(self.bn(self.dense1(x.squeeze(2))))))
        return torch.sigmoid(x)


def their_trained_model(samples: int, **kw) -> TheirShortChunkRes:
    """Their model with batch-norm statistics of real inputs (one training-mode pass over 8 noisy
    tones sets each BN's running stats to that batch's) and a non-default output bias, in eval mode."""
    torch.manual_seed(0)
    theirs = TheirShortChunkRes(**kw)
    for m in theirs.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.momentum = 1.0
    t = torch.arange(samples) / 16000
    tones = [0.3 * torch.sin(2 * math.pi * 110 * (k + 1) * t) + 0.05 * torch.randn(samples) for k in range(8)]
    with torch.no_grad():
        theirs.train()(torch.stack(tones))
        theirs.dense2.bias.normal_(-2.0, 1.0)  # as a trained head: most tags unlikely
    return theirs.eval()


def test_their_whole_model_loads_and_gives_their_probabilities_on_raw_audio(tmp_path):
    """A state dict saved by their ShortChunkCNN_Res (backbone, dense head, front-end buffers)
    loads through backbone.weights' reader into mtt's model, and on raw audio mtt (its front end,
    then the tagger) gives their probabilities to 1e-5."""
    from mtt.models.weights import load_state_dict

    theirs = their_trained_model(CHUNK)
    path = tmp_path / "best_model.pth"
    torch.save(theirs.state_dict(), path)  # what their Solver.validation saves
    cfg = compose_cfg(["backbone=shortchunk_res"])
    model = build_model(cfg, n_tags=50, state_dict=load_state_dict(path)).eval()
    assert model.pretrained_head
    rng = np.random.default_rng(1)
    t = np.arange(CHUNK) / 16000
    audio = np.stack([0.2 * np.sin(2 * np.pi * f * t) + rng.normal(scale=0.05, size=CHUNK) for f in (220, 440, 1000)])
    wave = torch.from_numpy(audio.astype(np.float32))
    with torch.no_grad():
        expected = theirs(wave)
        patches = MelDbFrontEnd(shortchunk_features())(wave)[:, 0]  # (3, 231, 128): one chunk each
        got = model.probabilities(model(patches))
    assert expected.std() > 0.01  # distinct values, not saturated ones
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_their_state_dict_with_an_extra_or_missing_key_is_refused_naming_it():
    theirs = {k: v.clone() for k, v in their_trained_model(CHUNK).state_dict().items()}
    cfg = compose_cfg(["backbone=shortchunk_res"])
    with pytest.raises(ValueError, match=r"unexpected keys: \['dense3.weight'\]"):
        build_model(cfg, n_tags=50, state_dict={**theirs, "dense3.weight": torch.zeros(50, 50)})
    with pytest.raises(ValueError, match=r"missing keys: \['dense2.bias'\]"):
        build_model(cfg, n_tags=50, state_dict={k: v for k, v in theirs.items() if k != "dense2.bias"})
    with pytest.raises(ValueError, match=r"dense2.weight: file \(50, 512\) vs model \(10, 512\)"):
        build_model(cfg, n_tags=10, state_dict=theirs)  # another tag set
    fb = {**theirs, "spec.mel_scale.fb": theirs["spec.mel_scale.fb"] * 2}
    with pytest.raises(ValueError, match=r"front end differs from features.*spec.mel_scale.fb"):
        build_model(cfg, n_tags=50, state_dict=fb)
    with pytest.raises(ValueError, match="pool.name=gap: their model max-pools over time"):
        build_model(compose_cfg(["backbone=shortchunk_res", "pool=gap"]), n_tags=50, state_dict=theirs)


def test_a_run_from_their_weights_keeps_their_head(cache_dir, tmp_path):
    """backbone.weights=PATH of their (small) model in a run: the first epoch starts from their
    head's trained bias, not from the prior that head.bias_init would set."""
    from mtt.training.train import prepare, start

    theirs = their_trained_model(16000, n_channels=16, n_mels=32, n_class=50)
    path = tmp_path / "theirs.pth"
    torch.save(theirs.state_dict(), path)
    cfg = compose_cfg(
        [*TINY, *SMALL, "data.tags=freq50", "backbone.width=0.125", "head.width=64", f"backbone.weights={path}"],
        cache=cache_dir,
    )
    p = prepare(cfg)
    assert p.model.pretrained_head and cfg.head.bias_init == "prior"
    start(cfg, distributed.RankTracker("their-weights", resumed=False), p, distributed.Dist())  # logs nothing
    assert torch.equal(p.model.head.output_layer.bias, theirs.dense2.bias)


def test_phases_switch_optimiser_and_rate_and_a_resume_gets_the_phase_of_its_epoch():
    cfg = compose_cfg(["+experiment=anchors/shortchunk_res"])
    phases, params = Phases(cfg.trainer), [torch.nn.Parameter(torch.zeros(3))]
    assert [phases.setting_at(e) for e in (0, 79, 80, 99, 100, 119, 120, 199)] == [
        ("adam", 1e-4),
        ("adam", 1e-4),
        ("sgd", 1e-3),
        ("sgd", 1e-3),
        ("sgd", 1e-4),
        ("sgd", 1e-4),
        ("sgd", 1e-5),
        ("sgd", 1e-5),
    ]
    opt = phases.optimizer_at(params, 0)
    assert isinstance(opt, torch.optim.Adam) and opt.defaults["weight_decay"] == 1e-4
    reloads = []
    assert phases.enter(79, opt, params, lambda: reloads.append(79)) is opt and reloads == []
    sgd = phases.enter(80, opt, params, lambda: reloads.append(80))
    assert isinstance(sgd, torch.optim.SGD) and reloads == [80]
    assert sgd.defaults["nesterov"] and sgd.defaults["momentum"] == 0.9 and sgd.param_groups[0]["lr"] == 1e-3
    assert phases.enter(100, sgd, params, lambda: reloads.append(100)) is sgd and sgd.param_groups[0]["lr"] == 1e-4
    # A run killed after epoch 85 resumes with an SGD optimiser, which its saved state fits.
    assert isinstance(phases.optimizer_at(params, 85), torch.optim.SGD)
    # Without lr_schedule=phases the phases are ignored (the default recipe: Adam throughout).
    assert Phases(compose_cfg([]).trainer).setting_at(150) == ("adam", 1e-3)


def test_a_run_follows_its_phases_and_logs_each_epochs_rate(cache_dir, tmp_path):
    """Through train(): epoch 0 Adam at trainer.lr, epoch 1 SGD from the best checkpoint, epoch 2 a
    lower SGD rate; the `lr` metric records what each epoch trained with."""
    uri = f"sqlite:///{tmp_path}/m.db"
    cfg = compose_cfg(
        [
            *TINY,
            "trainer.epochs=3",
            "trainer.patience=null",
            "trainer.lr_schedule=phases",
            "trainer.nesterov=true",
            "trainer.phases=[{epoch:1,optimizer:sgd,lr:0.01,reload_best:true},{epoch:2,lr:0.002}]",
            f"tracking.uri={uri}",
        ],
        cache=cache_dir,
    )
    with MlflowTracker(uri, "phases", "p") as tracker:
        train(cfg, tracker)
    lrs = [m.value for m in sorted(MlflowClient(uri).get_metric_history(tracker.run_id, "lr"), key=lambda m: m.step)]
    assert lrs == [pytest.approx(1e-3), pytest.approx(0.01), pytest.approx(0.002)]


def test_it_learns_on_tiny_data_through_the_same_records_as_vggish(cache_dir, tmp_path, learning):
    """16 epochs on the 72 tiny training clips: the validation loss falls well below its first
    epoch's, the test ROC-AUC lies well above chance, and the run has the records of a VGGish run
    (test metrics with intervals, predictions, per-tag table)."""
    uri = f"sqlite:///{tmp_path}/m.db"
    cfg = compose_cfg(
        [
            *LEARNABLE,
            *SMALL,
            "backbone.width=0.125",
            "head.width=64",
            "trainer.epochs=16",
            "trainer.patience=null",
            "trainer.lr_schedule=none",
            f"trainer.seed={learning.seed}",
            f"tracking.uri={uri}",
        ],
        cache=cache_dir,
    )
    with MlflowTracker(uri, "shortchunk", "learns") as tracker:
        metrics = train(cfg, tracker)
    client = MlflowClient(uri)
    val_loss = [m.value for m in sorted(client.get_metric_history(tracker.run_id, "val_loss"), key=lambda m: m.step)]
    assert len(val_loss) == 16
    # After the first epoch the loss is still about that of the tags' prior (where the output bias starts).
    fall = 1 - min(val_loss[1:]) / val_loss[0]
    learning.at_least("val_loss fall below epoch 0's", fall, 0.1, baseline=0.0)
    learning.at_least("test_roc_auc", metrics["test_roc_auc"], 0.6, baseline=0.5)
    run = client.get_run(tracker.run_id)
    assert {"test_roc_auc_ci95_low", "test_pr_auc_ci95_high", "selected_val_roc_auc"} <= set(run.data.metrics)
    assert run.data.params["backbone.name"] == "shortchunk_res" and run.data.params["features.name"] == "mel_db"
    artifacts = {a.path for a in client.list_artifacts(tracker.run_id)}
    assert {"test_predictions.npz", "per_tag_test.csv", "config.yaml"} <= artifacts
    assert run.data.tags["test_clips"] == str(
        len(np.load(client.download_artifacts(tracker.run_id, "test_predictions.npz", str(tmp_path)))["clip_ids"])
    )
    assert math.isfinite(metrics["test_pr_auc"])
