"""Cluster quality against true labels (NMI, ARI, purity), the paper's top/bottom clusters, a size histogram.

Pure functions of label arrays. Rows whose true label or cluster is negative (unknown class, dropped
row) are left out of every measure.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score
from sklearn.metrics.cluster import contingency_matrix

from xdctools.errors import DataError


def _known(true: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    true, pred = np.asarray(true), np.asarray(pred)
    if true.shape != pred.shape or true.ndim != 1:
        raise DataError(f"true labels {true.shape} and clusters {pred.shape} are not aligned 1-D arrays")
    keep = (true >= 0) & (pred >= 0)
    return true[keep], pred[keep]


def purity(true: np.ndarray, pred: np.ndarray) -> float:
    """Fraction of rows whose class is the most frequent class of their cluster."""
    true, pred = _known(true, pred)
    if not len(true):
        return float("nan")
    return float(contingency_matrix(true, pred, sparse=True).max(axis=0).sum() / len(true))


def cluster_metrics(true: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    """NMI (arithmetic mean normalisation, scikit-learn's default), ARI, purity, and how many rows counted."""
    t, p = _known(true, pred)
    if not len(t):
        return {"nmi": float("nan"), "ari": float("nan"), "purity": float("nan"), "labelled": 0}
    return {
        "nmi": float(normalized_mutual_info_score(t, p)),
        "ari": float(adjusted_rand_score(t, p)),
        "purity": purity(t, p),
        "labelled": len(t),
    }


@dataclass(frozen=True)
class ClusterRow:
    """One line of the paper's Tables 5/6/13: a cluster, its purity rank and its most frequent classes."""

    rank: int  # 1 = purest
    cluster: int
    size: int  # labelled rows in the cluster
    purity: float
    classes: tuple[tuple[int, float], ...]  # (class, fraction of the cluster), most frequent first


def rank_clusters(true: np.ndarray, pred: np.ndarray, *, top_classes: int = 5) -> list[ClusterRow]:
    """Every non-empty cluster ranked by purity (ties: larger first), with its `top_classes` classes."""
    t, p = _known(true, pred)
    if not len(t):
        return []
    classes, t_idx = np.unique(t, return_inverse=True)
    clusters, p_idx = np.unique(p, return_inverse=True)
    flat = np.bincount(p_idx * len(classes) + t_idx, minlength=len(clusters) * len(classes))
    counts = flat.reshape(len(clusters), len(classes))
    sizes = counts.sum(axis=1)
    fractions = counts / sizes[:, None]
    pur = fractions.max(axis=1)
    order = np.lexsort((clusters, -sizes, -pur))
    rows = []
    for rank, c in enumerate(order, start=1):
        best = np.argsort(-counts[c], kind="stable")[:top_classes]
        best = best[counts[c, best] > 0]
        top = tuple((int(classes[j]), float(fractions[c, j])) for j in best)
        rows.append(ClusterRow(rank, int(clusters[c]), int(sizes[c]), float(pur[c]), top))
    return rows


def top_bottom(rows: Sequence[ClusterRow], count: int = 10) -> list[ClusterRow]:
    """The `count` purest and `count` least pure clusters (all of them when there are few)."""
    if len(rows) <= 2 * count:
        return list(rows)
    return [*rows[:count], *rows[-count:]]


def format_table(rows: Sequence[ClusterRow], class_names: Sequence[str] | None = None) -> str:
    """Text like the paper's Table 13: `rank  cluster  size  purity  class(0.70), class(0.04), ...`."""

    def name(c: int) -> str:
        return class_names[c] if class_names is not None and 0 <= c < len(class_names) else str(c)

    lines = [f"{'#':>4}  {'cluster':>7}  {'size':>7}  {'purity':>6}  classes (fraction of the cluster)"]
    previous = 0
    for row in rows:
        if row.rank != previous + 1:
            lines.append(f"{'...':>4}")
        concepts = ", ".join(f"{name(c)}({f:.2f})" for c, f in row.classes)
        lines.append(f"{row.rank:>4}  {row.cluster:>7}  {row.size:>7}  {row.purity:>6.2f}  {concepts}")
        previous = row.rank
    return "\n".join(lines)


def size_histogram_png(sizes: np.ndarray, *, title: str = "cluster sizes") -> bytes:
    """PNG of the histogram of cluster sizes (empty clusters included), for spotting collapse."""
    from matplotlib.figure import Figure  # no pyplot: renders with Agg, no global backend state
    from matplotlib.ticker import MaxNLocator

    sizes = np.asarray(sizes)
    fig = Figure(figsize=(6, 3.5), dpi=100)
    ax = fig.add_subplot()
    ax.hist(sizes, bins=min(50, max(1, len(np.unique(sizes)))), color="tab:blue", edgecolor="white")
    ax.set_xlabel("rows per cluster")
    ax.set_ylabel("clusters")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    empty = int((sizes == 0).sum())
    ax.set_title(f"{title}: k={len(sizes)}, min {sizes.min()}, max {sizes.max()}, empty {empty}")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()
