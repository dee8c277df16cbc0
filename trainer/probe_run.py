"""A run's probe of one iteration: rows of its feature stores and the true labels in, `probe` records out.

The videos are chosen here (held out, `run.eval_set`, or every labelled one for `run.probe_folds`), their
features read from the stores chunk by chunk (or, with `run.probe_clips`, the mean of several clips per video
extracted here), fitted and scored by trainer.evaluate.probe's pure functions, and logged on rank 0.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass, replace
from functools import partial
from typing import TYPE_CHECKING

import numpy as np

from trainer.data import ShardSet, eval_loader
from trainer.evaluate.probe import (
    binomial_se,
    cross_validated_probe,
    linear_probe,
    multilabel_probe,
    usable_folds,
)
from trainer.extract import Catalog, encoded_clips
from trainer.labels import num_classes, true_labels
from xdctools.errors import DataError
from xdctools.features.store import FeatureStore

if TYPE_CHECKING:
    from trainer.session import Session

PROBE_ROWS = 50_000  # at most this many videos fit / score a probe


@dataclass(frozen=True)
class ProbeSplit:
    """The videos a probe fits on (rows of the training store) and scores (rows of `test_store`)."""

    train_rows: np.ndarray
    test_store: FeatureStore
    test_catalog: Catalog
    test_rows: np.ndarray
    name: str  # "held-out", "<k>-fold" or the eval set's name
    folds: bool = False  # cross-validated: the training rows are the ones scored
    eval_set: str | None = None  # the test rows are this set's (not the training set's)


def probe_iteration(s: Session, store: FeatureStore | None, iteration: int) -> None:
    """Logistic regression on frozen pooled features vs the true labels (run.probe), on rank 0.

    Scored on the held-out videos, on `run.eval_set`, or by k-fold cross-validation over every labelled
    video (`run.probe_folds`). An accuracy comes with its binomial standard error over the videos scored
    (`se`). A multi-label set (AudioSet) is probed with one-vs-rest logistic regressions, scored by mAP.
    """
    if not s.recipe.run.probe or store is None or not s.dist.is_main:
        return
    split = probe_split(s, store, iteration)
    train_y, test_y = probe_targets(s, split)
    lacking = probe_lacking(split, train_y, test_y, multi_label=s.catalog.multi_label)
    if lacking is not None:  # said, not dropped: the report has no probe row for this iteration
        s.logger.log("probe_skipped", s.state.step, iteration=iteration, reason=lacking, split=split.name)
        warnings.warn(f"probe of iteration {iteration} skipped: {lacking}", stacklevel=2)
        return
    metric = "map" if s.catalog.multi_label else "accuracy"
    clips = s.recipe.run.probe_clips
    means = probe_clip_means(s, split, clips) if clips > 1 else None
    for modality in store.modalities:
        x_train, x_test = probe_features(store, split, modality, means)
        score = probe_score(s, x_train, x_test, train_y, test_y)
        record = {"iteration": iteration, "modality": modality, metric: score, "split": split.name}
        if metric == "accuracy":
            record["se"] = binomial_se(score, len(split.test_rows))
        if clips > 1:
            record["clips"] = clips
        s.logger.log("probe", s.state.step, **record, train=len(split.train_rows), test=len(split.test_rows))


def probe_split(s: Session, store: FeatureStore, iteration: int) -> ProbeSplit:
    """The labelled videos that fit and score the probe, at most PROBE_ROWS a side, drawn seeded by
    (seed, iteration)."""
    eval_name, folds = s.recipe.run.eval_set, s.recipe.run.probe_folds
    known = true_labels(s.catalog) >= 0
    test_store, test_catalog, name = store, s.catalog, "held-out"
    if eval_name is None and folds is not None:
        train_rows = test_rows = np.flatnonzero(known)
    elif eval_name is None:
        train_rows = np.flatnonzero(~s.held_out & known)
        test_rows = np.flatnonzero(s.held_out & known)
    else:
        test_store, test_catalog, name = s.eval_stores[eval_name], s.eval_set[1], eval_name
        train_rows = np.flatnonzero(known)
        test_rows = np.flatnonzero(true_labels(test_catalog) >= 0)
    rng = np.random.default_rng([s.recipe.seed, iteration, 0x9B])
    train_rows = np.sort(rng.permutation(train_rows)[:PROBE_ROWS])
    test_rows = train_rows if folds is not None else np.sort(rng.permutation(test_rows)[:PROBE_ROWS])
    if folds is not None:  # as many folds as the videos drawn allow
        name = f"{usable_folds(true_labels(s.catalog)[train_rows], folds)}-fold"
    return ProbeSplit(train_rows, test_store, test_catalog, test_rows, name, folds is not None, eval_name)


def probe_targets(s: Session, split: ProbeSplit) -> tuple[np.ndarray, np.ndarray]:
    """True labels of the training and test rows: (n,) classes, or (n, C) multi-hot on a multi-label set."""
    train, test = s.catalog, split.test_catalog
    if train.multi_label:
        classes = num_classes(s.shards, train)
        return train.multi_hot(split.train_rows, classes), test.multi_hot(split.test_rows, classes)
    return train.labels[split.train_rows], test.labels[split.test_rows]


def probe_lacking(
    split: ProbeSplit, train_y: np.ndarray, test_y: np.ndarray, *, multi_label: bool
) -> str | None:
    """Why the probe cannot be fitted or scored, or None when it can."""
    if len(split.test_rows) == 0:
        return f"no labelled test video ({split.name})"
    if multi_label:
        return None if test_y.any() else "no test video has a class"
    return None if len(np.unique(train_y)) >= 2 else "the training videos hold fewer than 2 classes"


def probe_features(
    store: FeatureStore,
    split: ProbeSplit,
    modality: str,
    means: Mapping[str, Mapping[str, np.ndarray]] | None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """(train, test) features of the probe's rows: the stores' rows, or with `means` (set -> modality ->
    (rows, d) clip means) those rows of the clip means; test is None when cross-validated."""
    if means is None:
        x_train = read_rows(store, modality, split.train_rows)
        x_test = None if split.folds else read_rows(split.test_store, modality, split.test_rows)
        return x_train, x_test
    x_train = means["train"][modality][split.train_rows]
    x_test = None if split.folds else means[split.eval_set or "train"][modality][split.test_rows]
    return x_train, x_test


def probe_score(
    s: Session, x_train: np.ndarray, x_test: np.ndarray | None, train_y: np.ndarray, test_y: np.ndarray
) -> float:
    """The probe's accuracy (cross-validated over the training rows when x_test is None), or its mAP on a
    multi-label set."""
    folds, seed = s.recipe.run.probe_folds, s.recipe.seed
    if x_test is None:
        return float(cross_validated_probe(x_train, train_y, folds, seed=seed).mean())
    fit = partial(multilabel_probe, device=s.device) if s.catalog.multi_label else linear_probe
    return fit(x_train, train_y, x_test, test_y, seed=seed)


def probe_clip_means(s: Session, split: ProbeSplit, clips: int) -> dict[str, dict[str, np.ndarray]]:
    """ "train" (and the eval set's name) -> modality -> (rows, d) features of the current encoders, each
    video's the mean over `clips` evenly spaced clips (run.probe_clips)."""
    means = {"train": clip_means(s, s.shards, s.catalog, clips, stage="train")}
    if split.eval_set is not None:
        shards, catalog = s.eval_set
        means[split.eval_set] = clip_means(s, shards, catalog, clips, stage=split.eval_set)
    return means


def clip_means(
    s: Session, shards: ShardSet, catalog: Catalog, clips: int, *, stage: str
) -> dict[str, np.ndarray]:
    """modality -> (rows, d) float32 in the catalog's row order: the mean of each video's `clips` evenly
    spaced clips (centre crop) through the encoders in eval mode. Rank 0 reads every sample of the set
    (the probe runs there alone); the encoders' train/eval modes are restored after."""
    encoders = dict(s.learner.encoders)
    model = s.recipe.model
    run = replace(s.runtime(seed=s.recipe.seed), rank=0, world_size=1)
    batch = max(1, s.recipe.optim_for(0).batch_size // clips)  # segments per batch: up to `clips` rows each
    loader = eval_loader(shards, batch_size=batch, num_clips=clips, clip=s.clip, run=run)
    rows = len(catalog.videos)
    sums = {m: np.zeros((rows, int(e.feature_dim)), np.float64) for m, e in encoders.items()}
    counts = np.zeros(rows, np.int64)
    features = encoded_clips(
        encoders, loader, device=s.device, precision=model.precision, channels_last=model.channels_last
    )
    for step, (batch_rows, feats) in enumerate(features, 1):
        at = catalog.rows_of(batch_rows["index"].numpy())
        for m, x in feats.items():
            np.add.at(sums[m], at, x)
        np.add.at(counts, at, 1)
        s.tick(f"probe {clips}-clip {stage}", step, len(loader))
    if not (counts == clips).all():
        bad = np.flatnonzero(counts != clips)[:3].tolist()
        raise DataError(f"{shards.tars[0].parent}: rows {bad} got {counts[bad].tolist()} clips, not {clips}")
    return {m: (x / clips).astype(np.float32) for m, x in sums.items()}


def read_rows(store: FeatureStore, modality: str, rows: np.ndarray) -> np.ndarray:
    """float32 features of the given (sorted) rows, read chunk by chunk."""
    out = np.empty((len(rows), store.dims[modality]), dtype=np.float32)
    for chunk in np.unique(rows // store.chunk_rows):
        start, stop = store.chunk_range(int(chunk))
        pick = (rows >= start) & (rows < stop)
        out[pick] = store.read(modality, start, stop)[rows[pick] - start]
    return out
