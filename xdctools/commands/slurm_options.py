"""The `--executor slurm` options of shard, extract and train, and the Slurm resources they ask for."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource

from xdctools.slurm import CLUSTERS, Resources, check_resources, parse_time

ARRAY = ("slurm_tasks",)
RANKS = ("nodes", "gpus_per_node")
COMMON = (
    "slurm_partition",
    "slurm_time",
    "slurm_cpus_per_task",
    "slurm_mem",
    "slurm_account",
    "slurm_qos",
    "slurm_folder",
    "slurm_cluster",
)


def slurm_options(*, time: str, cpus: int, ranks: bool, folder: str) -> Callable[[Any], Any]:
    """--executor and the resources: an array (--slurm-tasks) or one job of ranks (--nodes, --gpus-per-node).

    `time` and `cpus` are the command's defaults; `folder` says where the logs go by default.
    """
    options = [*common_options(time, cpus, ranks, folder), *(rank_options() if ranks else array_options())]

    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        for option in reversed(options):
            command = option(command)
        return command

    return decorate


def common_options(time: str, cpus: int, ranks: bool, folder: str) -> list[Callable[[Any], Any]]:
    return [
        click.option(
            "--executor",
            type=click.Choice(["local", "slurm"]),
            default="local",
            show_default=True,
            help="local: this process (or torchrun's); slurm: submit to Slurm through submitit "
            "(pip install 'xdctools[slurm]'), wait, print one summary. Preempted or timed-out tasks "
            "requeue and resume.",
        ),
        click.option("--slurm-partition", default=None, help="Slurm partition (default: the cluster's)."),
        click.option(
            "--slurm-time",
            default=time,
            show_default=True,
            help="Time limit per job: minutes, H:M:S or D-H:M:S. A task near it requeues and resumes.",
        ),
        click.option(
            "--slurm-cpus-per-task",
            type=int,
            default=cpus,
            show_default=True,
            help="CPUs per task" + (" (per GPU rank)." if ranks else " (its --workers unless given)."),
        ),
        click.option(
            "--slurm-mem", default=None, help="Memory per node, e.g. 64G (default: the partition's)."
        ),
        click.option("--slurm-account", default=None, help="Slurm account to charge."),
        click.option("--slurm-qos", default=None, help="Slurm quality of service."),
        click.option(
            "--slurm-folder",
            type=click.Path(file_okay=False, path_type=Path),
            default=None,
            help=f"submitit's job files and the tasks' logs (default: {folder}).",
        ),
        # submitit's LocalExecutor: the same jobs as subprocesses of this machine, no Slurm (the tests)
        click.option("--slurm-cluster", type=click.Choice(CLUSTERS), default="slurm", hidden=True),
    ]


def rank_options() -> list[Callable[[Any], Any]]:
    return [
        click.option(
            "--nodes", type=int, default=1, show_default=True, help="Slurm nodes (--executor slurm)."
        ),
        click.option(
            "--gpus-per-node",
            type=int,
            default=8,
            show_default=True,
            help="Ranks per node, one GPU each (--executor slurm).",
        ),
    ]


def array_options() -> list[Callable[[Any], Any]]:
    help_ = "Array tasks: task R runs --node-rank R --num-nodes M (at most one per shard unit)."
    return [click.option("--slurm-tasks", type=int, default=16, show_default=True, help=help_)]


def given(names: Iterable[str]) -> list[str]:
    """The options among `names` set on the command line (not left at their default)."""
    ctx = click.get_current_context()
    return [name for name in names if ctx.get_parameter_source(name) not in (ParameterSource.DEFAULT, None)]


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def refuse_without_slurm(executor: str, names: Iterable[str]) -> None:
    """A Slurm option with --executor local is a mistake (it would run here): a usage error naming it."""
    if executor != "slurm":
        names = given(names)
        if names:
            raise click.UsageError(f"{flag(names[0])}: only with --executor slurm")


def resources(slurm: dict[str, Any], *, folder: Path, name: str, gpus: bool, array: int = 1) -> Resources:
    """Resources from the options (ConfigError naming a bad one); `gpus`: one GPU per rank."""
    ranks_per_node = slurm.get("gpus_per_node", 1)
    res = Resources(
        folder=slurm["slurm_folder"] or folder,
        time_min=parse_time(slurm["slurm_time"]),
        cpus_per_task=slurm["slurm_cpus_per_task"],
        array=array,
        nodes=slurm.get("nodes", 1),
        ranks_per_node=ranks_per_node,
        gpus_per_node=ranks_per_node if gpus else 0,
        mem=slurm["slurm_mem"],
        partition=slurm["slurm_partition"],
        account=slurm["slurm_account"],
        qos=slurm["slurm_qos"],
        cluster=slurm["slurm_cluster"],
        name=name,
    )
    return check_resources(res)
