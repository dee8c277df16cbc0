"""Per-row outputs of k-means (labels, distances, store index) written block by block, and per-pass tallies.

A clustering of N rows produces 16 bytes a row (labels int32, distances float32, index int64): ~1 GB at
IG65M's 65M rows. `NpyColumn` writes such a column straight into its final .npy file with positioned plain
writes (`os.pwrite`) as the streamed assignment produces each block, so it never lives in the process'
memory: the pages go through the page cache, which is not the process' RSS. No memory map is written
through (pages touched through a map count as the process' RssFile). The bytes are those `np.save` writes
for the whole array. A later pass (re-seeding) overwrites the same positions in place.

`MemoryColumn` is the same interface over an in-memory array (`cluster_array` on an array already in
memory). `PassTally` collects what the statistics need from each block as it passes (cluster sizes, the
objective, optionally the Lloyd sums), so nothing reads the per-row outputs back.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Protocol

import numpy as np
import scipy.sparse


class Column(Protocol):
    """A 1-D array of `n` values written by row range, in any order, any number of times."""

    n: int
    dtype: np.dtype

    def write(self, start: int, values: np.ndarray) -> None:
        """Values [start, start + len(values)), cast to the column's dtype."""

    def finish(self) -> np.ndarray:
        """The whole column: the in-memory array, or a read-only memory map of the file."""

    def close(self) -> None:
        """Release what the column holds open (after a failure: `finish` is for a complete column)."""


class MemoryColumn:
    """A column held in memory (for data that is in memory already)."""

    def __init__(self, n: int, dtype: type | np.dtype) -> None:
        self.n, self.dtype = n, np.dtype(dtype)
        self.array = np.empty(n, dtype=self.dtype)

    def write(self, start: int, values: np.ndarray) -> None:
        self.array[start : start + len(values)] = values

    def finish(self) -> np.ndarray:
        return self.array

    def close(self) -> None:
        pass


def npy_header(n: int, dtype: np.dtype) -> bytes:
    """The header `np.save` writes for a C-ordered (n,) array of `dtype` (format 1.0, 64-byte aligned)."""
    buf = io.BytesIO()
    header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": (n,)}
    np.lib.format.write_array_header_1_0(buf, header)
    return buf.getvalue()


class NpyColumn:
    """A column written into the .npy file `path` with plain positioned writes; no copy kept in memory.

    The file is created anew (never truncated in place) with its header at once; rows not written yet
    read as zeros. `close` (or `finish`) releases the descriptor; `finish` returns the column as a
    read-only memory map, which costs memory (RssFile) only for the pages a consumer reads.
    """

    def __init__(self, path: str | os.PathLike, n: int, dtype: type | np.dtype) -> None:
        self.path, self.n, self.dtype = Path(path), n, np.dtype(dtype)
        header = npy_header(n, self.dtype)
        self.offset = len(header)
        self.path.unlink(missing_ok=True)  # a new file: an old one may be hard-linked into a saved output
        self.fd: int | None = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            self._pwrite(header, 0)
        except BaseException:
            self.close()
            raise

    def _pwrite(self, data: bytes | memoryview, pos: int) -> None:
        view = memoryview(data).cast("B")
        while len(view):  # pwrite may write less than asked (a signal, a file-size limit reached)
            done = os.pwrite(self.fd, view, pos)
            view, pos = view[done:], pos + done

    def write(self, start: int, values: np.ndarray) -> None:
        values = np.ascontiguousarray(values, dtype=self.dtype)
        if start < 0 or start + len(values) > self.n:
            raise ValueError(f"{self.path}: rows [{start}, {start + len(values)}) outside [0, {self.n})")
        self._pwrite(values.data, self.offset + start * self.dtype.itemsize)

    def read(self, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) read back with a plain read (a new array; no memory map)."""
        size = (stop - start) * self.dtype.itemsize
        data = os.pread(self.fd, size, self.offset + start * self.dtype.itemsize)
        if len(data) != size:
            raise ValueError(f"{self.path}: rows [{start}, {stop}) not written")
        return np.frombuffer(data, dtype=self.dtype).copy()

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def finish(self) -> np.ndarray:
        self.close()
        return np.load(self.path, mmap_mode="r")


def new_column(workdir: Path | None, filename: str, n: int, dtype: type | np.dtype) -> Column:
    """`NpyColumn` at workdir/filename, or a `MemoryColumn` when workdir is None."""
    return MemoryColumn(n, dtype) if workdir is None else NpyColumn(workdir / filename, n, dtype)


class Float64Sum:
    """The float64 sum of a stream of float32 values, bit for bit what `x.sum(dtype=np.float64)` gives on
    their concatenation x: numpy casts x through buffers of `np.getbufsize()` values, sums each pairwise
    and adds the buffers' sums in order; the same buffers are cut here across the blocks of the stream.
    (tests/test_cluster.py checks the equality, so a numpy that sums differently is noticed.)"""

    def __init__(self) -> None:
        self.size = np.getbufsize()
        self.pending = np.empty(self.size, dtype=np.float32)
        self.fill, self.total, self.count = 0, 0.0, 0

    def add(self, values: np.ndarray) -> None:
        values = np.ascontiguousarray(values, dtype=np.float32).reshape(-1)
        self.count += len(values)
        pos = 0
        while pos < len(values):
            take = min(self.size - self.fill, len(values) - pos)
            if self.fill == 0 and take == self.size:  # a whole buffer straight from the block
                self.total += float(np.add.reduce(values[pos : pos + take], dtype=np.float64))
            else:
                self.pending[self.fill : self.fill + take] = values[pos : pos + take]
                self.fill += take
                if self.fill == self.size:
                    self.total += float(np.add.reduce(self.pending, dtype=np.float64))
                    self.fill = 0
            pos += take

    @property
    def value(self) -> float:
        tail = float(np.add.reduce(self.pending[: self.fill], dtype=np.float64)) if self.fill else 0.0
        return self.total + tail


class PassTally:
    """What one pass over all rows leaves besides the per-row outputs: rows per cluster, the objective
    (sum of squared distances of the assigned rows, summed as numpy sums the whole array) and, for a
    Lloyd pass, the per-centroid sums of the rows (float64)."""

    def __init__(self, k: int, sums_dim: int | None = None) -> None:
        self.k = k
        self.counts = np.zeros(k, dtype=np.int64)
        self.distance_sum = Float64Sum()
        self.sums = None if sums_dim is None else np.zeros((k, sums_dim), dtype=np.float64)

    def add(self, block: np.ndarray, dist: np.ndarray, labels: np.ndarray) -> None:
        ok = labels >= 0
        self.counts += np.bincount(labels[ok], minlength=self.k)
        self.distance_sum.add(dist[ok])
        if self.sums is not None:
            self.sums += block_sums(block, labels, self.k)

    @property
    def objective(self) -> float:
        return self.distance_sum.value

    @property
    def mean_distance(self) -> float:
        return self.objective / self.distance_sum.count if self.distance_sum.count else float("nan")


def block_sums(
    block: np.ndarray, labels: np.ndarray, k: int, weights: np.ndarray | None = None
) -> np.ndarray:
    """(k, d) float64 sums of a block's rows (times `weights`) by label; rows labelled -1 left out."""
    ok = labels >= 0
    w = np.ones(len(block)) if weights is None else np.asarray(weights, dtype=np.float64)
    onehot = scipy.sparse.csr_matrix((w[ok], (labels[ok], np.flatnonzero(ok))), shape=(k, len(block)))
    return onehot @ block.astype(np.float64)
