"""Tar shards: deterministic bytes, DALI's wds2idx index, rolling by bytes, nothing half-written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from wds2idx import IndexCreator

from xdctools.shard import format as fmt
from xdctools.shard.write import RECORD, ShardWriter, check_sample, closed_tar_bytes, sample_tar_bytes

ROOT = Path(__file__).resolve().parents[1]
# Writes one unit (3 videos of 2 segments of uneven sizes) under each file-size limit given, in one process.
# Python ignores SIGXFSZ: past the limit its writes fail with EFBIG. Prints, per limit, the error or None
# and the files left in that limit's folder.
LIMITED_WRITER = """
import json, resource, sys
from pathlib import Path
from xdctools.errors import XdcError
from xdctools.shard.write import ShardWriter

base = Path(sys.argv[1])
videos = [[[(f"v{v}_s{s}.cls", b"1"), (f"v{v}_s{s}.webm", bytes([v]) * (5000 * v + 777 * s + 1))]
           for s in range(2)] for v in range(1, 4)]
soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
report = []
for limit in map(int, sys.argv[2:]):
    folder = base / str(limit)
    folder.mkdir()
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        with ShardWriter(folder, "train-000000") as writer:
            for samples in videos:
                writer.write_video(samples)
        error = None
    except XdcError as e:  # DiskFullError past the limit
        error = e.message
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    report.append([limit, error, sorted(p.name for p in folder.iterdir())])
print(json.dumps(report))
"""


@pytest.fixture(scope="module")
def payloads(media_dir: Path) -> list[bytes]:
    """Real media bytes of uneven sizes (not multiples of 512) as member payloads."""
    names = [
        "edge/big_buck_bunny_432_433.webm",
        "edge/realshort.mp4",
        "edge/no_duration.webm",
        "edge/cfr.mpeg",
    ]
    return [(media_dir / name).read_bytes() for name in names]


def make_videos(payloads: list[bytes], n_videos: int = 4, n_segments: int = 2) -> list[list[list]]:
    videos = []
    for v in range(n_videos):
        samples = []
        for s in range(n_segments):
            key = fmt.make_key(v, f"class a/video {v}.mp4", s)
            mel = fmt.npy_bytes(np.full((fmt.N_MELS, 10 + v), v, dtype=np.float16))
            samples.append(
                [
                    (f"{key}.cls", str(v).encode()),
                    (f"{key}.mel.npy", mel),
                    (f"{key}.webm", payloads[(v + s) % len(payloads)]),
                ]
            )
        videos.append(samples)
    return videos


def write(directory: Path, videos, max_bytes=None):
    directory.mkdir(parents=True, exist_ok=True)
    with ShardWriter(directory, "train-000000", max_bytes) as writer:
        for samples in videos:
            writer.write_video(samples)
    return writer.parts


def test_tar_is_deterministic_with_pinned_headers(tmp_path: Path, payloads):
    videos = make_videos(payloads)
    parts_a = write(tmp_path / "a", videos)
    write(tmp_path / "b", videos)
    assert [p.tar for p in parts_a] == ["train-000000-00.tar"]
    for name in ("train-000000-00.tar", "train-000000-00.idx"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    with tarfile.open(tmp_path / "a" / "train-000000-00.tar") as tar:
        members = tar.getmembers()
        expected = [name for samples in videos for sample in samples for name, _ in sample]
        assert [m.name for m in members] == expected
        for m in members:
            assert (m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode, m.type) == (0, 0, 0, "", "", 0o644, b"0")
        first = videos[0][0]
        for name, data in first:
            assert tar.extractfile(name).read() == data
    assert parts_a[0].samples == 8 and parts_a[0].videos == 4
    assert parts_a[0].bytes == (tmp_path / "a" / "train-000000-00.tar").stat().st_size


def test_idx_equals_dali_wds2idx(tmp_path: Path, payloads):
    parts = write(tmp_path, make_videos(payloads))
    tar = tmp_path / parts[0].tar
    reference = tmp_path / "reference.idx"
    with IndexCreator(str(tar), str(reference), verbose=False) as creator:
        creator.create_index()
    ours = (tmp_path / parts[0].idx).read_text()
    assert ours == reference.read_text()
    assert ours.splitlines()[0] == "v1.2 8"
    # The offsets point at the payloads.
    data = tar.read_bytes()
    ext, offset, size, _name = ours.splitlines()[1].split()[4:8]
    assert ext == "mel.npy" and data[int(offset) : int(offset) + int(size)].startswith(b"\x93NUMPY\x01\x00")


def test_parts_roll_by_bytes_and_keep_videos_whole(tmp_path: Path, payloads):
    videos = make_videos(payloads, n_videos=6)
    sizes = [sum(sample_tar_bytes(s) for s in samples) for samples in videos]
    limit = closed_tar_bytes(sizes[0] + sizes[1])  # the first part holds exactly two videos
    parts = write(tmp_path, videos, max_bytes=limit)
    assert [p.tar for p in parts] == [f"train-000000-{i:02d}.tar" for i in range(len(parts))]
    assert len(parts) >= 3 and parts[0].videos == 2
    assert sum(p.videos for p in parts) == 6 and sum(p.samples for p in parts) == 12
    for part in parts:
        assert part.bytes == (tmp_path / part.tar).stat().st_size
        assert part.bytes <= limit or part.videos == 1  # only a single oversized video may pass the limit
        with tarfile.open(tmp_path / part.tar) as tar:
            keys = {name.split(".")[0] for name in tar.getnames()}
        videos_in_part = {key.split("_")[0] for key in keys}
        assert len(videos_in_part) == part.videos  # a video's segments are never split over parts
    # A part holding one video larger than the limit is still written.
    parts = write(tmp_path / "tiny", videos[:2], max_bytes=1024)
    assert [p.videos for p in parts] == [1, 1]


def test_failure_leaves_no_partial_tar(tmp_path: Path, payloads):
    videos = make_videos(payloads)
    bad = [[("k1.cls", b"1"), ("k2.mel.npy", b"x")]]  # two keys in one sample: rejected before writing
    with pytest.raises(ValueError, match="different keys"), ShardWriter(tmp_path, "train-000001") as writer:
        writer.write_video(videos[0])
        writer.write_video(bad)
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    assert writer.parts == []


def test_unit_without_samples_writes_nothing(tmp_path: Path):
    with ShardWriter(tmp_path, "train-000002") as writer:
        writer.write_video([])
    assert writer.parts == [] and list(tmp_path.iterdir()) == []


def test_check_sample():
    assert check_sample([("v1_a_s000.cls", b"1"), ("v1_a_s000.mel.npy", b"")]) == "v1_a_s000"
    with pytest.raises(ValueError, match="no extension"):
        check_sample([("noext", b"")])


def test_a_write_past_a_file_size_limit_fails_in_one_line_and_leaves_nothing(tmp_path: Path):
    """Real EFBIG: a subprocess lowers its RLIMIT_FSIZE; the write fails while adding a sample, while
    closing the tar (its end blocks and record padding), or not at all."""
    size = closed_tar_bytes(sum(sample_tar_bytes(s) for v in range(1, 4) for s in _limited_video(v)))
    limits = [1, 4096, 20_000, size - RECORD - 1, size - 1, size]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-c", LIMITED_WRITER, str(tmp_path), *map(str, limits)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    report = json.loads(proc.stdout)
    tar = tmp_path / "{}" / "train-000000-00.tar"
    for limit, error, files in report[:-1]:
        assert error == (
            f"{str(tar).format(limit)}: cannot write (File too large); free space (or raise the file-size "
            "limit) and run the same command again (nothing half-written was kept)"
        ), limit
        assert files == [], limit  # neither the .tmp nor a final name
    assert report[-1] == [size, None, ["train-000000-00.idx", "train-000000-00.tar"]]
    assert (tmp_path / str(size) / "train-000000-00.tar").stat().st_size == size


def _limited_video(v: int) -> list[list[tuple[str, bytes]]]:
    """Video v of LIMITED_WRITER."""
    return [
        [(f"v{v}_s{s}.cls", b"1"), (f"v{v}_s{s}.webm", bytes([v]) * (5000 * v + 777 * s + 1))]
        for s in range(2)
    ]
