"""Files that appear whole or not at all: every file written in one go (JSON, CSV, reports, plots,
checkpoints, shard indexes) goes through here; streamed tar parts, ffmpeg outputs and Zarr folders
have their own renames.

A file is written to a hidden temp name beside it, flushed to disk, renamed over the target, and the folder
is synced, so a reader (or a resumed run) sees the old file or the whole new one, never a partial one.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import IO

from xdctools.errors import naming


def fsync_dir(directory: str | os.PathLike) -> None:
    """Make a rename inside `directory` durable: without it a power cut can undo the rename."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_path(path: Path) -> Path:
    """A hidden name beside `path` that no other process picks: `.name.tmp-<pid>-<random>`."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def write_atomic(
    path: str | os.PathLike, write: Callable[[IO[bytes]], None], *, tmp: Path | None = None
) -> Path:
    """Write `path` through `write(f)` on a temp file (`tmp`, default `temp_path(path)`), then rename it.

    If `write` raises, the temp file is removed and `path` is untouched. A kill -9 can leave the temp
    file behind, never a partial `path`; callers that clean up after a kill pass a `tmp` they can find.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path) if tmp is None else Path(tmp)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise naming(e, path) from e  # a refused write (disk full) names the file it was for
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def write_bytes_atomic(path: str | os.PathLike, data: bytes, *, tmp: Path | None = None) -> Path:
    """`write_atomic` for bytes already in memory."""
    return write_atomic(path, lambda f: f.write(data), tmp=tmp)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """`write_atomic` for UTF-8 text (JSON, CSV, Markdown)."""
    return write_bytes_atomic(path, text.encode("utf-8"))
