"""`xdctools synth`: write a small synthetic audio-visual class-folder collection of real MP4 files."""

from __future__ import annotations

import re
import time
from pathlib import Path

import click

from xdctools.commands.progress import StageBars
from xdctools.synth import MAX_CLASSES, SynthParams, synthesize


class FrameSize(click.ParamType):
    """'160x120' -> (160, 120): even, at least 32 each way (4:2:0 video)."""

    name = "WxH"

    def convert(self, value, param, ctx) -> tuple[int, int]:
        if isinstance(value, tuple):
            return value
        match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", str(value))
        if not match:
            self.fail(f"{value!r} is not a size like 160x120", param, ctx)
        w, h = int(match.group(1)), int(match.group(2))
        if w < 32 or h < 32 or w % 2 or h % 2:
            self.fail(f"{value!r}: width and height must be even and at least 32", param, ctx)
        return w, h


@click.command("synth")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--classes", type=click.IntRange(1, MAX_CLASSES), default=6, show_default=True, help="Number of classes."
)
@click.option(
    "--per-class", type=click.IntRange(min=1), default=8, show_default=True, help="Videos per class."
)
@click.option(
    "--seconds", type=click.FloatRange(0.5, 600), default=4.0, show_default=True, help="Length of each video."
)
@click.option("--fps", type=click.FloatRange(1, 120), default=25.0, show_default=True, help="Frame rate.")
@click.option("--size", type=FrameSize(), default="160x120", show_default=True, help="Frame size WxH.")
@click.option(
    "--seed", type=click.IntRange(min=0), default=0, show_default=True, help="Same seed, same videos."
)
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True, help="Processes.")
def synth(
    directory: Path,
    classes: int,
    per_class: int,
    seconds: float,
    fps: float,
    size: tuple[int, int],
    seed: int,
    workers: int,
) -> None:
    """Write DIRECTORY/<class>/<name>.mp4 (H.264 + AAC) and DIRECTORY/synth.json.

    Each class pairs a shape, motion and hue with a tone, timbre and rhythm (the shape pulses with
    the sound); background, position, size, speed, loudness, a flickering square and a stray beep
    vary per video. Rerunning with the same options finishes an interrupted run.
    """
    params = SynthParams(classes=classes, per_class=per_class, seconds=seconds, fps=fps, size=size, seed=seed)
    start = time.perf_counter()
    with StageBars("video") as bars:
        total = classes * per_class
        result = synthesize(
            directory, params, workers=workers, progress=lambda _: bars.advance("synth", total)
        )
    elapsed = time.perf_counter() - start
    click.echo(
        f"{len(result.files)} videos ({classes} classes x {per_class}) in {result.root}: "
        f"{result.written} written, {len(result.files) - result.written} already there, {elapsed:.1f} s"
    )
    click.echo(f"description: {result.root / 'synth.json'}")
