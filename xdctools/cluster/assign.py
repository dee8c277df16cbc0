"""Rows to cluster, streamed block by block: views of a feature store or array, and the faiss assign object.

`ChunkAssign` has the interface of faiss.contrib.clustering's DatasetAssign (count, dim, get_subset,
perform_search, assign_to), so `faiss.contrib.clustering.kmeans` and our own Lloyd passes run over a
store without loading it: each pass reads whole store chunks in order, a background thread reading
and converting the next block while faiss assigns the current one. `tally_pass` writes each block's
labels and distances into columns (files, for a store: rowfiles.py) as it goes, so its memory is two
blocks whatever N is; `perform_search` and `assign_to` (the faiss interface) return in-memory per-row
arrays (labels int64 and distances float32).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

import faiss
import numpy as np

from xdctools.cluster.rowfiles import Column, PassTally, block_sums
from xdctools.errors import ConfigError, DataError
from xdctools.features.store import FeatureStore

VIEWS = ("video", "audio", "cdc")
BLOCK_BYTES = 16 << 20  # float32 bytes per streamed block (two live at a time)
# Stored bytes per store read (whole chunks): a block is filled by several reads, so the arrays each read
# allocates stay small. With one read per block, glibc kept ~60 MB more of freed read buffers, a plateau
# reached only after a few hundred blocks, so the peak RSS grew with N up to it (1M vs 8M rows x 64 dims:
# +15 MB); with 4 MiB reads it is ~40 MB lower and reached within the first pass, for ~10% more read time.
READ_BYTES = 4 << 20
Progress = Callable[[str, int, int], None]  # (stage, done, total) in rows or iterations


class RowSource(Protocol):
    """Float32 rows of the space to cluster, read by contiguous range."""

    name: str  # for messages: the store path or "array"
    n: int
    dim: int
    chunk_rows: int  # reads aligned to multiples of this are cheapest

    def read_into(self, start: int, stop: int, out: np.ndarray) -> None:
        """Fill out[: stop - start] (float32, C order) with rows [start, stop)."""


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit norm in place (zero rows stay zero); returns x."""
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    with np.errstate(invalid="ignore"):  # inf rows become NaN rows; the passes report them
        np.divide(x, norms, out=x, where=norms > 0)
    return x


class StoreRows:
    """One view of a feature store: a modality's rows, or CDC's [l2n(video), l2n(audio)] built per block."""

    def __init__(self, store: FeatureStore, view: str) -> None:
        if view not in VIEWS:
            raise ConfigError(f"view must be one of {', '.join(VIEWS)}, got '{view}'")
        parts = ("video", "audio") if view == "cdc" else (view,)
        if missing := [m for m in parts if m not in store.dims]:
            raise DataError(
                f"{store.path}: view '{view}' needs '{missing[0]}' features, the store has "
                f"{', '.join(store.modalities)}"
            )
        self.store, self.view, self.parts = store, view, parts
        self.name, self.n, self.chunk_rows = str(store.path), store.n, store.chunk_rows
        self.dim = sum(store.dims[m] for m in parts)

    def read_into(self, start: int, stop: int, out: np.ndarray) -> None:
        col = 0
        for m in self.parts:
            d = self.store.dims[m]
            step = max(1, READ_BYTES // (d * self.store.dtype.itemsize) // self.chunk_rows) * self.chunk_rows
            for a in range(start, stop, step):
                b = min(a + step, stop)
                np.copyto(out[a - start : b - start, col : col + d], self.store.read(m, a, b))
            if self.view == "cdc":
                l2_normalize(out[: stop - start, col : col + d])
            col += d


class ArrayRows:
    """An in-memory (N, d) array as a row source: the trainer's small-data path, same code as a store."""

    def __init__(self, x: np.ndarray, name: str = "array", chunk_rows: int = 4096) -> None:
        if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
            raise DataError(f"{name}: expected a non-empty (N, d) array, got shape {x.shape}")
        if x.dtype.kind != "f":
            raise DataError(f"{name}: expected float features, got {x.dtype}")
        self.x, self.name, self.chunk_rows = x, name, chunk_rows
        self.n, self.dim = x.shape

    def read_into(self, start: int, stop: int, out: np.ndarray) -> None:
        np.copyto(out[: stop - start], self.x[start:stop])


@dataclass(frozen=True)
class Transform:
    """Applied to every block after the view: PCA-whitening x @ matrix.T + bias, then l2 normalisation."""

    matrix: np.ndarray | None = None  # (d_out, d_in) float32
    bias: np.ndarray | None = None  # (d_out,) float32
    normalize: bool = False

    def out_dim(self, d_in: int) -> int:
        return d_in if self.matrix is None else self.matrix.shape[0]

    def apply(self, x: np.ndarray) -> np.ndarray:
        """x: (n, d_in) float32, may be modified in place; returns (n, d_out) float32."""
        if self.matrix is not None:
            x = x @ self.matrix.T
            x += self.bias
        return l2_normalize(x) if self.normalize else x

    @property
    def identity(self) -> bool:
        return self.matrix is None and not self.normalize

    @classmethod
    def fit(cls, sample: np.ndarray, *, pca: int | None, spherical: bool) -> Transform:
        """DeepCluster's preprocessing when `pca`: PCA to `pca` dims, whiten, l2-normalise rows."""
        if pca is None:
            return cls(normalize=spherical)
        mat = faiss.PCAMatrix(sample.shape[1], pca, -0.5)
        mat.train(np.ascontiguousarray(sample, dtype=np.float32))
        matrix = faiss.vector_to_array(mat.A).reshape(pca, sample.shape[1]).astype(np.float32)
        bias = faiss.vector_to_array(mat.b).astype(np.float32)
        if not (np.isfinite(matrix).all() and np.isfinite(bias).all()):
            raise ConfigError(f"PCA to {pca} dims: the sample has fewer than {pca} informative directions")
        return cls(matrix=matrix, bias=bias, normalize=True)


def make_index(centroids: np.ndarray, *, metric: str, gpus: int) -> faiss.Index:
    """A flat index over the centroids: on all `gpus` GPUs (replicated) or on the CPU when gpus == 0."""
    d = centroids.shape[1]
    index = faiss.IndexFlatIP(d) if metric == "ip" else faiss.IndexFlatL2(d)
    if gpus > 0:
        index = faiss.index_cpu_to_all_gpus(index, ngpu=gpus)
    index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    return index


class ChunkAssign:
    """faiss.contrib.clustering assign object over a row source, streaming; sums in float64.

    Non-finite rows (after the view and transform) get label -1 and distance NaN and are left out of
    the sums; `nonfinite="raise"` then fails the pass with a DataError naming how many and where.
    """

    def __init__(
        self,
        source: RowSource,
        transform: Transform | None = None,
        *,
        metric: str = "l2",
        gpus: int = 0,
        nonfinite: str = "raise",
        block_rows: int | None = None,
        progress: Progress | None = None,
        stage: str = "assign",
        prefetch: bool = True,
    ) -> None:
        self.source, self.transform, self.prefetch = source, transform or Transform(), prefetch
        self.metric, self.gpus, self.nonfinite = metric, gpus, nonfinite
        self.progress, self.stage = progress, stage
        rows = block_rows or max(1, BLOCK_BYTES // (4 * source.dim))
        self.block_rows = max(1, math.ceil(rows / source.chunk_rows)) * source.chunk_rows
        self.bad_rows = np.zeros(0, dtype=np.int64)  # non-finite rows found by the last pass

    def count(self) -> int:
        return self.source.n

    def dim(self) -> int:
        return self.transform.out_dim(self.source.dim)

    # -- reading -------------------------------------------------------------------------------
    def _ranges(self) -> list[tuple[int, int]]:
        return [
            (a, min(a + self.block_rows, self.source.n)) for a in range(0, self.source.n, self.block_rows)
        ]

    def _load(self, start: int, stop: int, buf: np.ndarray) -> np.ndarray:
        self.source.read_into(start, stop, buf)
        return self.transform.apply(buf[: stop - start])

    def blocks(self, ranges: list[tuple[int, int]] | None = None) -> Iterator[tuple[int, np.ndarray]]:
        """Yield (row offset, transformed float32 block); the next block is read meanwhile.

        A yielded block is valid until the next one is requested (its buffer is reused).
        """
        ranges = self._ranges() if ranges is None else ranges
        if not ranges:
            return
        width = max(b - a for a, b in ranges)
        bufs = [np.empty((width, self.source.dim), dtype=np.float32) for _ in range(2)]
        if not self.prefetch:  # for measuring what the overlap buys
            for start, stop in ranges:
                yield start, self._load(start, stop, bufs[0])
            return
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="xdc-prefetch") as pool:
            pending = pool.submit(self._load, *ranges[0], bufs[0])
            for i, (start, _) in enumerate(ranges):
                block = pending.result()
                if i + 1 < len(ranges):
                    pending = pool.submit(self._load, *ranges[i + 1], bufs[(i + 1) % 2])
                yield start, block

    def get_subset(self, indices: np.ndarray) -> np.ndarray:
        """Rows at `indices` (any order), transformed, float32 (len, dim); reads only the chunks touched."""
        indices = np.asarray(indices, dtype=np.int64)
        if len(indices) and (indices.min() < 0 or indices.max() >= self.source.n):
            raise ConfigError(f"{self.source.name}: row indices outside [0, {self.source.n})")
        order = np.argsort(indices, kind="stable")
        sorted_idx = indices[order]
        out = np.empty((len(indices), self.dim()), dtype=np.float32)
        pos = 0
        for start, block in self.blocks(self._touched_ranges(sorted_idx)):
            end = np.searchsorted(sorted_idx, start + len(block), side="left")
            out[order[pos:end]] = block[sorted_idx[pos:end] - start]
            pos = end
            self._report(end, len(indices))
        return out

    def _touched_ranges(self, sorted_idx: np.ndarray) -> list[tuple[int, int]]:
        """Runs of consecutive touched chunks, each cut at block_rows: whole chunks, read in order."""
        chunk = self.source.chunk_rows
        per_block = self.block_rows // chunk
        ranges: list[tuple[int, int]] = []
        for c in np.unique(sorted_idx // chunk).tolist():
            a, b = c * chunk, min((c + 1) * chunk, self.source.n)
            if ranges and ranges[-1][1] == a and (ranges[-1][1] - ranges[-1][0]) < per_block * chunk:
                ranges[-1] = (ranges[-1][0], b)
            else:
                ranges.append((a, b))
        return ranges

    # -- assignment ----------------------------------------------------------------------------
    def perform_search(
        self,
        centroids: np.ndarray,
        label_dtype: type = np.int64,
        out: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Nearest centroid of every row: D (N,) float32 squared L2, I (N,) int (-1: non-finite row).

        `out` (D, I) from an earlier pass is overwritten, so repeated passes hold one set of per-row outputs.
        """
        n = self.source.n
        dist, labels = out if out is not None else (np.empty(n, np.float32), np.empty(n, label_dtype))
        for start, block, d, i in self._search_blocks(centroids):
            dist[start : start + len(block)], labels[start : start + len(block)] = d, i
        self._finish_pass()
        return dist, labels

    def assign_to(
        self, centroids: np.ndarray, weights: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One Lloyd assignment: I (N,) int64, D (N,) float32, per-centroid sums (k, dim) float64."""
        n, k = self.source.n, len(centroids)
        dist, labels = np.empty(n, dtype=np.float32), np.empty(n, dtype=np.int64)
        sums = np.zeros((k, self.dim()), dtype=np.float64)
        for start, block, d, i in self._search_blocks(centroids):
            stop = start + len(block)
            dist[start:stop], labels[start:stop] = d, i
            sums += block_sums(block, i, k, None if weights is None else weights[start:stop])
        self._finish_pass()
        return labels, dist, sums

    def tally_pass(
        self,
        centroids: np.ndarray,
        *,
        labels: Column | None = None,
        distances: Column | None = None,
        sums: bool = False,
    ) -> PassTally:
        """One pass assigning every row: each block's labels and distances written into the columns given
        (overwriting an earlier pass's), sizes and objective tallied, with `sums` the Lloyd sums too.

        Nothing per row is kept in memory, whatever N is: what a Lloyd step or the statistics need is in
        the returned tally. Non-finite rows are labelled -1 (distance NaN), or fail the pass as in
        `perform_search`.
        """
        tally = PassTally(len(centroids), self.dim() if sums else None)
        for start, block, d, i in self._search_blocks(centroids):
            if labels is not None:
                labels.write(start, i)
            if distances is not None:
                distances.write(start, d)
            tally.add(block, d, i)
        self._finish_pass()
        return tally

    def _search_blocks(
        self, centroids: np.ndarray
    ) -> Iterator[tuple[int, np.ndarray, np.ndarray, np.ndarray]]:
        centroids = np.ascontiguousarray(centroids, dtype=np.float32)
        index = make_index(centroids, metric=self.metric, gpus=self.gpus)
        cnorm = np.einsum("ij,ij->i", centroids, centroids)
        bad: list[np.ndarray] = []
        n = self.source.n
        for start, block in self.blocks():
            d, i = index.search(block, 1)
            d, i = d[:, 0], i[:, 0]
            if self.metric == "ip":  # report squared L2 whatever the search metric
                d = np.einsum("ij,ij->i", block, block) + cnorm[np.maximum(i, 0)] - 2 * d
            finite = np.isfinite(block).all(axis=1)
            if not finite.all():
                i[~finite], d[~finite] = -1, np.nan
                bad.append(start + np.flatnonzero(~finite))
            yield start, block, d, i
            self._report(start + len(block), n)
        self.bad_rows = np.concatenate(bad) if bad else np.zeros(0, dtype=np.int64)

    def _finish_pass(self) -> None:
        if len(self.bad_rows) and self.nonfinite == "raise":
            raise nonfinite_error(self.source.name, self.bad_rows, self.source.n)

    def _report(self, done: int, total: int) -> None:
        if self.progress is not None:
            self.progress(self.stage, done, total)

    def scan_nonfinite(self) -> np.ndarray:
        """All non-finite rows (after view and transform), int64 ascending: one read pass, no search."""
        bad = [start + np.flatnonzero(~np.isfinite(block).all(axis=1)) for start, block in self.blocks()]
        return np.concatenate(bad).astype(np.int64)


def nonfinite_error(name: str, rows: np.ndarray, n: int) -> DataError:
    first = ", ".join(map(str, rows[:5]))
    return DataError(
        f"{name}: {len(rows)} of {n} rows are not finite (NaN/inf; first rows: {first}); "
        "drop them with --drop-nonfinite"
    )
