"""`xdctools train RECIPE`: the deep-clustering loop (SDC, MDC, CDC, XDC, superv): resumable, distributed."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click


class Bars:
    """tqdm bars for the loop's progress callback: one per stage, clips/s (or rows/s) and ETA."""

    def __init__(self) -> None:
        self.bar: Any = None
        self.stage: str | None = None

    def __call__(self, stage: str, done: int, total: int, **info: Any) -> None:
        from tqdm import tqdm

        if stage != self.stage:
            self.close()
            self.stage = stage
            unit = "clip" if "epoch" in stage else "segment" if "extract" in stage else "row"
            self.bar = tqdm(
                total=total, desc=stage, unit=unit, unit_scale=True, leave=False, dynamic_ncols=True
            )
        if info:
            self.bar.set_postfix({k: f"{v:.3f}" if isinstance(v, float) else v for k, v in info.items()})
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


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


def _fmt(value: Any) -> str:
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
        table.append([name, *(_fmt(row.get(c)) for c in columns)])
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
def train(
    recipe_path: Path,
    overrides: tuple[str, ...],
    out: Path | None,
    resume: bool,
    quiet: bool,
    print_config: bool,
    world_size: int | None,
) -> None:
    """Pretrain the video and audio encoders with the recipe's method; under torchrun, on every rank.

    optim.batch_size is per GPU and optim.lr the base rate of one GPU: on N GPUs the run takes global
    batches of N x batch_size at N x lr (optim.lr_scaling: linear). --print-config shows the numbers.

    \b
    xdctools train recipes/quickstart.yaml
    xdctools train recipes/pretrain/kinetics-xdc.yaml --print-config --world-size 8
    torchrun --nproc_per_node=8 -m xdctools train recipes/pretrain/kinetics-xdc.yaml
    """
    from trainer import distributed
    from trainer.log import effective_line
    from trainer.loop import run
    from trainer.optim import effective_block
    from xdctools.recipe import load_recipe

    overrides = (*overrides, f"run.out={out}") if out is not None else overrides
    recipe = load_recipe(recipe_path, overrides)
    if world_size is not None and not print_config:
        raise click.UsageError("--world-size only applies to --print-config (a run takes torchrun's)")
    if print_config:
        click.echo(resolved_config(recipe, world_size or distributed.env_ranks()[1]), nl=False)
        return
    main = distributed.env_ranks()[0] == 0
    if main:
        block = effective_block(recipe, distributed.env_ranks()[1])
        click.echo(f"effective: {effective_line(block)}", err=True)
    bars = Bars() if main and not quiet else None
    try:
        result = run(recipe, resume=resume, progress=bars)
    finally:
        if bars is not None:
            bars.close()
    if main:
        click.echo(format_result(result, recipe.iterations))
    distributed.cleanup()
