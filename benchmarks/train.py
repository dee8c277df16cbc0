"""Training throughput: the full loop (DALI loader + label lookup + step + bookkeeping) vs the plain step.

    .venv/bin/python benchmarks/train.py                    # CPU: width 0.125, 8x112x112 clips, batch 8
    .venv/bin/python benchmarks/train.py --device cuda      # GPU: width 1, 8x224x224, batch 32, bf16

"Full loop" is `trainer.loop.train_epoch` exactly as `xdctools train` runs it: a fresh DALI loader per
epoch, pseudo-labels looked up per batch, held-out masking, the XDC step on both encoders, lr schedule,
metric records, the epoch-end reduction. "Plain step" is `trainer.step.train_step` on one batch already
on the device, same model and optimizer: what the hardware can do with no input pipeline at all. Both
are measured in this run, taking turns over `--rounds` rounds after a warm-up; medians are reported,
and their ratio (the loop's target is >= 0.9). The loader alone is timed too, for context.

Shards are made once from `xdctools synth` videos (48 videos of 4 s) at the clip's short side, under
`--work` (reused while its dataset.json is there), unless `--shards` names a shard folder.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from trainer import labels, loop, session  # noqa: E402
from trainer.data import train_loader  # noqa: E402
from trainer.step import train_step  # noqa: E402
from xdctools.recipe import parse_recipe  # noqa: E402


def make_shards(work: Path, short_side: int) -> Path:
    from xdctools.shard.params import ShardParams
    from xdctools.shard.plan import build_plan
    from xdctools.shard.run import run_shard
    from xdctools.synth import SynthParams, synthesize

    out = work / f"shards-{short_side}"
    if not (out / "dataset.json").is_file():
        size = (160, 120) if short_side <= 120 else (round(short_side * 4 / 3 / 2) * 2, short_side)
        synthesize(work / f"videos-{short_side}", SynthParams(size=size), workers=2)
        run_shard(
            build_plan(work / f"videos-{short_side}"), ShardParams(short_side=short_side), out, workers=2
        )
    return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--width", type=float, default=None, help="default 0.125 (cpu) / 1 (cuda)")
    p.add_argument("--batch-size", type=int, default=None, help="default 8 (cpu) / 32 (cuda)")
    p.add_argument("--crop", type=int, default=None, help="default 112 (cpu) / 224 (cuda)")
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--steps", type=int, default=None, help="steps per round; default 8 (cpu) / 50 (cuda)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="DALI threads; default 2 (cpu) / 8 (cuda)")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default=None)
    p.add_argument("--shards", type=Path, default=None)
    p.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "xdctools-bench-train")
    args = p.parse_args()
    gpu = args.device == "cuda"
    if gpu and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device here")
    width = args.width or (1.0 if gpu else 0.125)
    batch = args.batch_size or (32 if gpu else 8)
    crop = args.crop or (224 if gpu else 112)
    short_side = 256 if crop > 128 else 128
    steps = args.steps or (50 if gpu else 8)
    threads = args.threads or (8 if gpu else 2)
    precision = args.precision or ("bf16" if gpu else "fp32")
    shards = args.shards or make_shards(args.work, short_side)

    recipe = parse_recipe(
        yaml.safe_dump(
            {
                "name": "bench",
                "method": "xdc",
                "data": {
                    "shards": str(shards),
                    "val_fraction": 0.05,
                    "device": "gpu" if gpu else "cpu",
                    "clip_frames": args.frames,
                    "crop": crop,
                    "short_side": short_side,
                    "num_threads": threads,
                },
                "model": {"width": width, "precision": precision, "channels_last": gpu},
                "clustering": {"k": 16, "iterations": 1},
                "optim": {
                    "epoch_size": steps * batch,
                    "batch_size": batch,
                    "lr": 0.01,
                    "step_epochs": 100,
                    "total_epochs": 100,
                },
                "run": {"out": str(args.work / "run"), "log_every": 10},
            }
        )
    )
    s = session.open_session(recipe, resume=False, progress=None)
    state = s.state
    rng = np.random.default_rng(0)
    state.labels = {v: rng.integers(0, 16, s.catalog.num_videos).astype(np.int32) for v in ("video", "audio")}
    loop.reset_heads(s, 0)
    loop.start_iteration(s, state, 0)
    tables = labels.label_tables(s, labels.route_labels(recipe.heads, state.labels))

    batch_data = next(
        iter(train_loader(s.shards, batch_size=batch, epoch_size=batch, clip=s.clip, run=s.runtime(1)))
    )
    batch_data = {k: v.to(s.device) if k in ("video", "audio") else v for k, v in batch_data.items()}
    targets = tables.batch(batch_data["index"], s.device)

    def plain() -> float:
        sync(s.device)
        t = time.perf_counter()
        for _ in range(steps):
            train_step(
                s.model, state.optimizer, state.scaler, batch_data, targets, device=s.device,
                precision=precision, channels_last=gpu,
            )  # fmt: skip
        sync(s.device)
        return steps * batch / (time.perf_counter() - t)

    def full() -> float:
        sync(s.device)
        t = time.perf_counter()
        loop.train_epoch(s, state, tables)
        sync(s.device)
        return steps * batch / (time.perf_counter() - t)

    def loader_only() -> float:
        t = time.perf_counter()
        n = 0
        run = s.runtime(state.epoch + 7)
        for b in train_loader(s.shards, batch_size=batch, epoch_size=steps * batch, clip=s.clip, run=run):
            n += len(b["index"])
        return n / (time.perf_counter() - t)

    full(), plain()  # warm-up: DALI start, allocator, cuDNN autotuning
    rounds = {"full": [], "plain": [], "loader": []}
    for _ in range(args.rounds):
        rounds["full"].append(full())
        rounds["plain"].append(plain())
        rounds["loader"].append(loader_only())
    med = {k: statistics.median(v) for k, v in rounds.items()}
    device_name = torch.cuda.get_device_name() if gpu else f"CPU, {torch.get_num_threads()} torch threads"
    result = {
        "device": device_name,
        "width": width,
        "clip": f"{args.frames}x{crop}x{crop}",
        "batch": batch,
        "precision": precision,
        "dali_threads": threads,
        "steps_per_round": steps,
        "rounds": {k: [round(x, 2) for x in v] for k, v in rounds.items()},
        "full_loop_clips_per_s": round(med["full"], 2),
        "plain_step_clips_per_s": round(med["plain"], 2),
        "loader_only_clips_per_s": round(med["loader"], 2),
        "ratio_full_over_plain": round(med["full"] / med["plain"], 3),
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
