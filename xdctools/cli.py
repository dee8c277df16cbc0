"""Click entry point: every command lives in its own module and is imported only when used."""

from __future__ import annotations

import importlib

import click

from xdctools import __version__
from xdctools.errors import disk_full

# name -> "module:attribute"; modules import heavy dependencies (torch, DALI) only when run.
COMMANDS: dict[str, str] = {
    "cluster": "xdctools.commands.cluster:cluster",
    "compare": "xdctools.commands.compare:compare",
    "digits": "xdctools.commands.digits:digits",
    "extract": "xdctools.commands.extract:extract",
    "filters": "xdctools.commands.filters:filters",
    "finetune": "xdctools.commands.finetune:finetune",
    "inspect": "xdctools.commands.inspect:inspect_cmd",
    "montage": "xdctools.commands.montage:montage",
    "shard": "xdctools.commands.shard:shard",
    "synth": "xdctools.commands.synth:synth",
    "train": "xdctools.commands.train:train",
}


class LazyGroup(click.Group):
    """A group whose subcommands are imported on demand, so `--help` stays fast."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = COMMANDS.get(cmd_name)
        if target is None:
            return None
        module_name, attr = target.split(":")
        return getattr(importlib.import_module(module_name), attr)

    def invoke(self, ctx: click.Context) -> object:
        """A write the disk refused, wherever it happens, ends as one line with its own exit code (7)."""
        try:
            return super().invoke(ctx)
        except OSError as e:
            error = disk_full(e)
            if error is None:
                raise
            raise error from e


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="xdctools")
def cli() -> None:
    """Cross-Modal Deep Clustering: shard videos, train encoders, cluster features, evaluate."""


def main() -> None:
    cli()
