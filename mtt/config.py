"""Typed configuration schema for every run, registered in Hydra's ConfigStore.

The YAML files under ``conf/`` only change values of these dataclasses, so a misspelt key or a
value of the wrong type fails while the config is composed, before any data or model work.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


@dataclass
class PathsConfig:
    # Root of everything mtt generates or downloads (toy dataset, feature stores, weights).
    cache: str = "${oc.env:MTT_CACHE,${oc.env:HOME}/.cache/mtt}"


@dataclass
class SynthConfig:
    """Parameters of the embedded, generated MTAT-format dataset (``data=toy``)."""

    clips_per_folder: int = 20  # x 16 folders
    seconds: float = 6.0  # clip length; real MTAT clips are 29.1 s
    seed: int = 0


@dataclass
class DataConfig:
    name: str = MISSING
    # Folder holding annotations_final.csv and the audio folders 0-9, a-f.
    root: str = MISSING
    annotations: str = "annotations_final.csv"
    clip_info: Optional[str] = "clip_info_final.csv"
    tags: str = "all"  # all | top50 (published list) | freqN (N most frequent here, e.g. freq50)
    split: str = "standard"  # standard (folders 0-b / c / d-f) | report (first quarter test)
    drop_untagged: bool = True  # drop clips with no tag of the chosen set (published protocol)
    # When set, the dataset is generated at `root` on first use (the embedded default).
    synth: Optional[SynthConfig] = None


@dataclass
class FeaturesConfig:
    """VGGish log-mel front end (Google's vggish_params) and where its patches are stored."""

    sample_rate: int = 16000
    window_seconds: float = 0.025
    hop_seconds: float = 0.010
    n_mels: int = 64
    fmin: float = 125.0
    fmax: float = 7500.0
    log_offset: float = 0.01
    patch_frames: int = 96  # 0.96 s
    patch_hop_frames: int = 96  # non-overlapping patches
    store: str = "${paths.cache}/features"
    workers: int = 0  # preprocessing processes; 0 = one per core


@dataclass
class BackboneConfig:
    name: str = "vggish"
    # none (random init) | audioset (official torchvggish file, downloaded once) | a local path
    weights: str = "none"
    url: str = "https://github.com/harritaylor/torchvggish/releases/download/v0.1/vggish-10086976.pth"
    hub_dir: Optional[str] = None  # torch hub cache; None = torch.hub.get_dir()
    freeze: bool = True  # the report froze the whole conv stack
    finetune_last: int = 0  # with freeze=true, still train the last N conv layers
    width: float = 1.0  # channel multiplier; must be 1.0 for pretrained weights (tests use less)
    embeddings: bool = False  # append VGGish's 128-d embedding layers after the conv stack
    embedding_relu: bool = True  # torchvggish keeps a ReLU after the last embedding layer
    cache: bool = True  # with a frozen backbone, compute its conv maps once and reuse them


@dataclass
class PoolConfig:
    name: str = "gap"  # gap | autopool
    alpha_init: float = 0.0  # autopool: 0 = mean pooling
    constraint: str = "none"  # autopool: none | cap (alpha projected into [-alpha_max, alpha_max] after each step)
    alpha_max: float = 10.0
    alpha_l2: float = 0.0  # autopool: L2 penalty on alpha (RAP)


@dataclass
class HeadConfig:
    blocks: int = 2  # BatchNorm + Dropout + Dense blocks; all but the last Dense have a ReLU
    width: int = 256  # hidden width of every block but the last
    dropout: float = 0.2
    output: str = "sigmoid"  # sigmoid (independent tags) | softmax (the report's, wrong here)
    # Output-layer bias at the start: prior = log-odds of each tag's training frequency, so the
    # loss starts near its floor (most tags are on 1-5% of clips) | zero (the report's, Keras').
    bias_init: str = "prior"


@dataclass
class StepsConfig:
    # declared: annotated train clips // batch; cached: train clips with features // batch;
    # patches: cached train patches // batch (the default: an epoch sees the data); fixed: n
    policy: str = "patches"
    n: Optional[int] = None


@dataclass
class StreamConfig:
    n_active: int = 20  # streamers the mux keeps open (the report's 20)
    rate: Optional[float] = 8.0  # mean patches drawn from a streamer before it is replaced
    mode: str = "with_replacement"  # pescador StochasticMux mode
    patches_per_clip: Optional[int] = None  # None = all; 1 = the report's single random patch
    num_workers: int = 0  # DataLoader workers (each streams a disjoint shard of clips)
    # The mux's sampling distribution over clips: uniform | length (proportional to a clip's
    # patches, so every patch is about equally likely)
    weights: str = "uniform"


@dataclass
class EvalConfig:
    aggregate: str = "mean"  # how patch probabilities become a clip's: mean | max
    patches_per_clip: Optional[int] = None  # None = all patches (clip-level); 1 = report's
    batch_size: int = 128


@dataclass
class TrainerConfig:
    epochs: int = 60  # the maximum with early stopping (patience); the report trained 12
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.0
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "auto"  # auto (bf16 autocast on CUDA) | fp32 | bf16
    channels_last: bool = True  # NHWC convolutions (tensor cores on CUDA)
    deterministic: bool = False
    monitor: str = "val_roc_auc"  # metric that picks the best checkpoint
    # Early stopping: stop after this many epochs without a better `monitor` (epochs is then the
    # maximum); null = train all epochs (the report's fixed schedules).
    patience: Optional[int] = 10
    # Learning-rate schedule: none | plateau (multiply the lr by lr_factor after lr_patience
    # epochs without a better `monitor`).
    lr_schedule: str = "plateau"
    lr_patience: int = 3
    lr_factor: float = 0.3
    progress: bool = True
    # Continue an interrupted run from its last checkpoint, into the same MLflow run:
    # true = the newest unfinished run with this config; a run id = that run; null/false = new run.
    resume: Optional[str] = None


@dataclass
class ProbeConfig:
    """The linear-probe reference (``python -m mtt.probe``, see mtt/probe.py)."""

    # Inverse L2 strengths tried (scikit-learn's C); the best on the validation split is kept.
    C: list = field(default_factory=lambda: [0.001, 0.01, 0.1, 1.0, 10.0])


@dataclass
class TrackingConfig:
    uri: Optional[str] = None  # None: $MLFLOW_TRACKING_URI, else sqlite:///<repo>/mlflow.db
    experiment: str = "mtt"
    run_name: Optional[str] = None  # None: built from the command-line overrides


@dataclass
class Config:
    paths: PathsConfig = field(default_factory=PathsConfig)
    data: DataConfig = field(default_factory=DataConfig)
    features: FeaturesConfig = field(default_factory=FeaturesConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    pool: PoolConfig = field(default_factory=PoolConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    steps: StepsConfig = field(default_factory=StepsConfig)
    stream: StreamConfig = field(default_factory=StreamConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


REPO_ROOT = Path(__file__).resolve().parent.parent
CONF_DIR = REPO_ROOT / "conf"


def register_configs() -> None:
    """Register the schema so that conf/config.yaml can extend it (idempotent)."""
    cs = ConfigStore.instance()
    cs.store(name="base_config", node=Config)
    from mtt.presets import register_presets  # the `experiment` group (experiments/)

    register_presets()


register_configs()
