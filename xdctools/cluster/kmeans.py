"""Out-of-core k-means: faiss on a uniform sample, optional streamed Lloyd passes, streamed assignment.

Clusters the assignment over all rows leaves empty are re-seeded from large ones (faiss' split rule, as
DeepCluster does) and every row reassigned, for at most RESEED_ROUNDS more streamed passes.

Memory is the sample (k * sample_per_centroid rows, float32) and two streamed blocks (16 MiB each),
whatever N and the width of the store: the per-row outputs (labels int32, distances float32, the store's
index int64: 16 bytes a row) are written block by block into their .npy files as each pass produces them
(rowfiles.py; plain writes, no memory map written through), refine passes keep only per-cluster sums, and
re-seeding passes overwrite the files in place. `cluster_store` writes them into `workdir` (`xdctools
cluster` passes its output folder's temporary folder, so they are written where they end up), by default a
new temporary folder (tempfile's: $TMPDIR) removed with the result; the result's labels, distances and
index are read-only memory maps of those files, costing memory only for the pages a consumer reads (the
training loop reads all labels: 4 bytes a row). `cluster_array` (data in memory already) keeps them in
memory unless given a `workdir`. Measured: benchmarks/cluster.py.

Output folder written by `save_result` (built under a temporary name, then renamed into place; per-row
files already on disk are hard-linked, or copied, not read into memory):
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
import shutil
import tempfile
import time
import weakref
from collections.abc import Callable
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
from xdctools.cluster.rowfiles import Column, NpyColumn, PassTally, new_column
from xdctools.errors import ConfigError, DataError
from xdctools.features.store import WRITTEN, FeatureStore, open_store, write_folder

RESEED_ROUNDS = 10  # most re-seed + reassign passes after the assignment, each one more read of every row
ROW_FILES = {"labels": ("labels.npy", np.int32), "distances": ("distances.npy", np.float32)}
INDEX_FILE = ("index.npy", np.int64)
META_ROWS = 1 << 18  # rows of the store's written marks / index read at a time (256 KiB / 2 MiB)


@dataclass
class ClusterResult:
    """k-means output. From `cluster_store` (or a `workdir`), labels, distances and index are read-only
    memory maps of the .npy files written during the passes (`files`), usable as arrays."""

    labels: np.ndarray  # (N,) int32, -1 for dropped rows
    distances: np.ndarray  # (N,) float32 squared L2, NaN for dropped rows
    centroids: np.ndarray  # (k, d) float32 in the clustered space
    stats: dict[str, Any]
    index: np.ndarray | None = None  # (N,) int64 global sample index, from a store
    transform: Transform = field(default_factory=Transform)
    # attribute -> (.npy file, the memory map of it set as that attribute): what save_result links
    files: dict[str, tuple[Path, np.ndarray]] = field(default_factory=dict, repr=False, compare=False)

    @property
    def sizes(self) -> np.ndarray:
        """Rows per cluster: the final pass's tally (stats), else counted from the labels."""
        if "sizes" in self.stats:
            return np.asarray(self.stats["sizes"], dtype=np.int64)
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


@dataclass(frozen=True)
class KMeansParams:
    """What one k-means run is asked for: a recipe's `clustering` block or `xdctools cluster`'s options.

    gpu: "auto" (every GPU faiss sees; none with faiss-cpu), True (all, at least one), an int (that
    many), False/0 (CPU). drop_nonfinite: rows with NaN/inf are labelled -1 instead of failing the run.
    """

    k: int
    niter: int = 20
    seed: int = 0
    sample_per_centroid: int = 256
    refine: int = 0
    spherical: bool = False
    pca: int | None = None
    gpu: bool | int | str = "auto"
    drop_nonfinite: bool = False
    reseed_empty: bool = True

    def check(self, source: RowSource) -> None:
        """ConfigError naming the option when the parameters cannot cluster `source`."""
        if self.k < 1:
            raise ConfigError(f"--k must be at least 1, got {self.k}")
        if self.k > source.n:
            raise ConfigError(f"{source.name}: k={self.k} is greater than the {source.n} rows to cluster")
        if self.niter < 1 or self.sample_per_centroid < 1 or self.refine < 0:
            raise ConfigError(
                "--niter and --sample-per-centroid must be >= 1 and --refine >= 0 "
                f"(got {self.niter}, {self.sample_per_centroid}, {self.refine})"
            )
        if self.pca is not None and not 1 <= self.pca <= source.dim:
            raise ConfigError(f"--pca must be in [1, {source.dim}] (the feature dimension), got {self.pca}")

    def recorded(self, gpus: int) -> dict[str, Any]:
        """stats.json's `params`: all but k (recorded beside them), with the GPUs actually used."""
        return {
            "niter": self.niter,
            "seed": self.seed,
            "sample_per_centroid": self.sample_per_centroid,
            "refine": self.refine,
            "spherical": self.spherical,
            "pca": self.pca,
            "gpus": gpus,
            "drop_nonfinite": self.drop_nonfinite,
            "reseed_empty": self.reseed_empty,
        }


def cluster_store(
    store_path: str | os.PathLike,
    params: KMeansParams,
    *,
    view: str = "video",
    progress: Progress | None = None,
    workdir: str | os.PathLike | None = None,
) -> ClusterResult:
    """Cluster one view ("video", "audio" or "cdc") of a complete feature store.

    labels.npy, distances.npy and index.npy are written block by block into the existing folder `workdir`
    (by default a new temporary folder, removed when the result is garbage-collected; a file that
    `save_result` linked stays); the result maps them read-only, so memory does not grow with N.
    """
    if view not in VIEWS:
        raise ConfigError(f"view must be one of {', '.join(VIEWS)}, got '{view}'")
    store = open_store(store_path)
    require_complete(store)
    source = StoreRows(store, view)
    meta = {key: store.attrs[key] for key in ("checkpoint", "iteration") if key in store.attrs}
    scratch = None if workdir is not None else Path(tempfile.mkdtemp(prefix="xdctools-cluster-"))
    folder = Path(workdir) if workdir is not None else scratch
    try:
        result = _cluster(source, params, progress=progress, workdir=folder)
        path = folder / INDEX_FILE[0]
        result.index = write_index(store, NpyColumn(path, store.n, INDEX_FILE[1]))
        result.files["index"] = (path, result.index)
    except BaseException:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
        raise
    if scratch is not None:  # the maps stay valid after the files are removed (POSIX)
        weakref.finalize(result, shutil.rmtree, scratch, True)
    result.stats.update(view=view, store=meta)
    return result


def cluster_store_to(
    out: str | os.PathLike,
    store_path: str | os.PathLike,
    params: KMeansParams,
    *,
    view: str = "video",
    overwrite: bool = False,
    extra_files: Callable[[ClusterResult], dict[str, bytes]] | None = None,
    progress: Progress | None = None,
) -> ClusterResult:
    """`cluster_store(store_path, params, view=view)` saved as the folder `out` (`save_result`'s files), its
    per-row files written straight into the folder's temporary name, which is renamed into place when
    complete: no scratch copy in $TMPDIR, nothing to link or copy after. `extra_files(result)` (name ->
    bytes) are written with them. The result's per-row arrays map the files now in `out`."""
    out = Path(out)
    done: list[ClusterResult] = []

    def write(tmp: Path) -> None:
        result = cluster_store(store_path, params, view=view, progress=progress, workdir=tmp)
        write_result_files(result, tmp, extra_files=None if extra_files is None else extra_files(result))
        done.append(result)

    write_folder(out, write, overwrite=overwrite)
    result = done[0]
    result.files = {name: (out / path.name, array) for name, (path, array) in result.files.items()}
    return result


def _row_blocks(store: FeatureStore) -> list[tuple[int, int]]:
    step = max(1, META_ROWS // store.chunk_rows) * store.chunk_rows
    return [(start, min(start + step, store.n)) for start in range(0, store.n, step)]


def require_complete(store: FeatureStore) -> None:
    """`store.require_complete()` reading the written-row marks block by block (it reads them whole and
    converts them twice: 3 bytes a row, which the allocator then keeps); its error when rows miss."""
    marks = store.group[WRITTEN]  # the store's Zarr array, read here only: store.py has no blockwise check
    for start, stop in _row_blocks(store):
        if not marks[start:stop].all():
            store.require_complete()  # raises, naming the missing rows


def write_index(store: FeatureStore, column: Column) -> np.ndarray:
    """The store's index (global sample index of each row) copied into `column` block by block."""
    try:
        for start, stop in _row_blocks(store):
            column.write(start, store.read_index(start, stop))
    except BaseException:
        column.close()
        raise
    return column.finish()


def cluster_array(
    x: np.ndarray,
    params: KMeansParams,
    *,
    progress: Progress | None = None,
    block_rows: int | None = None,
    workdir: str | os.PathLike | None = None,
) -> ClusterResult:
    """Cluster an in-memory (N, d) float array through the same code path as a store.

    Labels and distances are kept in memory (8 bytes a row, small beside the data), or written into the
    existing folder `workdir` as `cluster_store` does.
    """
    source = ArrayRows(np.asarray(x))
    folder = None if workdir is None else Path(workdir)
    result = _cluster(source, params, progress=progress, block_rows=block_rows, workdir=folder)
    result.stats["view"] = "array"
    return result


def _cluster(
    source: RowSource,
    params: KMeansParams,
    *,
    progress: Progress | None,
    block_rows: int | None = None,
    workdir: Path | None = None,
) -> ClusterResult:
    """The steps of one k-means run, each timed: sample, train on it, refine, assign (+ re-seed)."""
    params.check(source)
    gpus = resolve_gpus(params.gpu)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    rows, x = _training_sample(source, params, block_rows, progress)
    timings["sample_s"] = time.perf_counter() - t0

    t = time.perf_counter()
    transform = Transform.fit(x, pca=params.pca, spherical=params.spherical)
    km = _train(transform.apply(x), params, gpus, progress)
    del x
    centroids = np.ascontiguousarray(km.centroids, dtype=np.float32)
    timings["train_s"] = time.perf_counter() - t

    assign = ChunkAssign(
        source,
        transform,
        metric="ip" if params.spherical else "l2",
        gpus=gpus,
        nonfinite="drop" if params.drop_nonfinite else "raise",
        block_rows=block_rows,
        progress=progress,
    )
    t = time.perf_counter()
    centroids, refine_stats = _refine(assign, centroids, params)
    timings["refine_s"] = time.perf_counter() - t

    t = time.perf_counter()
    centroids, tally, arrays, columns, reseeded = _assign(assign, centroids, params, workdir, source.n)
    reseed_s = reseeded.pop("seconds")
    timings["assign_s"] = time.perf_counter() - t - reseed_s
    timings["reseed_s"] = reseed_s
    timings["total_s"] = time.perf_counter() - t0

    train_splits = int(sum(s["nsplit"] for s in km.iteration_stats))
    stats = {
        "source": source.name,
        "n": source.n,
        "k": params.k,
        "input_dim": source.dim,
        "dim": len(centroids[0]),
        "params": params.recorded(gpus),
        "sample_size": len(rows),
        **_tally_stats(tally),
        "splits": train_splits + sum(s["splits"] for s in refine_stats),
        "train": {"objective": [float(o) for o in km.obj], "splits": train_splits},
        "refine": refine_stats,
        "reseeded": reseeded,
        "dropped_rows": len(assign.bad_rows),
        "dropped_first": assign.bad_rows[:20].tolist(),
        "timings": timings,
    }
    files = {name: (c.path, arrays[name]) for name, c in columns.items() if isinstance(c, NpyColumn)}
    return ClusterResult(
        arrays["labels"], arrays["distances"], centroids, stats, transform=transform, files=files
    )


def _training_sample(
    source: RowSource, params: KMeansParams, block_rows: int | None, progress: Progress | None
) -> tuple[np.ndarray, np.ndarray]:
    """(rows, their features): the uniform sample k-means trains on, read chunk by chunk. Non-finite
    rows fail now (counted over the whole source) or are dropped from the sample."""
    rows = sample_rows(source.n, params.k * params.sample_per_centroid, params.seed)
    raw = ChunkAssign(source, block_rows=block_rows, progress=progress, stage="sample")
    x = raw.get_subset(rows)
    finite = np.isfinite(x).all(axis=1)
    if not finite.all():
        if not params.drop_nonfinite:
            raise nonfinite_error(source.name, raw.scan_nonfinite(), source.n)
        x, rows = x[finite], rows[finite]
        if params.k > len(rows):
            raise ConfigError(
                f"{source.name}: k={params.k} is greater than the {len(rows)} finite sampled rows"
            )
    return rows, x


def _train(x: np.ndarray, params: KMeansParams, gpus: int, progress: Progress | None) -> faiss.Kmeans:
    """faiss k-means on the (transformed) sample."""
    km = faiss.Kmeans(
        x.shape[1],
        params.k,
        niter=params.niter,
        seed=params.seed,
        spherical=params.spherical,
        max_points_per_centroid=params.sample_per_centroid,
        min_points_per_centroid=1,
        gpu=gpus or False,
        verbose=False,
    )
    if progress:
        progress("train", 0, params.niter)
    km.train(x)
    if progress:
        progress("train", params.niter, params.niter)
    return km


def _refine(
    assign: ChunkAssign, centroids: np.ndarray, params: KMeansParams
) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """`params.refine` Lloyd passes over every row, streamed: per-cluster sums, sizes and objective tallied
    block by block (nothing kept per row); empty clusters split from large ones as faiss does."""
    refine_stats = []
    rs = np.random.RandomState(params.seed + 1)
    for r in range(params.refine):
        assign.stage = f"refine {r + 1}/{params.refine}"
        tally = assign.tally_pass(centroids, sums=True)
        counts = tally.counts
        centroids = (tally.sums / np.maximum(counts, 1)[:, None]).astype(np.float32)
        nsplit = reassign_centroids(counts.copy(), centroids, rs)
        if params.spherical:
            l2_normalize(centroids)
        refine_stats.append({"objective": tally.objective, "splits": nsplit, "imbalance": imbalance(counts)})
    return centroids, refine_stats


def _assign(
    assign: ChunkAssign, centroids: np.ndarray, params: KMeansParams, workdir: Path | None, n: int
) -> tuple[np.ndarray, PassTally, dict[str, np.ndarray], dict[str, Column], dict[str, Any]]:
    """One streaming assignment pass: labels and distances of every row written block by block (into
    workdir's labels.npy and distances.npy, or memory), sizes and objective tallied meanwhile; then empty
    clusters take a perturbed copy of a large one and every row is assigned again, in place.

    Returns (centroids, the last pass's tally, the finished arrays, their columns, the re-seeding record
    with `seconds` spent re-seeding)."""
    columns: dict[str, Column] = {}
    try:
        for name, (file, dtype) in ROW_FILES.items():
            columns[name] = new_column(workdir, file, n, dtype)
        assign.stage = "assign"
        tally = assign.tally_pass(centroids, **columns)
        t = time.perf_counter()
        empty_before = int(np.count_nonzero(tally.counts == 0))
        rounds = reseeds = 0
        if params.reseed_empty and empty_before:
            rs = np.random.RandomState(params.seed + 2)
            centroids, rounds, reseeds, tally = reseed_passes(
                assign,
                centroids,
                tally,
                columns["labels"],
                columns["distances"],
                rs,
                spherical=params.spherical,
            )
        seconds = time.perf_counter() - t
    except BaseException:
        for column in columns.values():
            column.close()
        raise
    arrays = {name: column.finish() for name, column in columns.items()}
    reseeded = {"empty_before": empty_before, "rounds": rounds, "clusters": reseeds, "seconds": seconds}
    return centroids, tally, arrays, columns, reseeded


def _tally_stats(tally: PassTally) -> dict[str, Any]:
    """stats.json's fields of the final assignment: objective, sizes, empty clusters, balance."""
    sizes = tally.counts
    return {
        "objective": tally.objective,
        "mean_distance": tally.mean_distance,
        "sizes": sizes.tolist(),
        "min_size": int(sizes.min()),
        "max_size": int(sizes.max()),
        "empty_clusters": np.flatnonzero(sizes == 0).tolist(),
        "imbalance": imbalance(sizes),
    }


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
    tally: PassTally,
    labels: Column,
    distances: Column,
    rs: np.random.RandomState,
    *,
    spherical: bool,
    rounds: int = RESEED_ROUNDS,
) -> tuple[np.ndarray, int, int, PassTally]:
    """Re-seed empty clusters and reassign every row into the columns `labels` and `distances` (files
    overwritten in place, block by block), until none is empty; `tally` is the last pass's.

    Stops after `rounds` passes or when no cluster can spare a row; clusters that stay empty (e.g. fewer
    distinct rows than k) are left to the caller to report. Returns (centroids, passes, re-seedings, the
    tally of the pass that wrote the columns last).
    """
    done, total = 0, 0
    while done < rounds:
        if tally.counts.all():
            break
        centroids, n = reseed_centroids(centroids, tally.counts, rs, spherical=spherical)
        if n == 0:
            break
        done, total = done + 1, total + n
        assign.stage = f"reseed {done}"
        tally = assign.tally_pass(centroids, labels=labels, distances=distances)
    return centroids, done, total, tally


def save_result(
    result: ClusterResult,
    out: str | os.PathLike,
    *,
    extra_files: dict[str, bytes] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the output folder (module docstring) atomically; `extra_files` (name -> bytes) go with it."""
    return write_folder(
        Path(out), lambda tmp: write_result_files(result, tmp, extra_files=extra_files), overwrite=overwrite
    )


def write_result_files(
    result: ClusterResult, folder: str | os.PathLike, *, extra_files: dict[str, bytes] | None = None
) -> None:
    """The output files of `result` in the existing `folder` (what save_result renames into place).

    A per-row array that is still the map of its file (`result.files`) is not read: a file already in
    `folder` (written there by `cluster_store(workdir=folder)`) is kept, another is hard-linked, or
    copied by the kernel where it cannot be; any other array is saved with np.save.
    """
    folder = Path(folder)
    rows = {**ROW_FILES, "index": INDEX_FILE}
    for name, (file, dtype) in rows.items():
        array = getattr(result, name)
        if array is None:
            continue
        source, mapped = result.files.get(name, (None, None))
        if source is not None and mapped is array and source.exists():
            _place_file(source, folder / file)
        else:
            np.save(folder / file, np.asarray(array).astype(dtype, copy=False))
    np.save(folder / "centroids.npy", result.centroids.astype(np.float32, copy=False))
    if result.transform.matrix is not None:
        np.savez(folder / "transform.npz", matrix=result.transform.matrix, bias=result.transform.bias)
    (folder / "stats.json").write_text(json.dumps(result.stats, indent=1) + "\n")
    for name, data in (extra_files or {}).items():
        (folder / name).write_bytes(data)


def _place_file(source: Path, dest: Path) -> None:
    """`dest` with the contents of `source`, without reading them into this process."""
    if dest.exists() and os.path.samefile(source, dest):
        return
    try:
        os.link(source, dest)
    except OSError:  # another filesystem, or one without hard links
        shutil.copyfile(source, dest)


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
