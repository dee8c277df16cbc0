"""Error types with fixed exit codes; Click prints them as one `Error: ...` line."""

from __future__ import annotations

import errno

import click


class XdcError(click.ClickException):
    """Base error: a one-line message, exit code 1."""

    exit_code = 1


class InputError(XdcError):
    """A file or folder given by the user cannot be used (names the path and the reason)."""

    exit_code = 3


class ConfigError(XdcError):
    """A recipe or option is invalid (names the field and the reason)."""

    exit_code = 4


class DataError(XdcError):
    """Data on disk (shards, feature stores, checkpoints) is missing, corrupt or inconsistent."""

    exit_code = 5


class DependencyError(XdcError):
    """A required external tool or package is missing (names how to install it)."""

    exit_code = 6


class DiskFullError(XdcError):
    """The disk (or a file-size limit) refused a write: nothing half-written is left under a final name,
    so freeing space and running the same command again resumes."""

    exit_code = 7


class DivergedError(XdcError):
    """Training met a loss that is not finite: the run stops at once, before a checkpoint of the
    diverged weights is written, so its last checkpoint is the last good state."""

    exit_code = 8


DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EFBIG, errno.EDQUOT})


def disk_full(error: OSError) -> DiskFullError | None:
    """The one-line error for a write the disk refused (no space, file too large, quota), else None."""
    if error.errno not in DISK_FULL_ERRNOS:
        return None
    where = f"{error.filename}: " if error.filename else ""
    return DiskFullError(
        f"{where}cannot write ({error.strerror}); free space (or raise the file-size limit) and run the "
        "same command again (nothing half-written was kept)"
    )


def naming(error: OSError, path: object) -> OSError:
    """`error` naming `path` when it names no file (a write refused mid-file names none), same errno."""
    if error.filename is not None:
        return error
    named = OSError(error.errno, error.strerror, str(path))
    named.__cause__ = error
    return named
