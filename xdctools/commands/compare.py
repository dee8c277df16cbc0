"""`xdctools compare RUN...`: finished pretraining runs in one table (the paper's Table 1 view)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from xdctools.atomic import write_text_atomic
from xdctools.compare import (
    compare_rows,
    load_run,
    mean_rows,
    render_markdown,
    render_seed_markdown,
    seed_rows,
)


@click.command("compare")
@click.argument("runs", nargs=-1, required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "-o", "--output", type=click.Path(dir_okay=False, path_type=Path), help="Also write the table here (.md)."
)
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path), help="Rows as JSON.")
@click.option(
    "--mean",
    "over_seeds",
    is_flag=True,
    help="One row per method: mean ± standard deviation over its runs (seeds).",
)
@click.option(
    "--seeds",
    "per_seed",
    is_flag=True,
    help="One row per run against its own iteration 0: gains, NMI and iterations to half the final gain.",
)
def compare(
    runs: tuple[Path, ...], output: Path | None, json_out: Path | None, over_seeds: bool, per_seed: bool
) -> None:
    """Linear-probe accuracy and cluster NMI of the final encoders of each RUN (folders written by
    `xdctools train` with probe on), with a first row for the random encoders every run starts from.
    With a Superv run among them, the share of the random -> Superv gap each method closes.
    """
    if over_seeds and per_seed:
        raise click.UsageError("--mean and --seeds are two different tables: pick one")
    loaded = [load_run(r) for r in runs]
    if per_seed:
        rows = seed_rows(loaded)
        table = render_seed_markdown(rows)
    else:
        rows = mean_rows(loaded) if over_seeds else compare_rows(loaded)
        table = render_markdown(rows)
    if output is not None:
        write_text_atomic(output, table)
    if json_out is not None:
        write_text_atomic(json_out, json.dumps(rows, indent=1) + "\n")
    click.echo(table, nl=False)
