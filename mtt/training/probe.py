"""The linear-probe reference: what a logistic regression gets from the same frozen features.

    python -m mtt.probe [overrides]          # same config, data, feature store and cache as mtt.run

Protocol (the one MARBLE and HEAR use for frozen embeddings):

1. every patch of a clip goes through the frozen backbone (read from the backbone cache that
   ``mtt.run`` builds and shares: the conv map ``(C, T, F)``, or its frequency mean ``(C, T, 1)``
   for the pools that read only that), which is averaged over time and frequency into a
   ``C``-vector (global average pooling);
2. a clip's embedding is the mean and the standard deviation of those vectors over all of the
   clip's patches, ``2C`` values (1,024 for VGGish);
3. embeddings are standardised with the training clips' mean and standard deviation;
4. one L2-regularised logistic regression per tag (scikit-learn, lbfgs) is fitted on the
   training clips for each strength in ``probe.C``; the strength with the best macro ROC-AUC on
   the validation split is kept (a tag without both classes in training gets its training
   frequency as a constant). Where the split has no validation set of its own (the report
   split validates on its test clips), 10% of the training clips (seeded) are held out to choose
   the strength instead, and the run is tagged ``probe_validation=carved_from_train``;
5. validation and test clips are scored with the same clip-level metric code as every trained
   run (``mtt.training.evaluate.clip_metrics``) and logged under the same names (``val_roc_auc``,
   ``test_roc_auc``, ``test_pr_auc``, ``test_accuracy``, ``test_accuracy_all_negative``, ...),
   in the same MLflow experiment, tagged ``mtt.reference=linear_probe``.

A trained head that ends well below this number has not converged (or overfits); one above it
has learned something a linear read-out of pooled features cannot.
"""

from __future__ import annotations

import logging
import time
import warnings

import numpy as np

from mtt.core import distributed
from mtt.features.store import PatchStore
from mtt.training.evaluate import Split, chunk_bce, clip_metrics, log_test
from mtt.training.preflight import Checked
from mtt.training.train import log_records, prepare

log = logging.getLogger(__name__)

REFERENCE_TAG = "mtt.reference"
REFERENCE = "linear_probe"
CARVED_FRACTION = 0.1  # of the training clips, held out when the split has no validation set


def clip_embeddings(inputs: PatchStore, clip_ids: np.ndarray) -> np.ndarray:
    """``(n_clips, 2C)``: mean and std over each clip's patches of the time/frequency-averaged
    backbone output. ``inputs`` is a backbone cache (items ``(C, T, F)``, or ``(C, T, 1)``: the
    frequency mean, whose mean over time is the same average)."""
    if len(inputs.item_shape) != 3:
        raise ValueError(f"{inputs.path}: expected backbone outputs (C, T, F), got items {inputs.item_shape}")
    out = np.empty((len(clip_ids), 2 * inputs.item_shape[0]), dtype=np.float64)
    for i, clip_id in enumerate(clip_ids):
        pooled = np.asarray(inputs.get(clip_id), dtype=np.float64).mean(axis=(2, 3))  # (patches, C)
        out[i] = np.concatenate([pooled.mean(axis=0), pooled.std(axis=0)])
    return out


class LinearProbe:
    """One logistic regression per tag over standardised embeddings."""

    def __init__(self, C: float, max_iter: int = 2000):
        self.C, self.max_iter = C, max_iter

    def fit(self, x: np.ndarray, y: np.ndarray) -> LinearProbe:
        from sklearn.linear_model import LogisticRegression

        self.mean = x.mean(axis=0)
        self.scale = x.std(axis=0)
        self.scale[self.scale < 1e-12] = 1.0  # a constant feature carries nothing; leave it at 0
        z = (x - self.mean) / self.scale
        self.models: list = []
        self.prior = y.mean(axis=0)
        with warnings.catch_warnings():
            # lbfgs may stop a few iterations short on separable tags; the fit is still usable
            warnings.filterwarnings("ignore", message=".*(converge|max_iter).*")
            for j in range(y.shape[1]):
                if 0 < y[:, j].sum() < len(y):
                    self.models.append(LogisticRegression(C=self.C, max_iter=self.max_iter).fit(z, y[:, j]))
                else:
                    self.models.append(None)
        return self

    def predict(self, x: np.ndarray) -> np.ndarray:
        """``(n, n_tags)`` probabilities."""
        z = (x - self.mean) / self.scale
        out = np.empty((len(x), len(self.models)))
        for j, m in enumerate(self.models):
            out[:, j] = m.predict_proba(z)[:, 1] if m is not None else self.prior[j]
        return out


def fit_probe(
    x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray, y_val: np.ndarray, strengths
) -> tuple[LinearProbe, list[dict[str, float]]]:
    """Fit a probe per regularisation strength, keep the best by validation macro ROC-AUC.

    Returns the chosen probe and one ``{"C", "val_roc_auc", ...}`` record per strength.
    """
    if not strengths:
        raise ValueError("probe.C: need at least one regularisation strength")
    scores, best, best_score = [], None, -np.inf
    for c in strengths:
        probe = LinearProbe(float(c)).fit(x_train, y_train)
        val = clip_metrics(y_val, probe.predict(x_val))
        scores.append({"C": float(c), **{f"val_{k}": v for k, v in val.items()}})
        score = val["roc_auc"] if not np.isnan(val["roc_auc"]) else -val["loss"]
        if score > best_score:
            best, best_score = probe, score
    return best, scores


def carve_validation(train: Split, fraction: float, seed: int) -> tuple[Split, Split]:
    """Split ``fraction`` of the training clips off as a validation set (seeded): for splits
    without a validation set of their own, so that the strength is never chosen on test clips."""
    order = np.random.default_rng([seed, 2]).permutation(len(train.clip_ids))
    n_val = max(1, int(round(fraction * len(order))))
    val, rest = np.sort(order[:n_val]), np.sort(order[n_val:])
    pick = lambda rows: Split(train.clip_ids[rows], train.labels[rows], len(rows))  # noqa: E731
    return pick(rest), pick(val)


def run_probe(
    cfg, tracker, d: distributed.Dist = distributed.Dist(), checked: Checked | None = None
) -> dict[str, float]:
    """Fit and evaluate the linear probe of ``cfg``; log it to ``tracker``; return its metrics
    (``checked``: the clip index already read and the weights resolved, by ``mtt.training.preflight``)."""
    start = time.perf_counter()
    p = prepare(cfg, d, cache=True, checked=checked)
    train, valid = p.train, p.valid
    if p.valid_is_test:  # the report split: choose the strength on training clips held out
        train, valid = carve_validation(p.train, CARVED_FRACTION, cfg.trainer.seed)
    tracker.set_tags(
        {
            REFERENCE_TAG: REFERENCE,
            "selection": "best_val",
            "probe_validation": "carved_from_train" if p.valid_is_test else "valid_split",
        }
    )
    derived = {
        "train_clips": len(train.clip_ids),
        "val_clips": len(valid.clip_ids),
        "test_clips": len(p.test.clip_ids),
        "n_tags": len(p.index.tags),
        "device": str(p.device),
        "embedding_dim": 2 * p.inputs.item_shape[0],
        "steps_per_epoch": 0,
        "truncated_clips": len(p.store.truncated),
    }
    log_records(
        cfg, tracker, derived, p.weights, p.store, {"train": train, "valid": valid, "test": p.test}, kind="linear probe"
    )
    emb = {
        name: clip_embeddings(p.inputs, s.clip_ids)
        for name, s in (("train", train), ("valid", valid), ("test", p.test))
    }
    probe, scores = fit_probe(emb["train"], train.labels, emb["valid"], valid.labels, list(cfg.probe.C))
    for i, rec in enumerate(scores):  # the validation curve over strengths, for the record
        tracker.log_metrics({"probe_C": rec["C"], "probe_val_roc_auc": rec["val_roc_auc"]}, step=i)
    tracker.log_params({"probe.selected_C": probe.C})
    val_probs = probe.predict(emb["valid"])
    # The probe scores one embedding per clip, so its chunk-level loss (a trained run's
    # val_chunk_loss, Won et al.'s criterion) is over one chunk per clip, the whole clip.
    val_chunk_loss = float(chunk_bce(val_probs, valid.labels).mean())
    val = {f"val_{k}": v for k, v in {**clip_metrics(valid.labels, val_probs), "chunk_loss": val_chunk_loss}.items()}
    selected = {f"selected_{k}": v for k, v in val.items()}
    test = log_test(
        tracker,
        p.index.tags,
        p.test,
        probe.predict(emb["test"]),
        step=0,
        seed=cfg.trainer.seed,
        extra={**val, **selected},
    )
    metrics = {**val, **selected, **test, "probe_seconds": time.perf_counter() - start}
    tracker.log_metrics({"probe_seconds": metrics["probe_seconds"]}, step=0)
    log.info(
        "linear probe (C=%g): %s",
        probe.C,
        " ".join(f"{k}={v:.4f}" for k, v in metrics.items() if k.startswith(("val_roc", "test_")) and "_ci" not in k),
    )
    return metrics
