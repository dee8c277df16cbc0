"""`xdctools inspect`: print a shard folder's summary; draw one sample's frames and mel to a PNG."""

from __future__ import annotations

from pathlib import Path

import click

from xdctools.inspect import (
    dataset_summary,
    describe_sample,
    load_dataset,
    read_sample,
    sample_figure,
    write_png,
)


@click.command("inspect")
@click.argument("shards", type=click.Path(file_okay=False, path_type=Path))
@click.option("--key", help="Sample key to show (default: the first sample of the first shard).")
@click.option(
    "--png",
    "png",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write the sample's frame grid and mel spectrogram to this PNG.",
)
@click.option(
    "--frames", type=click.IntRange(1, 32), default=8, show_default=True, help="Frames in the grid."
)
def inspect_cmd(shards: Path, key: str | None, png: Path | None, frames: int) -> None:
    """Print the summary of SHARDS/dataset.json (sets, classes, counts, failures, parameters).

    With --key or --png, also show one sample: its members and info fields, and with --png a picture
    of what the trainer sees (frames of the segment, its mel on the source's time axis).
    """
    dataset = load_dataset(shards)
    classes = dataset.get("classes")
    sample = read_sample(shards, key, dataset) if key is not None or png is not None else None
    if png is not None:
        write_png(sample_figure(sample, classes, grid=frames), png)
    click.echo(dataset_summary(dataset, shards))
    if sample is not None:
        click.echo("")
        click.echo(describe_sample(sample, classes))
    if png is not None:
        click.echo(f"png: {png}")
