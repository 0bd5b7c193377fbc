"""Training throughput with 1 versus 2 DDP processes on this CPU (figures only).

Both runs train the same tiny-dataset model through the real entry point under torchrun, with the
backbone live (backbone.cache=false, VGGish at width 0.25) so that there is compute to share,
and a fixed number of steps. Throughput is measured between the first and the last epoch's
metric timestamps in MLflow, so start-up and data preparation are left out.
On a GPU machine it also prints the single-GPU figure with the card's name.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from tests.helpers.http_server import free_port  # noqa: E402

STEPS, BATCH, EPOCHS = 12, 32, 3


def samples_per_second(nproc: int, cache: Path, workdir: Path, device: str = "cpu") -> float:
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tempfile.mkdtemp(dir=workdir)}/ddp{nproc}-{device}.db"  # one store per measurement
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [
        str(torchrun),
        f"--nproc_per_node={nproc}",
        f"--master_port={free_port()}",
        "-m",
        "mtt.run",
        "data.synth.clips_per_folder=4",
        "data.synth.seconds=3.0",
        "backbone.width=0.25",
        "backbone.cache=false",
        "steps=fixed",
        f"steps.n={STEPS}",
        f"trainer.batch_size={BATCH}",
        f"trainer.epochs={EPOCHS}",
        "trainer.progress=false",
        f"trainer.device={device}",
        f"paths.cache={cache}",
        f"tracking.uri={uri}",
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run(cmd, cwd=workdir, env=env, check=True, capture_output=True)
    client = MlflowClient(uri)
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    stamps = sorted(m.timestamp for m in client.get_metric_history(run.info.run_id, "train_loss"))
    return (EPOCHS - 1) * STEPS * BATCH / ((stamps[-1] - stamps[0]) / 1000)


def main() -> None:
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        samples_per_second(1, tmp / "cache", tmp)  # warm-up: builds the dataset and the feature store
        one = samples_per_second(1, tmp / "cache", tmp)
        two = samples_per_second(2, tmp / "cache", tmp)
        print(f"CPU ({os.cpu_count()} cores), global batch {BATCH}, live VGGish at width 0.25:")
        print(f"  1 process : {one:8.1f} samples/s")
        print(f"  2 processes: {two:8.1f} samples/s  ({two / one:.2f}x)")
        if torch.cuda.is_available():
            gpu = samples_per_second(1, tmp / "cache", tmp, device="cuda")
            print(f"  1 GPU ({torch.cuda.get_device_name(0)}): {gpu:8.1f} samples/s")


if __name__ == "__main__":
    main()
