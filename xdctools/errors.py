"""Error types with fixed exit codes; Click prints them as one `Error: ...` line."""

from __future__ import annotations

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
