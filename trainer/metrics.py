"""Multi-label evaluation (AudioSet): average precision per class and its macro mean, the number the
AudioSet papers report as mAP.

Average precision is the area under the precision-recall curve taken as a step function, exactly as
scikit-learn's `average_precision_score` computes it: AP = sum over score thresholds t (from the highest)
of (R(t) - R(t_prev)) * P(t). Videos with equal scores form one threshold, so ties count together rather
than in an arbitrary order. No interpolation.
"""

from __future__ import annotations

import numpy as np


def average_precision(scores: np.ndarray, targets: np.ndarray) -> float:
    """AP of one class: `scores` (N,) any real numbers, `targets` (N,) 0/1. NaN when no target is 1
    (recall is then 0 / 0: the class cannot be ranked)."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 1 or not np.isfinite(scores).all():
        raise ValueError(f"scores must be a vector of finite numbers, got shape {scores.shape}")
    positive = _binary(targets, scores.shape)
    total = int(positive.sum())
    if total == 0:
        return float("nan")
    order = np.argsort(-scores, kind="stable")
    ranked_scores, hits = scores[order], positive[order]
    true_pos = np.cumsum(hits)
    # the last position of each run of equal scores is a threshold; a tie counts as one step
    threshold = np.r_[ranked_scores[1:] != ranked_scores[:-1], True]
    tp = true_pos[threshold]
    precision = tp / (np.flatnonzero(threshold) + 1)
    recall_step = np.diff(np.r_[0, tp]) / total
    return float(np.sum(recall_step * precision))


def average_precisions(scores: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """(C,) AP of each class of (N, C) `scores` against (N, C) 0/1 `targets`; NaN for a class with no
    positive."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 2:
        raise ValueError(f"scores must be (videos, classes), got shape {scores.shape}")
    positive = _binary(targets, scores.shape)
    return np.array([average_precision(scores[:, c], positive[:, c]) for c in range(scores.shape[1])])


def mean_average_precision(scores: np.ndarray, targets: np.ndarray) -> float:
    """Macro mAP: the mean of the per-class APs over the classes with at least one positive.

    A class without positives has no AP (NaN in `average_precisions`) and is left out of the mean rather
    than counted as 0 or 1 — an evaluation subset that lacks a class neither lowers nor inflates the
    score. Every AudioSet class has positives in the full eval set (at least 59 each), where this equals
    the usual mean over all 527 classes. ValueError when no class has a positive.
    """
    per_class = average_precisions(scores, targets)
    defined = ~np.isnan(per_class)
    if not defined.any():
        raise ValueError("mAP is undefined: no class has a positive target")
    return float(per_class[defined].mean())


def _binary(targets: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Targets as float64 0/1 of the scores' shape; ValueError naming what is wrong."""
    targets = np.asarray(targets)
    if targets.shape != shape:
        raise ValueError(f"targets have shape {targets.shape}, scores {shape}")
    values = targets.astype(np.float64)
    if not np.isin(values, (0.0, 1.0)).all():
        raise ValueError("targets must be 0 or 1 (multi-hot)")
    return values
