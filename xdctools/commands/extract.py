"""`xdctools extract CHECKPOINT SHARDS -o feats.zarr`: the encoders' features of every video, into a store."""

from __future__ import annotations

from pathlib import Path

import click

from xdctools.commands.train import Bars


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
) -> None:
    """Run the encoders of CHECKPOINT over every segment of SHARDS once; one row per video (segment mean).

    CHECKPOINT is a training checkpoint or encoders.pt of `xdctools train` (video and audio), or a plain
    R(2+1)D-18 state dict (video only): the official XDC weights or torchvision's layout. An interrupted
    extraction resumes when run again with the same arguments. Under torchrun every rank takes a part.

    \b
    xdctools extract runs/quickstart/encoders.pt demo/shards -o feats.zarr --crop 112
    xdctools extract r2plus1d_18_xdc_ig65m_kinetics.pth shards/ucf101 --set test -o ucf.zarr --device gpu
    """
    from trainer import distributed
    from trainer.data import ClipSpec, Runtime, find_shards
    from trainer.extract import extract_features, load_encoders
    from xdctools.errors import ConfigError

    if precision != "fp32" and device != "gpu":
        raise click.BadParameter("bf16/fp16 need --device gpu", param_hint="--precision")
    wanted = None if modality is None else (("video", "audio") if modality == "both" else (modality,))
    loaded = load_encoders(checkpoint, modalities=wanted, bn_eps=bn_eps)
    has_video = "video" in loaded.encoders
    shard_set = find_shards(shards, set_name, video=has_video)
    if crop is None:
        crop = min(224, short_side or shard_set.short_side or 224)
    dist = distributed.init("cuda" if device == "gpu" else "cpu")
    if dist.device.type == "cpu" and device == "gpu":
        raise ConfigError("--device gpu: no CUDA device is available here")
    for encoder in loaded.encoders.values():
        encoder.to(dist.device)
    main = dist.is_main
    bars = Bars() if main and not quiet else None
    try:
        store = extract_features(
            loaded.encoders,
            shard_set,
            out,
            batch_size=batch_size,
            clip=ClipSpec(
                length=clip_frames, stride=stride, crop=crop, short_side=short_side, video=has_video
            ),
            run=Runtime(
                device=device,
                device_id=dist.local_rank,
                num_threads=threads,
                rank=dist.rank,
                world_size=dist.world_size,
            ),
            device=dist.device,
            precision=precision,
            attrs={
                "iteration": loaded.iteration,
                "set": set_name,
                "source": str(checkpoint),
                "weights": loaded.source,
            },
            overwrite=overwrite,
            progress=bars,
            stage=f"extract {set_name}",
        )
    finally:
        if bars is not None:
            bars.close()
    if main:
        dims = ", ".join(f"{m} {d}" for m, d in store.dims.items())
        click.echo(f"{store.path}: {store.n} videos x ({dims}) from {checkpoint} ({loaded.source} weights)")
    distributed.cleanup()
