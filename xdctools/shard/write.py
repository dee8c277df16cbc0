"""Deterministic tar shards and their DALI `.idx`, written under a temporary name, renamed when complete."""

from __future__ import annotations

import contextlib
import io
import os
import tarfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from xdctools.atomic import write_bytes_atomic
from xdctools.errors import XdcError, disk_full
from xdctools.shard.read import split_member

TAR_FORMAT = tarfile.GNU_FORMAT
BLOCK = tarfile.BLOCKSIZE  # 512
RECORD = tarfile.RECORDSIZE  # 10240: tarfile pads the archive to a whole record
IDX_VERSION = "v1.2"  # first token of a DALI `wds2idx` index
TMP_SUFFIX = ".tmp"

Member = tuple[str, bytes]  # (member name "KEY.ext", payload)
Sample = Sequence[Member]


class OutputError(XdcError):
    """One of our own files could not be written for another reason than a full disk (permissions)."""

    exit_code = 1


def output_error(path: Path, exc: OSError) -> XdcError:
    """A one-line error naming the file; the file is left under its temporary name or not at all. A full
    disk or a file-size limit is `DiskFullError` (exit 7), as at every other stage."""
    full = disk_full(OSError(exc.errno, exc.strerror, str(path)))
    return full if full is not None else OutputError(f"{path}: cannot write ({exc.strerror or exc})")


@dataclass(frozen=True)
class PartInfo:
    """One finished tar part; names are relative to the shard directory."""

    tar: str
    idx: str
    samples: int
    videos: int
    bytes: int

    def to_dict(self) -> dict:
        return asdict(self)


def member_info(name: str, size: int) -> tarfile.TarInfo:
    """A regular file's header with every field that varies between runs pinned."""
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    return info


def header_bytes(name: str) -> int:
    """Bytes of a member's header(s): 512, more when a GNU long-name record is needed."""
    return len(member_info(name, 0).tobuf(TAR_FORMAT, "utf-8", "surrogateescape"))


def padded(size: int) -> int:
    return -(-size // BLOCK) * BLOCK


def sample_tar_bytes(sample: Sample) -> int:
    """Bytes a sample adds to a tar (headers + payloads padded to blocks)."""
    return sum(header_bytes(name) + padded(len(data)) for name, data in sample)


def closed_tar_bytes(offset: int) -> int:
    """Size of a tar whose members end at `offset`, after tarfile's end blocks and record padding."""
    return -(-(offset + 2 * BLOCK) // RECORD) * RECORD


def check_sample(sample: Sample) -> str:
    """The sample's key; all members must share it, or DALI would split them into several samples."""
    if not sample:
        raise ValueError("empty sample")
    keys = set()
    for name, _ in sample:
        key, ext = split_member(name)
        if not key or not ext:
            raise ValueError(f"tar member {name!r} has no extension")
        keys.add(key)
    if len(keys) != 1:
        raise ValueError(f"members of one sample have different keys: {sorted(keys)}")
    return keys.pop()


IdxEntry = tuple[str, int, int, str]  # (ext, data offset, size, member name)


def idx_text(samples: Sequence[Sequence[IdxEntry]]) -> str:
    """DALI's `wds2idx` index: a `v1.2 N` line, then one line of `ext offset size name` groups per sample."""
    lines = [f"{IDX_VERSION} {len(samples)}"]
    for entries in samples:
        lines.append(" ".join(f"{ext} {off} {size} {name}" for ext, off, size, name in entries))
    return "\n".join(lines) + "\n"


def write_file(path: Path, data: bytes, *, tmp_suffix: str = TMP_SUFFIX) -> None:
    """Write atomically through `path + tmp_suffix`: a killed unit's leftovers then match its own name
    pattern, which is how `run._clear_unit` finds them on resume. DiskFullError (or OutputError) when it
    cannot be written."""
    try:
        write_bytes_atomic(path, data, tmp=path.with_name(path.name + tmp_suffix))
    except OSError as e:
        raise output_error(path, e) from e


class _Part:
    """An open `<name>.tar.tmp` and the index entries of what it holds so far.

    A write that fails raises DiskFullError (or OutputError) naming the tar; `finish` then removes the
    temporary file itself, `add` leaves that to `abort` (the writer's `with` block calls it).
    """

    def __init__(self, directory: Path, name: str) -> None:
        self.tar_path = directory / f"{name}.tar"
        self.idx_path = directory / f"{name}.idx"
        self.tmp_path = self.tar_path.with_name(self.tar_path.name + TMP_SUFFIX)
        try:
            self.file = open(self.tmp_path, "wb")  # noqa: SIM115 - open across add() calls
        except OSError as e:
            raise output_error(self.tar_path, e) from e
        self.tar = tarfile.open(fileobj=self.file, mode="w", format=TAR_FORMAT, encoding="utf-8")  # noqa: SIM115
        self.entries: list[list[IdxEntry]] = []
        self.videos = 0

    @property
    def offset(self) -> int:
        return self.tar.offset

    def add(self, sample: Sample) -> None:
        entries = []
        for name, data in sample:
            try:
                self.tar.addfile(member_info(name, len(data)), io.BytesIO(data))
            except OSError as e:
                raise output_error(self.tar_path, e) from e
            # The data sits just before the end of what was written, whatever the header length was.
            entries.append((split_member(name)[1], self.tar.offset - padded(len(data)), len(data), name))
        self.entries.append(entries)

    def finish(self) -> PartInfo:
        """Close the tar, write its index, then rename the tar: both final names hold whole files."""
        try:
            size = self._close_tar()
            write_file(self.idx_path, idx_text(self.entries).encode())
            os.replace(self.tmp_path, self.tar_path)
        except BaseException:
            self.abort()
            raise
        return PartInfo(self.tar_path.name, self.idx_path.name, len(self.entries), self.videos, size)

    def _close_tar(self) -> int:
        try:
            self.tar.close()  # end-of-archive blocks; leaves our file object open
            self.file.flush()
            os.fsync(self.file.fileno())
            size = self.file.tell()
            self.file.close()
        except OSError as e:
            raise output_error(self.tar_path, e) from e
        return size

    def abort(self) -> None:
        """Remove the temporary tar; closing may fail again (the buffer cannot be flushed to a full disk)."""
        with contextlib.suppress(OSError):
            self.file.close()
        self.tmp_path.unlink(missing_ok=True)


class ShardWriter:
    """Writes the parts `<stem>-<part:02d>.tar` (+ `.idx`) of one unit, rolling to a new part by bytes.

    All segments of a video go to the same part, so every part holds whole videos; a part is only
    rolled when it is not empty, so a video larger than `max_bytes` gets a part of its own.
    Parts are created lazily: a unit whose videos all failed writes no tar at all.
    """

    def __init__(self, directory: Path, stem: str, max_bytes: int | None = None) -> None:
        self.directory = Path(directory)
        self.stem = stem
        self.max_bytes = max_bytes
        self.parts: list[PartInfo] = []
        self._part: _Part | None = None

    def _part_name(self) -> str:
        return f"{self.stem}-{len(self.parts):02d}"

    def write_video(self, samples: Sequence[Sample]) -> None:
        if not samples:
            return
        for sample in samples:
            check_sample(sample)
        size = sum(sample_tar_bytes(s) for s in samples)
        part = self._part
        if part is not None and self.max_bytes and closed_tar_bytes(part.offset + size) > self.max_bytes:
            self._finish_part()
            part = None
        if part is None:
            part = self._part = _Part(self.directory, self._part_name())
        for sample in samples:
            part.add(sample)
        part.videos += 1

    def _finish_part(self) -> None:
        part, self._part = self._part, None  # a part that fails to finish has removed itself
        if part is not None:
            self.parts.append(part.finish())

    def close(self) -> list[PartInfo]:
        self._finish_part()
        return self.parts

    def abort(self) -> None:
        """Drop the part being written; finished parts stay (the unit has no marker, so a rerun redoes it)."""
        if self._part is not None:
            self._part.abort()
            self._part = None

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
