"""Out-of-core k-means: faiss on a uniform sample, optional streamed Lloyd passes, streamed assignment.

Clusters the assignment over all rows leaves empty are re-seeded from large ones (faiss' split rule, as
DeepCluster does) and every row reassigned, for at most RESEED_ROUNDS more streamed passes.

Memory is the sample (k * sample_per_centroid rows, float32), two streamed blocks (16 MiB each) and the
per-row outputs (labels int32, distances float32, sample index int64: 16 bytes a row; a refine pass
holds 12 more, re-seeding passes reuse them), whatever the width of the store. Measured:
benchmarks/cluster.py.

Output folder written by `save_result` (built under a temporary name, then renamed into place):
  labels.npy      (N,) int32, aligned with the store's rows; -1 for dropped non-finite rows
  distances.npy   (N,) float32, squared L2 to the assigned centroid in the clustered space; NaN if dropped
  centroids.npy   (k, d) float32, in the clustered space (after PCA-whitening when used)
  index.npy       (N,) int64, the store's global sample index of each row (absent for an in-memory array)
  transform.npz   PCA matrix (d, d_in) and bias (d,), when PCA-whitening was used
  stats.json      objective, cluster sizes, empty clusters, splits, re-seeding, imbalance, timings, parameters
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import faiss
import numpy as np
from faiss.contrib.clustering import reassign_centroids

from xdctools.cluster.assign import (
    VIEWS,
    ArrayRows,
    ChunkAssign,
    Progress,
    RowSource,
    StoreRows,
    Transform,
    l2_normalize,
    nonfinite_error,
)
from xdctools.errors import ConfigError, DataError
from xdctools.features.store import open_store, write_folder

RESEED_ROUNDS = 10  # most re-seed + reassign passes after the assignment, each one more read of every row


@dataclass
class ClusterResult:
    labels: np.ndarray  # (N,) int32, -1 for dropped rows
    distances: np.ndarray  # (N,) float32 squared L2, NaN for dropped rows
    centroids: np.ndarray  # (k, d) float32 in the clustered space
    stats: dict[str, Any]
    index: np.ndarray | None = None  # (N,) int64 global sample index, from a store
    transform: Transform = field(default_factory=Transform)

    @property
    def sizes(self) -> np.ndarray:
        return np.bincount(self.labels[self.labels >= 0], minlength=len(self.centroids))


def sample_rows(n: int, size: int, seed: int) -> np.ndarray:
    """Rows k-means trains on, sorted int64: all when size >= n, else `size` distinct uniform draws."""
    if size >= n:
        return np.arange(n, dtype=np.int64)
    return np.sort(np.random.default_rng(seed).choice(n, size=size, replace=False)).astype(np.int64)


def resolve_gpus(gpu: bool | int | str) -> int:
    """GPUs for faiss: "auto" -> all visible (0 with faiss-cpu), True -> all (>= 1), int -> that many."""
    available = faiss.get_num_gpus()
    if gpu == "auto":
        return available
    if gpu is False or gpu == 0:
        return 0
    wanted = available if gpu is True else int(gpu)
    if available == 0 or wanted > available:
        raise ConfigError(
            f"--gpu: {available} GPU(s) visible to faiss (is faiss-gpu installed?), asked for {gpu}"
        )
    return wanted


def imbalance(sizes: np.ndarray) -> float:
    """faiss' imbalance factor k * sum(s^2) / (sum s)^2: 1 when balanced, k when one cluster holds all."""
    total = float(sizes.sum())
    return float(len(sizes) * np.square(sizes, dtype=np.float64).sum() / total**2) if total else 0.0


def cluster_store(
    store_path: str | os.PathLike,
    *,
    k: int,
    view: str = "video",
    niter: int = 20,
    seed: int = 0,
    sample_per_centroid: int = 256,
    refine: int = 0,
    spherical: bool = False,
    pca: int | None = None,
    gpu: bool | int | str = "auto",
    drop_nonfinite: bool = False,
    reseed_empty: bool = True,
    progress: Progress | None = None,
) -> ClusterResult:
    """Cluster one view ("video", "audio" or "cdc") of a complete feature store."""
    if view not in VIEWS:
        raise ConfigError(f"view must be one of {', '.join(VIEWS)}, got '{view}'")
    store = open_store(store_path)
    store.require_complete()
    source = StoreRows(store, view)
    meta = {key: store.attrs[key] for key in ("checkpoint", "iteration") if key in store.attrs}
    result = _cluster(
        source,
        k=k,
        niter=niter,
        seed=seed,
        sample_per_centroid=sample_per_centroid,
        refine=refine,
        spherical=spherical,
        pca=pca,
        gpu=gpu,
        drop_nonfinite=drop_nonfinite,
        reseed_empty=reseed_empty,
        progress=progress,
    )
    result.index = store.read_index()
    result.stats.update(view=view, store=meta)
    return result


def cluster_array(
    x: np.ndarray,
    *,
    k: int,
    niter: int = 20,
    seed: int = 0,
    sample_per_centroid: int = 256,
    refine: int = 0,
    spherical: bool = False,
    pca: int | None = None,
    gpu: bool | int | str = "auto",
    drop_nonfinite: bool = False,
    reseed_empty: bool = True,
    progress: Progress | None = None,
    block_rows: int | None = None,
) -> ClusterResult:
    """Cluster an in-memory (N, d) float array through the same code path as a store."""
    source = ArrayRows(np.asarray(x))
    result = _cluster(
        source,
        k=k,
        niter=niter,
        seed=seed,
        sample_per_centroid=sample_per_centroid,
        refine=refine,
        spherical=spherical,
        pca=pca,
        gpu=gpu,
        drop_nonfinite=drop_nonfinite,
        reseed_empty=reseed_empty,
        progress=progress,
        block_rows=block_rows,
    )
    result.stats["view"] = "array"
    return result


def _check_params(source: RowSource, k: int, niter: int, spc: int, refine: int, pca: int | None) -> None:
    if k < 1:
        raise ConfigError(f"--k must be at least 1, got {k}")
    if k > source.n:
        raise ConfigError(f"{source.name}: k={k} is greater than the {source.n} rows to cluster")
    if niter < 1 or spc < 1 or refine < 0:
        raise ConfigError(
            f"--niter and --sample-per-centroid must be >= 1 and --refine >= 0 (got {niter}, {spc}, {refine})"
        )
    if pca is not None and not 1 <= pca <= source.dim:
        raise ConfigError(f"--pca must be in [1, {source.dim}] (the feature dimension), got {pca}")


def _cluster(
    source: RowSource,
    *,
    k: int,
    niter: int,
    seed: int,
    sample_per_centroid: int,
    refine: int,
    spherical: bool,
    pca: int | None,
    gpu: bool | int | str,
    drop_nonfinite: bool,
    reseed_empty: bool,
    progress: Progress | None,
    block_rows: int | None = None,
) -> ClusterResult:
    _check_params(source, k, niter, sample_per_centroid, refine, pca)
    gpus = resolve_gpus(gpu)
    policy = "drop" if drop_nonfinite else "raise"
    timings: dict[str, float] = {}
    t0 = time.perf_counter()

    # Uniform sample, read chunk by chunk; non-finite rows fail now (counted over the whole source) or drop.
    rows = sample_rows(source.n, k * sample_per_centroid, seed)
    raw = ChunkAssign(source, block_rows=block_rows, progress=progress, stage="sample")
    x = raw.get_subset(rows)
    finite = np.isfinite(x).all(axis=1)
    if not finite.all():
        if not drop_nonfinite:
            raise nonfinite_error(source.name, raw.scan_nonfinite(), source.n)
        x, rows = x[finite], rows[finite]
        if k > len(rows):
            raise ConfigError(f"{source.name}: k={k} is greater than the {len(rows)} finite sampled rows")
    timings["sample_s"] = time.perf_counter() - t0

    # PCA-whitening (fit on the sample) and/or l2 normalisation, then faiss k-means on the sample.
    t = time.perf_counter()
    transform = Transform.fit(x, pca=pca, spherical=spherical)
    x = transform.apply(x)
    d = x.shape[1]
    km = faiss.Kmeans(
        d,
        k,
        niter=niter,
        seed=seed,
        spherical=spherical,
        max_points_per_centroid=sample_per_centroid,
        min_points_per_centroid=1,
        gpu=gpus or False,
        verbose=False,
    )
    if progress:
        progress("train", 0, niter)
    km.train(x)
    if progress:
        progress("train", niter, niter)
    centroids = np.ascontiguousarray(km.centroids, dtype=np.float32)
    train_splits = int(sum(s["nsplit"] for s in km.iteration_stats))
    del x
    timings["train_s"] = time.perf_counter() - t

    metric = "ip" if spherical else "l2"
    assign = ChunkAssign(
        source,
        transform,
        metric=metric,
        gpus=gpus,
        nonfinite=policy,
        block_rows=block_rows,
        progress=progress,
    )

    # Optional Lloyd passes over every row, streamed; empty clusters split from large ones as faiss does.
    t = time.perf_counter()
    refine_stats = []
    rs = np.random.RandomState(seed + 1)
    for r in range(refine):
        assign.stage = f"refine {r + 1}/{refine}"
        labels, dist, sums = assign.assign_to(centroids)
        ok = labels >= 0
        counts = np.bincount(labels[ok], minlength=k)
        centroids = (sums / np.maximum(counts, 1)[:, None]).astype(np.float32)
        nsplit = reassign_centroids(counts.copy(), centroids, rs)
        if spherical:
            l2_normalize(centroids)
        refine_stats.append(
            {
                "objective": float(dist[ok].sum(dtype=np.float64)),
                "splits": nsplit,
                "imbalance": imbalance(counts),
            }
        )
    timings["refine_s"] = time.perf_counter() - t

    # One streaming assignment pass: labels and distances for every row.
    t = time.perf_counter()
    assign.stage = "assign"
    dist, labels = assign.perform_search(centroids, label_dtype=np.int32)
    timings["assign_s"] = time.perf_counter() - t

    # Empty clusters take a perturbed copy of a large one, then every row is assigned again (in place).
    t = time.perf_counter()
    empty_before = int(np.count_nonzero(np.bincount(labels[labels >= 0], minlength=k) == 0))
    rounds = reseeds = 0
    if reseed_empty and empty_before:
        rs = np.random.RandomState(seed + 2)
        centroids, rounds, reseeds = reseed_passes(assign, centroids, dist, labels, rs, spherical=spherical)
    timings["reseed_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - t0

    dropped = assign.bad_rows
    ok = labels >= 0
    sizes = np.bincount(labels[ok], minlength=k)
    stats = {
        "source": source.name,
        "n": source.n,
        "k": k,
        "input_dim": source.dim,
        "dim": d,
        "params": {
            "niter": niter,
            "seed": seed,
            "sample_per_centroid": sample_per_centroid,
            "refine": refine,
            "spherical": spherical,
            "pca": pca,
            "gpus": gpus,
            "drop_nonfinite": drop_nonfinite,
            "reseed_empty": reseed_empty,
        },
        "sample_size": len(rows),
        "objective": float(dist[ok].sum(dtype=np.float64)),
        "mean_distance": float(dist[ok].mean(dtype=np.float64)) if ok.any() else float("nan"),
        "sizes": sizes.tolist(),
        "min_size": int(sizes.min()),
        "max_size": int(sizes.max()),
        "empty_clusters": np.flatnonzero(sizes == 0).tolist(),
        "imbalance": imbalance(sizes),
        "splits": train_splits + sum(s["splits"] for s in refine_stats),
        "train": {"objective": [float(o) for o in km.obj], "splits": train_splits},
        "refine": refine_stats,
        "reseeded": {"empty_before": empty_before, "rounds": rounds, "clusters": reseeds},
        "dropped_rows": len(dropped),
        "dropped_first": dropped[:20].tolist(),
        "timings": timings,
    }
    return ClusterResult(labels=labels, distances=dist, centroids=centroids, stats=stats, transform=transform)


def reseed_centroids(
    centroids: np.ndarray,
    counts: np.ndarray,
    rs: np.random.RandomState,
    *,
    spherical: bool = False,
) -> tuple[np.ndarray, int]:
    """Empty centroids take a perturbed copy of a donor; returns (new centroids, number re-seeded).

    faiss' split rule (Clustering.cpp's split_clusters, here through faiss.contrib's `reassign_centroids`):
    the donor is drawn with probability size - 1 among clusters of size > 1; the empty one becomes
    donor * fac and the donor donor / fac, fac being 1 + 1/1024 and 1 - 1/1024 on alternate dimensions (so
    a pair differs in direction, not only norm, and stays apart after l2 normalisation). A donor keeps one
    of its rows, so at most sum(size - 1) empties are re-seeded, the lowest-numbered first; the others stay
    empty. The inputs are left unchanged.
    """
    counts = np.asarray(counts, dtype=np.int64)
    empty = np.flatnonzero(counts == 0)
    n = min(len(empty), int(np.maximum(counts - 1, 0).sum()))
    new = np.array(centroids, dtype=np.float32)
    if n == 0:
        return new, 0
    hassign = counts.copy()
    hassign[empty[n:]] = 1  # neither empty nor a donor: faiss leaves them (and never runs out of donors)
    nsplit = reassign_centroids(hassign, new, rs)
    if spherical:
        l2_normalize(new)
    return new, int(nsplit)


def reseed_passes(
    assign: ChunkAssign,
    centroids: np.ndarray,
    dist: np.ndarray,
    labels: np.ndarray,
    rs: np.random.RandomState,
    *,
    spherical: bool,
    rounds: int = RESEED_ROUNDS,
) -> tuple[np.ndarray, int, int]:
    """Re-seed empty clusters and reassign every row into `dist`, `labels` (in place), until none is empty.

    Stops after `rounds` passes or when no cluster can spare a row; clusters that stay empty (e.g. fewer
    distinct rows than k) are left to the caller to report. Returns (centroids, passes, re-seedings).
    """
    k, done, total = len(centroids), 0, 0
    while done < rounds:
        counts = np.bincount(labels[labels >= 0], minlength=k)
        if counts.all():
            break
        centroids, n = reseed_centroids(centroids, counts, rs, spherical=spherical)
        if n == 0:
            break
        done, total = done + 1, total + n
        assign.stage = f"reseed {done}"
        assign.perform_search(centroids, out=(dist, labels))
    return centroids, done, total


def save_result(
    result: ClusterResult,
    out: str | os.PathLike,
    *,
    extra_files: dict[str, bytes] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the output folder (module docstring) atomically; `extra_files` (name -> bytes) go with it."""

    def write(tmp: Path) -> None:
        np.save(tmp / "labels.npy", result.labels.astype(np.int32, copy=False))
        np.save(tmp / "distances.npy", result.distances.astype(np.float32, copy=False))
        np.save(tmp / "centroids.npy", result.centroids.astype(np.float32, copy=False))
        if result.index is not None:
            np.save(tmp / "index.npy", result.index.astype(np.int64, copy=False))
        if result.transform.matrix is not None:
            np.savez(tmp / "transform.npz", matrix=result.transform.matrix, bias=result.transform.bias)
        (tmp / "stats.json").write_text(json.dumps(result.stats, indent=1) + "\n")
        for name, data in (extra_files or {}).items():
            (tmp / name).write_bytes(data)

    return write_folder(Path(out), write, overwrite=overwrite)


def load_result(out: str | os.PathLike) -> ClusterResult:
    """Read a folder written by save_result (the training loop reads labels from here)."""
    out = Path(out)
    try:
        stats = json.loads((out / "stats.json").read_text())
        labels, distances = np.load(out / "labels.npy"), np.load(out / "distances.npy")
        centroids = np.load(out / "centroids.npy")
        index = np.load(out / "index.npy") if (out / "index.npy").exists() else None
        transform = Transform(normalize=bool(stats["params"]["spherical"]))
        if (out / "transform.npz").exists():
            with np.load(out / "transform.npz") as z:
                transform = Transform(matrix=z["matrix"], bias=z["bias"], normalize=True)
    except (OSError, ValueError, KeyError) as e:
        raise DataError(f"{out}: not a readable clustering output ({type(e).__name__}: {e})") from None
    return ClusterResult(labels, distances, centroids, stats, index, transform)
