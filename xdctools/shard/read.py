"""The one reader of a shard folder: its dataset.json, the index of each tar, the bytes of its members.

A shard folder is what `xdctools shard` writes (docs/shard-format.md): `dataset.json` and `<set>/*.tar`, each
tar with DALI's `.idx` beside it. DALI reads the tars itself; every Python-side read goes through here, so
the index format, the member names and the error messages live in one place. Nothing here decodes media.
"""

from __future__ import annotations

import io
import itertools
import json
import os
import tarfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, NamedTuple, TypeVar

import numpy as np

from xdctools.errors import DataError
from xdctools.shard import format as fmt

DATASET_FILE = "dataset.json"

Members = dict[str, tuple[int, int]]  # ext -> (data offset, size) in the tar
Index = list[tuple[str, Members]]  # (key, members) of every sample, in tar order
T = TypeVar("T")


class Location(NamedTuple):
    """Where one sample is: its tar, its key, and each member's (data offset, size)."""

    tar: Path
    key: str
    members: Members


@dataclass(frozen=True)
class Sample:
    """One sample read from a tar: the bytes of its members by extension (`mel.npy`, `webm`, ...)."""

    key: str
    shard: Path
    members: dict[str, bytes]

    @property
    def info(self) -> dict[str, int] | None:
        data = self.members.get(fmt.INFO_EXT)
        return fmt.decode_info(data) if data is not None else None

    @property
    def meta(self) -> dict:
        data = self.members.get(fmt.META_EXT)
        return json.loads(data) if data is not None else {}

    @property
    def video_ext(self) -> str | None:
        return next((ext for ext in fmt.VIDEO_EXTS.values() if ext in self.members), None)

    def decode(self, ext: str, decode: Callable[[bytes], T]) -> T:
        """`decode(bytes of member ext)`; DataError naming the tar and the member when it is absent or
        `decode` fails on it (ValueError, KeyError, IndexError), so a broken shard is found by name."""
        try:
            return decode(self.members[ext])
        except (ValueError, KeyError, IndexError) as e:
            raise DataError(
                f"{self.shard}: member {self.key}.{ext} cannot be read ({type(e).__name__}: {e})"
            ) from None


# --- dataset.json ----------------------------------------------------------------------------------


def read_dataset_json(root: str | os.PathLike) -> dict | None:
    """`root/dataset.json`, None when there is none (a run not finished, a bare set folder).

    Checked once for every reader: a JSON object whose `sets`, when there, is a mapping and whose
    `classes`, when there, is a list of names. DataError naming the file otherwise.
    """
    path = Path(root) / DATASET_FILE
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: unreadable ({type(e).__name__}: {e})") from None
    if not isinstance(doc, dict):
        raise DataError(f"{path}: not a JSON object; not a dataset.json of `xdctools shard`")
    if not isinstance(doc.get("sets", {}), dict):
        raise DataError(f"{path}: 'sets' is not a mapping")
    classes = doc.get("classes")
    if classes is not None and not (isinstance(classes, list) and all(isinstance(c, str) for c in classes)):
        raise DataError(f"{path}: 'classes' is not a list of names")
    return doc


# --- the index of a tar -----------------------------------------------------------------------------


def split_member(name: str) -> tuple[str, str]:
    """'dir/key.mel.npy' -> ('dir/key', 'mel.npy'): as DALI and WebDataset split a member name, at the
    first dot of its base name; (name, '') when it has none."""
    dot = name.find(".", name.rfind("/") + 1)
    return (name, "") if dot < 0 else (name[:dot], name[dot + 1 :])


def parse_index(text: str) -> Index:
    """DALI `wds2idx` v1.2 text -> [(key, {ext: (offset, size)})]; ValueError says what is wrong."""
    lines = text.splitlines()
    head = lines[0].split() if lines else []
    if len(head) != 2 or not head[0].startswith("v1.") or not head[1].isdigit():
        raise ValueError("first line is not 'v1.x <samples>'")
    rows = [line for line in lines[1:] if line.strip()]
    if len(rows) != int(head[1]):
        raise ValueError(f"header says {head[1]} samples, {len(rows)} lines follow")
    out = []
    for n, row in enumerate(rows, start=2):
        parts = row.split()
        if not parts or len(parts) % 4:
            raise ValueError(f"line {n} is not 'ext offset size name' groups")
        members: Members = {}
        key = ""
        for i in range(0, len(parts), 4):
            ext, offset, size, name = parts[i : i + 4]
            if not (offset.isdigit() and size.isdigit()):
                raise ValueError(f"line {n}: offset/size of {name} are not integers")
            key = split_member(name)[0]
            members[ext] = (int(offset), int(size))
        out.append((key, members))
    return out


def read_index(idx: Path) -> Index:
    """The parsed `.idx` file; DataError naming it when it cannot be read or is not a DALI index."""
    try:
        return parse_index(idx.read_text())
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{idx}: unreadable index ({e})") from e
    except ValueError as e:
        raise DataError(f"{idx}: not a DALI index: {e}") from e


def header_index(tar: Path) -> Index:
    """The index a tar's own headers give (consecutive members sharing a key form a sample): for a folder
    whose `.idx` files were deleted. Reads every header, no payload."""
    out: Index = []
    try:
        with tarfile.open(tar) as tf:
            for info in tf:
                if info.isfile():
                    key, ext = split_member(info.name)
                    if not out or out[-1][0] != key:
                        out.append((key, {}))
                    out[-1][1][ext] = (info.offset_data, info.size)
    except (OSError, tarfile.TarError) as exc:
        raise DataError(f"{tar}: unreadable tar ({exc})") from None
    return out


def tar_index(tar: Path) -> Index:
    """The `.idx` beside the tar, else the tar's own headers: both give the same samples."""
    if not tar.is_file():
        raise DataError(f"{tar}: shard missing")
    idx = tar.with_suffix(".idx")
    return read_index(idx) if idx.is_file() else header_index(tar)


def locations(tars: Iterable[str | os.PathLike]) -> Iterator[Location]:
    """Every sample of the tars in stored order, tar after tar; each tar is indexed when reached."""
    for tar in map(Path, tars):
        for key, members in tar_index(tar):
            yield Location(tar, key, members)


# --- member bytes ------------------------------------------------------------------------------------


def read_member(f: BinaryIO, where: tuple[int, int]) -> bytes:
    """The bytes of one member at (offset, size) of the index, from the open tar `f`; ValueError when
    the file ends first (a truncated shard)."""
    offset, size = where
    f.seek(offset)
    data = f.read(size)
    if len(data) != size:
        raise ValueError(f"truncated shard: {len(data)} of {size} bytes at offset {offset}")
    return data


def read_samples(locs: Iterable[Location], exts: Sequence[str]) -> Iterator[Sample]:
    """The `exts` members of each location in turn (absent ones left out), a sample's members in file
    order, one open file per run of locations in the same tar: one seek per member, nothing else read.

    DataError naming the tar (and the member) that cannot be opened or read.
    """
    for tar, group in itertools.groupby(locs, key=lambda loc: loc.tar):
        try:
            f = open(tar, "rb")  # noqa: SIM115 - held across yields, closed by the with below
        except OSError as e:
            raise DataError(f"{tar}: unreadable shard ({e.strerror or e})") from None
        with f:
            for loc in group:
                yield Sample(loc.key, tar, _read_members(f, loc, exts))


def _read_members(f: BinaryIO, loc: Location, exts: Sequence[str]) -> dict[str, bytes]:
    out = {}
    for where, ext in sorted((loc.members[ext], ext) for ext in exts if ext in loc.members):
        try:
            out[ext] = read_member(f, where)
        except (OSError, ValueError) as e:
            raise DataError(
                f"{loc.tar}: member {loc.key}.{ext} cannot be read ({type(e).__name__}: {e})"
            ) from None
    return out


def decode_npy(data: bytes) -> np.ndarray:
    """An `.npy` member (mel, info, labels) as an array, never unpickled: shard bytes are data, not code.
    ValueError when the bytes are not an npy array."""
    return np.load(io.BytesIO(data), allow_pickle=False)
