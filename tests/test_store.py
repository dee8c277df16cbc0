"""Feature store: layout, chunked reads, concurrent writers, resume after an interrupted write, bad stores."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import zarr

from xdctools.errors import ConfigError, DataError, InputError
from xdctools.features.store import (
    CHUNK_BYTES,
    FeatureStore,
    RowWriter,
    chunk_rows_for,
    create_store,
    open_store,
    write_rows,
)

ROOT = Path(__file__).resolve().parents[1]
DIMS = {"video": 24, "audio": 8}


_RNG = np.random.default_rng(0)
DATA = {m: _RNG.standard_normal((1000, d)).astype(np.float32) for m, d in DIMS.items()}


def rows_for(start: int, stop: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Content of rows [start, stop): the same whichever process writes them, in whatever batches."""
    return {m: x[start:stop] for m, x in DATA.items()}, np.arange(start, stop, dtype=np.int64) * 7 + 3


def fill(store: FeatureStore, start: int, stop: int) -> None:
    for a in range(start, stop, store.chunk_rows):
        b = min(a + store.chunk_rows, stop)
        write_rows(store, a, *rows_for(a, b))


def test_chunk_rows_make_chunks_of_at_least_one_mib() -> None:
    rows = chunk_rows_for(10_000_000, {"video": 512, "audio": 128}, "float16")
    assert rows * 128 * 2 >= CHUNK_BYTES  # the narrowest array still reads >= 1 MiB per chunk
    assert rows & (rows - 1) == 0
    assert chunk_rows_for(100, {"video": 512}, "float16") == 100  # capped at N


def test_roundtrip_chunks_index_and_attrs(tmp_path: Path) -> None:
    n = 100
    store = create_store(
        tmp_path / "f.zarr",
        n,
        DIMS,
        attrs={"checkpoint": "sha256:abc", "iteration": 2, "params": {"clips": 1}},
        chunk_rows=32,
    )
    assert not store.complete and len(store.missing_rows()) == n
    fill(store, 0, n)
    store = open_store(tmp_path / "f.zarr")
    assert store.complete and store.missing_chunks() == []
    assert (store.n, store.dims, store.chunk_rows, store.dtype) == (n, DIMS, 32, np.float16)
    assert store.attrs["checkpoint"] == "sha256:abc" and store.attrs["iteration"] == 2
    assert store.attrs["params"] == {"clips": 1}
    assert store.group["video"].attrs["modality"] == "video"
    assert store.group["video"].compressors == ()  # float features are stored uncompressed

    rows, index = rows_for(0, 32)
    np.testing.assert_array_equal(store.read("video", 0, 32), rows["video"].astype(np.float16))
    np.testing.assert_array_equal(store.read_index()[:32], index)
    chunks = list(store.iter_chunks("audio"))
    assert [off for off, _ in chunks] == [0, 32, 64, 96]
    assert [len(x) for _, x in chunks] == [32, 32, 32, 4]
    np.testing.assert_array_equal(np.concatenate([x for _, x in chunks]), store.read("audio", 0, n))
    # a range that starts mid-chunk still yields chunk-aligned pieces after the first
    assert [(o, len(x)) for o, x in store.iter_chunks("video", 40, 70)] == [(40, 24), (64, 6)]


def test_two_processes_write_the_same_store_as_one(tmp_path: Path) -> None:
    n, chunk = 1000, 64
    one = create_store(tmp_path / "one.zarr", n, DIMS, chunk_rows=chunk)
    fill(one, 0, n)
    two = create_store(tmp_path / "two.zarr", n, DIMS, chunk_rows=chunk)
    ranges = [two.rank_rows(r, 2) for r in range(2)]
    assert ranges[0][0] == 0 and ranges[0][1] == ranges[1][0] and ranges[1][1] == n
    assert ranges[0][1] % chunk == 0

    script = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {str(ROOT / "tests")!r})
        from test_store import rows_for
        from xdctools.features.store import RowWriter, open_store
        store = open_store({str(tmp_path / "two.zarr")!r}, mode="r+")
        start, stop = store.rank_rows(int(sys.argv[1]), 2)
        with RowWriter(store, start, stop) as writer:  # batches of 7 rows, written as whole chunks
            for a in range(start, stop, 7):
                writer.add(*rows_for(a, min(a + 7, stop)))
        """
    )
    procs = [subprocess.Popen([sys.executable, "-c", script, str(r)], cwd=ROOT) for r in range(2)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]

    one, two = open_store(tmp_path / "one.zarr"), open_store(tmp_path / "two.zarr")
    assert two.complete
    for name in ("video", "audio", "index", "written"):
        np.testing.assert_array_equal(two.group[name][:], one.group[name][:])
    files = sorted(
        p.relative_to(tmp_path / "one.zarr") for p in (tmp_path / "one.zarr").rglob("*/*") if p.is_file()
    )
    assert len(files) > 4 * (n // chunk)
    for rel in files:  # the same array files with the same bytes (the group's zarr.json holds a date)
        assert (tmp_path / "two.zarr" / rel).read_bytes() == (tmp_path / "one.zarr" / rel).read_bytes()


def test_resume_after_an_interrupted_write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    n, chunk = 256, 64
    reference = create_store(tmp_path / "ref.zarr", n, DIMS, chunk_rows=chunk)
    fill(reference, 0, n)

    store = create_store(tmp_path / "f.zarr", n, DIMS, chunk_rows=chunk)
    fill(store, 0, 64)

    def crash(self: FeatureStore, start: int, stop: int) -> None:
        raise KeyboardInterrupt  # killed after the features reached disk, before the marker

    with monkeypatch.context() as m:
        m.setattr(FeatureStore, "_mark_written", crash)
        with pytest.raises(KeyboardInterrupt):
            fill(store, 64, 128)
    fill(store, 192, 256)  # another rank finished its part; chunk 2 was never started

    store = open_store(tmp_path / "f.zarr", mode="r+")
    assert store.missing_chunks() == [1, 2]
    np.testing.assert_array_equal(store.missing_rows(), np.arange(64, 192))
    with pytest.raises(DataError, match=r"128 of 256 rows are not written \(first: 64, 65"):
        store.require_complete()
    for c in store.missing_chunks():
        fill(store, *store.chunk_range(c))
    store = open_store(tmp_path / "f.zarr")
    assert store.complete
    for name in ("video", "audio", "index"):
        np.testing.assert_array_equal(store.group[name][:], reference.group[name][:])


def test_row_writer_writes_whole_chunks_and_drops_the_tail_on_failure(tmp_path: Path) -> None:
    store = create_store(tmp_path / "f.zarr", 100, DIMS, chunk_rows=16)
    with pytest.raises(RuntimeError), RowWriter(store, 0, 100) as writer:
        writer.add(*rows_for(0, 20))  # chunk 0 written, 4 rows buffered
        writer.add(*rows_for(20, 30))  # 14 buffered
        raise RuntimeError("extraction died")
    np.testing.assert_array_equal(store.missing_rows(), np.arange(16, 100))
    with RowWriter(store, 16, 100) as writer:
        for a in range(16, 100, 9):
            writer.add(*rows_for(a, min(a + 9, 100)))
        with pytest.raises(ConfigError, match="would pass the range's end at row 100"):
            writer.add(*rows_for(0, 1))
    assert store.complete
    np.testing.assert_array_equal(store.read("audio", 0, 100), DATA["audio"][:100].astype(np.float16))
    np.testing.assert_array_equal(store.read_index(), rows_for(0, 100)[1])


def test_bad_writes_are_refused_and_write_nothing(tmp_path: Path) -> None:
    store = create_store(tmp_path / "f.zarr", 64, DIMS, chunk_rows=32)
    rows, index = rows_for(0, 32)
    with pytest.raises(ConfigError, match=r"'audio' rows have shape \(32, 9\), expected \(32, 8\)"):
        write_rows(store, 0, {**rows, "audio": np.zeros((32, 9))}, index)
    with pytest.raises(ConfigError, match="needs the modalities"):
        write_rows(store, 0, {"video": rows["video"]}, index)
    with pytest.raises(ConfigError, match=r"rows \[48, 80\) outside \[0, 64\)"):
        write_rows(store, 48, rows, index)
    assert len(store.missing_rows()) == 64
    assert not any((tmp_path / "f.zarr" / "video" / "c").glob("*"))


def test_bad_stores_fail_with_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no feature store here"):
        open_store(tmp_path / "missing.zarr")
    zarr.open_group(tmp_path / "plain.zarr", mode="w")
    with pytest.raises(DataError, match="not an xdctools feature store"):
        open_store(tmp_path / "plain.zarr")
    with pytest.raises(ConfigError, match="at least one row"):
        create_store(tmp_path / "empty.zarr", 0, DIMS)
    with pytest.raises(ConfigError, match="reserved keys"):
        create_store(tmp_path / "x.zarr", 4, DIMS, attrs={"n": 5})
    assert not (tmp_path / "empty.zarr").exists() and not (tmp_path / "x.zarr").exists()

    store = create_store(tmp_path / "f.zarr", 64, DIMS, chunk_rows=32)
    fill(store, 0, 64)
    with pytest.raises(InputError, match="already exists"):
        create_store(tmp_path / "f.zarr", 10, DIMS)
    assert open_store(tmp_path / "f.zarr").complete  # the existing store is untouched

    # an array resized behind the store's back: mismatched rows
    zarr.open_array(tmp_path / "f.zarr" / "audio", mode="r+").resize((60, 8))
    with pytest.raises(DataError, match=r"array 'audio' has shape \(60, 8\), expected \(64, 8\)"):
        open_store(tmp_path / "f.zarr")


def test_overwrite_replaces_a_store_only_once_the_new_one_exists(tmp_path: Path) -> None:
    fill(create_store(tmp_path / "f.zarr", 64, DIMS, chunk_rows=32), 0, 64)
    store = create_store(tmp_path / "f.zarr", 10, {"video": 4}, overwrite=True)
    assert (store.n, store.dims, store.complete) == (10, {"video": 4}, False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.zarr"]  # no temporary or old copies left
