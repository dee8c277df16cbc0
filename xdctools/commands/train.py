"""`xdctools train RECIPE`: the deep-clustering loop (SDC, MDC, CDC, XDC, superv): resumable, distributed."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from xdctools.commands.progress import StageBars
from xdctools.commands.slurm_options import COMMON, RANKS, refuse_without_slurm, resources, slurm_options

if TYPE_CHECKING:
    from xdctools.tasks import TrainTask


def stage_unit(stage: str) -> str:
    """The unit of a loop stage's progress: training counts clips, extraction segments, k-means rows."""
    return "clip" if "epoch" in stage else "segment" if "extract" in stage else "row"


def recipe_arguments(example: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """The RECIPE argument and the repeatable `--set KEY=VALUE` override option (`example` in its help)."""

    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        command = click.option(
            "--set",
            "overrides",
            multiple=True,
            metavar="KEY=VALUE",
            help=f"Override a recipe field, e.g. {example} (repeatable).",
        )(command)
        return click.argument("recipe_path", metavar="RECIPE", type=click.Path(path_type=Path))(command)

    return decorate


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return "-" if math.isnan(value) else f"{value:.3f}"
    return "-" if value is None else str(value)


def format_result(result: Any, iterations: int) -> str:
    """Closing lines: a row per iteration (NMI per view, losses, probe accuracy) and where the report is."""
    rows = result.iterations
    columns: list[str] = []
    for row in rows:
        columns += [c for c in row if c != "iteration" and c not in columns]
    header = ["iteration", *columns]
    table = [header]
    for row in rows:
        name = "final" if row["iteration"] >= iterations else str(row["iteration"])
        table.append([name, *(_cell(row.get(c)) for c in columns)])
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(r, widths, strict=True)) for r in table]
    minutes = result.seconds / 60
    state = "already complete" if result.resumed_complete else f"done in {minutes:.1f} min"
    lines += ["", f"Run {state}: {result.run_dir}", f"Report: {result.report}"]
    return "\n".join(lines)


def resolved_config(recipe: Any, world_size: int) -> str:
    """The resolved recipe (every default filled in) and its top-level `effective:` block, as YAML."""
    import yaml

    from trainer.optim import effective_block
    from xdctools.recipe import dump_recipe

    effective = yaml.safe_dump({"effective": effective_block(recipe, world_size)}, sort_keys=False, width=110)
    return dump_recipe(recipe) + effective


@click.command("train")
@recipe_arguments("--set clustering.k=512")
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Run folder (default: run.out).")
@click.option(
    "--resume/--no-resume",
    default=True,
    show_default=True,
    help="Continue from the run folder's last checkpoint, or start over (clears the folder's outputs).",
)
@click.option("--quiet", is_flag=True, help="No progress bars.")
@click.option(
    "--print-config",
    is_flag=True,
    help="Print the resolved recipe and its effective schedule (batch, lr, steps) as YAML; run nothing.",
)
@click.option(
    "--world-size",
    type=click.IntRange(min=1),
    default=None,
    help="With --print-config: the number of GPUs (ranks) to resolve for (default: torchrun's, else 1).",
)
@slurm_options(time="24:00:00", cpus=10, ranks=True, folder="RUN/slurm in the run folder")
def train(
    recipe_path: Path,
    overrides: tuple[str, ...],
    out: Path | None,
    resume: bool,
    quiet: bool,
    print_config: bool,
    world_size: int | None,
    executor: str,
    **slurm: Any,
) -> None:
    """Pretrain the video and audio encoders with the recipe's method; under torchrun, on every rank.

    optim.batch_size is per GPU and optim.lr the base rate of one GPU: on N GPUs the run takes global
    batches of N x batch_size at N x lr (optim.lr_scaling: linear). --print-config shows the numbers.

    \b
    xdctools train recipes/quickstart.yaml
    xdctools train recipes/pretrain/kinetics-xdc.yaml --print-config --world-size 8
    torchrun --nproc_per_node=8 -m xdctools train recipes/pretrain/kinetics-xdc.yaml
    xdctools train recipes/pretrain/kinetics-xdc.yaml --executor slurm --nodes 2 --gpus-per-node 8
    """
    from trainer import distributed
    from trainer.log import effective_line
    from trainer.optim import effective_block
    from xdctools.recipe import load_recipe
    from xdctools.tasks import TrainTask

    refuse_without_slurm(executor, (*COMMON, *RANKS))
    overrides = (*overrides, f"run.out={out}") if out is not None else overrides
    recipe = load_recipe(recipe_path, overrides)
    if world_size is not None and not print_config:
        raise click.UsageError("--world-size only applies to --print-config (a run takes torchrun's)")
    if print_config:
        ranks = slurm["nodes"] * slurm["gpus_per_node"] if executor == "slurm" else distributed.env_ranks()[1]
        click.echo(resolved_config(recipe, world_size or ranks), nl=False)
        return
    task = TrainTask(recipe, resume=resume)
    if executor == "slurm":
        train_on_slurm(task, slurm)
        return
    main = distributed.env_ranks()[0] == 0
    if main:
        block = effective_block(recipe, distributed.env_ranks()[1])
        click.echo(f"effective: {effective_line(block)}", err=True)
    with StageBars(stage_unit) as bars:
        result = task(progress=bars if main and not quiet else None)
    if main:
        click.echo(format_result(result, recipe.iterations))


def train_on_slurm(task: TrainTask, slurm: dict[str, Any]) -> None:
    """One job of --nodes x --gpus-per-node ranks; requeued, it resumes from the newest checkpoint."""
    from trainer.log import effective_line
    from trainer.optim import effective_block
    from xdctools.slurm import failure, import_submitit, run_ranks

    run_dir = Path(task.recipe.run.out).resolve()
    res = resources(slurm, folder=run_dir / "slurm", name=f"xdctools-{task.recipe.name}", gpus=True)
    import_submitit()
    click.echo(f"effective: {effective_line(effective_block(task.recipe, res.ranks))}", err=True)
    results = run_ranks(task, res, on_submit=lambda line: click.echo(f"submitted {line}", err=True))
    error = failure(results, what="rank")
    if error is not None:
        raise error
    click.echo(format_result(results[0].value, task.recipe.iterations))
