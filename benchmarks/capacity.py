"""The capacity plan's figures (docs/scale.md): what one run of a pretraining recipe costs, per dataset.

Measured by this script (CPU, any machine): the floating-point operations of one training clip of each
encoder at the recipe's clip shape (torch.utils.flop_counter, forward + backward, the encoder with its
global pooling; the heads are negligible) and of one extraction segment (forward only).
Counted from the recipe: the clips one run trains on (iterations x epochs x epoch_size: an upper bound,
early stopping ends iterations sooner), and the k-means work of an iteration in multiply-adds: faiss
trains on k x sample_per_centroid rows for niter Lloyd iterations, then one pass (plus `refine` passes)
assigns all N rows; per clustered view (XDC: video and audio).
Given on the command line, measured by benchmarks/shard.py on the same kind of files (docs/scale.md):
`--shard-rate` (seconds of video sharded per core-second) and `--shard-bytes` (bytes of shards per
second of video). Stated, not measured: each dataset's size and mean duration (`DATASETS`, paper §4.1).

    .venv/bin/python benchmarks/capacity.py --shard-rate 3.1 --shard-bytes 61000
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from trainer.session import build_encoders
from xdctools.recipe import Recipe, load_recipe
from xdctools.shard import format as fmt

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Dataset:
    name: str
    recipe: str
    videos: int
    mean_seconds: float  # stated: paper §4.1
    source: str


DATASETS = (
    Dataset("Kinetics", "kinetics-xdc.yaml", 240_000, 10.0, "240K videos of about 10 s (paper §4.1)"),
    Dataset("AudioSet", "audioset-xdc.yaml", 2_000_000, 10.0, "2M videos of about 10 s (paper §4.1)"),
    Dataset(
        "IG65M", "ig65m-xdc.yaml", 65_000_000, 30.0, "65M videos of 1 to 60 s (paper §4.1); mean 30 s assumed"
    ),
)


def flops(model: torch.nn.Module, x: torch.Tensor, backward: bool) -> float:
    """Floating-point operations of one forward (and backward) of `model.forward_features` on `x`."""
    with FlopCounterMode(display=False) as counter:
        out = model.forward_features(x)
        if backward:
            out.sum().backward()
    return float(counter.get_total_flops())


def clip_flops(recipe: Recipe, video: torch.nn.Module, audio: torch.nn.Module) -> dict[str, float]:
    """Per encoder: FLOPs of a training clip (forward + backward) and of an extraction segment's clip."""
    d = recipe.data
    v = torch.randn(1, 3, d.clip_frames, d.crop, d.crop)
    a = torch.randn(1, 1, fmt.N_MELS, fmt.WINDOW_FRAMES)
    return {
        "video_train": flops(video, v, True),
        "audio_train": flops(audio, a, True),
        "video_extract": flops(video.eval(), v, False),
        "audio_extract": flops(audio.eval(), a, False),
    }


def training_clips(recipe: Recipe) -> int:
    """Clips trained on over the whole run, without early stopping."""
    return sum(
        recipe.optim_for(i).epoch_size * recipe.optim_for(i).total_epochs for i in range(recipe.iterations)
    )


def kmeans_madds(recipe: Recipe, rows: int, dims: dict[str, int]) -> tuple[float, float]:
    """(training, assignment) multiply-adds of one iteration's k-means over all clustered views."""
    c = recipe.clustering
    train = assign = 0.0
    for view in recipe.views:
        k = c.k_for(view)
        train += min(rows, k * c.sample_per_centroid) * dims[view] * k * c.niter
        assign += rows * dims[view] * k * (1 + c.refine)
    return train, assign


def plan_rows(args: argparse.Namespace) -> list[dict[str, float | str]]:
    out = []
    for ds in DATASETS:
        recipe = load_recipe(ROOT / "recipes" / "pretrain" / ds.recipe)
        models = build_encoders(recipe)  # as the training loop builds them
        dims = {m: int(e.feature_dim) for m, e in models.items()}
        dims["cdc"] = dims["video"] + dims["audio"]
        f = clip_flops(recipe, models["video"], models["audio"])
        seconds = ds.videos * ds.mean_seconds
        segments = seconds * 30 / fmt.DEFAULT_SEGMENT_FRAMES  # 30 fps assumed: segments of 64 frames
        clips = training_clips(recipe)
        per_clip, per_segment = f["video_train"] + f["audio_train"], f["video_extract"] + f["audio_extract"]
        train_madds, assign_madds = kmeans_madds(recipe, ds.videos, dims)
        out.append({
            "dataset": ds.name,
            "videos": ds.videos,
            "hours of video": seconds / 3600,
            "shard core-hours": seconds / args.shard_rate / 3600,
            "shards TB": seconds * args.shard_bytes / 1e12,
            "feature store GB": ds.videos * (dims["video"] + dims["audio"]) * 2 / 1e9,  # float16, both
            "k-means train Tmadd / it": train_madds / 1e12,
            "k-means assign Tmadd / it": assign_madds / 1e12,
            "training clips M": clips / 1e6,
            "GFLOP / clip": per_clip / 1e9,
            "training PFLOP": clips * per_clip / 1e15,
            "extraction PFLOP": recipe.iterations * segments * per_segment / 1e15,
        })  # fmt: skip
    return out


def _cell(value: float | int | str) -> str:
    """Thousands separated from 100 up, three significant digits below."""
    if isinstance(value, str):
        return value
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shard-rate", type=float, required=True, help="seconds of video sharded per core-second")
    p.add_argument("--shard-bytes", type=float, required=True, help="bytes of shards per second of video")
    args = p.parse_args()
    rows = plan_rows(args)
    keys = list(rows[0])
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for r in rows:
        cells = [_cell(v) for v in r.values()]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
