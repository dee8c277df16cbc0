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
def train(recipe_path: Path, overrides: tuple[str, ...], out: Path | None, resume: bool, quiet: bool) -> None:
    """Pretrain the video and audio encoders with the recipe's method; under torchrun, on every rank.

    \b
    xdctools train recipes/quickstart.yaml
    torchrun --nproc_per_node=8 -m xdctools train recipes/pretrain/kinetics-xdc.yaml
    """
    from trainer import distributed
    from trainer.loop import run
    from xdctools.recipe import load_recipe

    overrides = (*overrides, f"run.out={out}") if out is not None else overrides
    recipe = load_recipe(recipe_path, overrides)
    main = distributed.env_ranks()[0] == 0
    bars = Bars() if main and not quiet else None
    try:
        result = run(recipe, resume=resume, progress=bars)
    finally:
        if bars is not None:
            bars.close()
    if main:
        click.echo(format_result(result, recipe.iterations))
    distributed.cleanup()
