"""`xdctools extract CHECKPOINT SHARDS -o feats.zarr`: the encoders' features of every video, into a store."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from xdctools.commands.progress import StageBars
from xdctools.commands.slurm_options import COMMON, RANKS, refuse_without_slurm, resources, slurm_options
from xdctools.commands.train import stage_unit
from xdctools.tasks import Extracted, ExtractTask

# Options passed to the task as they are.
FIELDS = (
    "batch_size",
    "device",
    "precision",
    "clip_frames",
    "stride",
    "crop",
    "short_side",
    "bn_eps",
    "threads",
)
FIELDS += ("overwrite",)


@click.command("extract")
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.argument("shards", type=click.Path(path_type=Path))
@click.option("-o", "--out", type=click.Path(path_type=Path), required=True, help="Feature store to write.")
@click.option("--set", "set_name", default="train", show_default=True, help="Shard set to extract.")
@click.option(
    "--modality",
    type=click.Choice(["video", "audio", "both"]),
    default=None,
    help="Encoders to run (default: every one the checkpoint holds).",
)
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True)
@click.option(
    "--device",
    type=click.Choice(["cpu", "gpu"]),
    default="cpu",
    show_default=True,
    help="Where DALI decodes and the encoders run.",
)
@click.option("--precision", type=click.Choice(["fp32", "bf16", "fp16"]), default="fp32", show_default=True)
@click.option("--clip-frames", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--stride", type=click.IntRange(min=1), default=1, show_default=True)
@click.option(
    "--crop",
    type=click.IntRange(min=8),
    default=None,
    help="Centre crop in pixels (default: 224, or the stored short side when smaller).",
)
@click.option(
    "--short-side",
    type=click.IntRange(min=8),
    default=None,
    help="Resize frames to this short side before cropping (default: as stored).",
)
@click.option(
    "--bn-eps",
    type=float,
    default=None,
    help="BatchNorm eps of a plain state dict (default 1e-3 for the XDC layout, 1e-5 otherwise).",
)
@click.option("--threads", type=click.IntRange(min=1), default=2, show_default=True, help="DALI threads.")
@click.option("--overwrite", is_flag=True, help="Replace a store made from other weights or data.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@slurm_options(time="4:00:00", cpus=10, ranks=True, folder="OUT.slurm beside OUT")
def extract(
    checkpoint: Path,
    shards: Path,
    out: Path,
    set_name: str,
    modality: str | None,
    batch_size: int,
    device: str,
    precision: str,
    clip_frames: int,
    stride: int,
    crop: int | None,
    short_side: int | None,
    bn_eps: float | None,
    threads: int,
    overwrite: bool,
    quiet: bool,
    executor: str,
    **slurm: Any,
) -> None:
    """Run the encoders of CHECKPOINT over every segment of SHARDS once; one row per video (segment mean).

    CHECKPOINT is a training checkpoint or encoders.pt of `xdctools train` (video and audio), or a plain
    R(2+1)D-18 state dict (video only): the official XDC weights or torchvision's layout. An interrupted
    extraction resumes when run again with the same arguments. Under torchrun every rank takes a part;
    --executor slurm submits --nodes x --gpus-per-node ranks (docs/scale.md).

    \b
    xdctools extract runs/quickstart/encoders.pt demo/shards -o feats.zarr --crop 112
    xdctools extract r2plus1d_18_xdc_ig65m_kinetics.pth shards/ucf101 --set test -o ucf.zarr --device gpu
    """
    refuse_without_slurm(executor, (*COMMON, *RANKS))
    if precision != "fp32" and device != "gpu":
        raise click.BadParameter("bf16/fp16 need --device gpu", param_hint="--precision")
    task = extract_task(click.get_current_context().params)
    if executor == "slurm":
        extract_on_slurm(task, slurm)
        return
    with StageBars(stage_unit) as bars:
        done = task(progress=None if quiet else bars)
    if done is not None:
        click.echo(extracted_line(done, checkpoint))


def extract_task(o: dict[str, Any]) -> ExtractTask:
    """The command's options (Click's parameters by name) as the task every rank runs."""
    modality = o["modality"]
    return ExtractTask(
        o["checkpoint"],
        o["shards"],
        o["out"],
        set_name=o["set_name"],
        modalities=None if modality is None else (("video", "audio") if modality == "both" else (modality,)),
        **{key: o[key] for key in FIELDS},
    )


def extracted_line(done: Extracted, checkpoint: Path) -> str:
    dims = ", ".join(f"{m} {d}" for m, d in done.dims.items())
    return f"{done.path}: {done.videos} videos x ({dims}) from {checkpoint} ({done.source} weights)"


def extract_on_slurm(task: ExtractTask, slurm: dict[str, Any]) -> None:
    """One job of --nodes x --gpus-per-node ranks (CPU ranks with --device cpu); rank 0's line."""
    from xdctools.slurm import failure, import_submitit, run_ranks

    out = task.out.resolve()
    res = resources(
        slurm, folder=out.with_name(out.name + ".slurm"), name="xdctools-extract", gpus=task.device == "gpu"
    )
    import_submitit()
    task.check()
    results = run_ranks(task, res, on_submit=lambda line: click.echo(f"submitted {line}", err=True))
    error = failure(results, what="rank")
    if error is not None:
        raise error
    click.echo(extracted_line(results[0].value, task.checkpoint))
