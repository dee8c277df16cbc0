"""`xdctools digits`: the real audio-visual digits set (moving MNIST digit + FSDD spoken digit) as MP4s."""

from __future__ import annotations

import time
from pathlib import Path

import click

from xdctools.commands.progress import StageBars
from xdctools.commands.synth import FrameSize
from xdctools.digits import DigitsParams, make_digits

DEFAULT_FSDD = Path("../shared/data/fsdd")
DEFAULT_MNIST = Path("../shared/data/mnist")


@click.command("digits")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--per-digit-train",
    type=click.IntRange(min=1),
    default=DigitsParams.per_digit_train,
    show_default=True,
    help="Train videos per digit (FSDD index 5-49, MNIST t10k 0-4999).",
)
@click.option(
    "--per-digit-test",
    type=click.IntRange(min=1),
    default=DigitsParams.per_digit_test,
    show_default=True,
    help="Test videos per digit (FSDD index 0-4, MNIST t10k 5000-9999).",
)
@click.option(
    "--seconds",
    type=click.FloatRange(0.5, 60),
    default=DigitsParams.seconds,
    show_default=True,
    help="Length of each video.",
)
@click.option("--fps", type=click.FloatRange(1, 120), default=25.0, show_default=True, help="Frame rate.")
@click.option("--size", type=FrameSize(), default="128x128", show_default=True, help="Frame size WxH.")
@click.option(
    "--seed", type=click.IntRange(min=0), default=0, show_default=True, help="Same seed, same videos."
)
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True, help="Processes.")
@click.option(
    "--fsdd",
    "fsdd_dir",
    type=click.Path(path_type=Path),
    default=DEFAULT_FSDD,
    show_default=True,
    help="Free Spoken Digit Dataset folder (holding recordings/).",
)
@click.option(
    "--mnist",
    "mnist_dir",
    type=click.Path(path_type=Path),
    default=DEFAULT_MNIST,
    show_default=True,
    help="Folder holding MNIST t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz.",
)
def digits(
    directory: Path,
    per_digit_train: int,
    per_digit_test: int,
    seconds: float,
    fps: float,
    size: tuple[int, int],
    seed: int,
    workers: int,
    fsdd_dir: Path,
    mnist_dir: Path,
) -> None:
    """Write DIRECTORY/{train,test}/<digit>/<name>.mp4, DIRECTORY/digits.json and DIRECTORY/manifest.csv.

    Each video shows a handwritten MNIST digit moving over a noisy background while an FSDD speaker
    says the same digit; FSDD's test recordings (index 0-4) and one half of MNIST t10k go only to test.
    Rerunning with the same options finishes an interrupted run. Shard both splits into one output:

        xdctools shard DIRECTORY/manifest.csv -o SHARDS --short-side 128
    """
    params = DigitsParams(
        per_digit_train=per_digit_train,
        per_digit_test=per_digit_test,
        seconds=seconds,
        fps=fps,
        size=size,
        seed=seed,
    )
    start = time.perf_counter()
    total = 10 * (per_digit_train + per_digit_test)
    with StageBars("video") as bars:
        result = make_digits(
            directory,
            params,
            fsdd_dir=fsdd_dir,
            mnist_dir=mnist_dir,
            workers=workers,
            progress=lambda _path: bars.advance("digits", total),
        )
    elapsed = time.perf_counter() - start
    click.echo(
        f"{len(result.files)} videos (10 digits x {per_digit_train} train + {per_digit_test} test) in "
        f"{result.root}: {result.written} written, {len(result.files) - result.written} already there, "
        f"{elapsed:.1f} s"
    )
    click.echo(f"description: {result.root / 'digits.json'}")
    click.echo(f"next: xdctools shard {result.root / 'manifest.csv'} -o SHARDS --short-side 128")
