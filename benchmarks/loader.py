"""Benchmark the DALI training loader against a PyAV + torch DataLoader baseline on the same shards.

    .venv/bin/python benchmarks/loader.py                  # CPU: short side 128, crop 112, 2 threads/workers
    .venv/bin/python benchmarks/loader.py --device cuda    # GPU: short side 256, crop 224, "mixed" decoding

Both loaders read the same shards (made once from the real Kinetics-layout clips in ../shared/data unless
`--shards` names a shard folder) and do the same work per clip: a random start in the segment, 8 frames,
(resize,) random crop, random flip, Kinetics normalisation, and the 40x100 mel window centred on the clip.
The baseline decodes each segment with PyAV from the start of the segment (as DALI's CPU decoder does)
in `--workers` DataLoader processes; DALI gets the same number of threads. Both are measured in this run,
taking turns over several rounds after a warm-up (the median is reported); `--skip-pyav` times DALI
alone. Then an R(2+1)D-18 training step (SGD, forward + backward) is timed on random input of the same
shape: the clips/s training consumes, which the loader should exceed (goal on CUDA: >= 2x the fastest
step, timed in fp32, bf16 autocast, and bf16 + channels-last as the Kinetics recipe trains).
`--json-out FILE` appends each figure as a JSON line as soon as it is measured (`make gpu-check`).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from trainer import data  # noqa: E402
from xdctools.shard import format as fmt  # noqa: E402
from xdctools.shard.read import parse_index  # noqa: E402

MEDIA = ROOT.parent / "shared" / "data" / "media" / "kinetics"


def make_shards(media: Path, out: Path, short_side: int) -> Path:
    """Shard `media` into `out` once (reused while dataset.json is there)."""
    from xdctools.shard.params import ShardParams
    from xdctools.shard.plan import build_plan
    from xdctools.shard.run import run_shard

    if not (out / "dataset.json").is_file():
        plan = build_plan(media)
        run_shard(plan, ShardParams(short_side=short_side), out, shard_size=2, workers=os.cpu_count() or 1)
    return out


# --- baseline: PyAV in a torch DataLoader ---------------------------------------------------


class PyAVClips(torch.utils.data.Dataset):
    """The training loader's work, one sample at a time, in plain Python: PyAV decode + torch ops."""

    def __init__(self, shards: data.ShardSet, clip: data.ClipSpec) -> None:
        self.clip = clip
        self.items: list[tuple[Path, dict[str, tuple[int, int]]]] = []
        for tar, idx in zip(shards.tars, shards.indexes, strict=True):
            self.items += [(tar, members) for _, members in parse_index(idx.read_text())]
        self.mean = torch.tensor(clip.mean).view(3, 1, 1, 1)
        self.std = torch.tensor(clip.std).view(3, 1, 1, 1)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        import av

        tar, members = self.items[i]
        with tar.open("rb") as f:
            raw = {}
            for ext in (fmt.INFO_EXT, fmt.MEL_EXT, "webm"):
                offset, size = members[ext]
                f.seek(offset)
                raw[ext] = f.read(size)
        info = fmt.decode_info(raw[fmt.INFO_EXT])
        clip, span = self.clip, self.clip.span
        room = max(info["num_frames"] - span, 0)
        start = int(torch.randint(0, room + 1, ()))
        wanted = [start + t * clip.stride for t in range(clip.length)]
        frames = {}
        with av.open(io.BytesIO(raw["webm"])) as container:
            for n, frame in enumerate(container.decode(video=0)):
                if n in wanted:
                    frames[n] = frame.to_ndarray(format="rgb24")
                if n >= wanted[-1]:
                    break
        last = frames[max(frames)]
        video = torch.from_numpy(np.stack([frames.get(n, last) for n in wanted]))  # (L, H, W, 3), edge pad
        video = video.permute(3, 0, 1, 2).float().div_(255.0)  # (3, L, H, W)
        if clip.short_side is not None:
            h, w = video.shape[-2:]
            scale = clip.short_side / min(h, w)
            size = (round(h * scale), round(w * scale))
            video = torch.nn.functional.interpolate(video, size=size, mode="bilinear", antialias=True)
        h, w = video.shape[-2:]
        y = int(torch.randint(0, h - clip.crop + 1, ()))
        x = int(torch.randint(0, w - clip.crop + 1, ()))
        video = video[..., y : y + clip.crop, x : x + clip.crop]
        if torch.rand(()) < 0.5:
            video = video.flip(-1)
        video = (video - self.mean) / self.std

        mel = np.load(io.BytesIO(raw[fmt.MEL_EXT]))
        col = fmt.clip_mel_start(
            start,
            span,
            Fraction(info["fps_num"], info["fps_den"]),
            segment_start=info["start_frame"],
            video_frames=info["video_frames"],
            mel_frames=info["mel_frames"],
        )
        window = np.full((fmt.N_MELS, fmt.WINDOW_FRAMES), fmt.TOP_DB_FLOOR, dtype=np.float32)
        part = mel[:, col : col + fmt.WINDOW_FRAMES]
        window[:, : part.shape[1]] = part
        audio = torch.from_numpy((window - clip.mel_mean) / clip.mel_std).unsqueeze(0)
        return {"video": video.contiguous(), "audio": audio, "index": torch.tensor(info["video"])}


# --- measurements ---------------------------------------------------------------------------


def emit(path: Path | None, name: str, value: object, unit: str = "", **extra: object) -> None:
    """One figure as a JSON line, appended at once (a run cut off keeps what it measured)."""
    if path is not None:
        with path.open("a", encoding="utf-8") as f:
            f.write(json.dumps({"name": name, "value": value, "unit": unit, **extra}) + "\n")


def timed_rounds(loaders: dict, batch_size: int, warmup: int, count: int, rounds: int, device: str) -> dict:
    """Median clips/s of each loader over `rounds` rounds of `count` batches, the loaders taking turns.

    Taking turns spreads changes in the machine's load (other processes) over both loaders alike.
    """
    its = {name: iter(loader) for name, loader in loaders.items()}
    for it in its.values():
        for _ in range(warmup):
            next(it)
    rates: dict[str, list[float]] = {name: [] for name in loaders}
    for _ in range(rounds):
        for name, it in its.items():
            t = time.perf_counter()
            for _ in range(count):
                next(it)["video"].to(device, non_blocking=True)
            if device == "cuda":
                torch.cuda.synchronize()
            rates[name].append(count * batch_size / (time.perf_counter() - t))
    return {name: float(np.median(r)) for name, r in rates.items()}


def training_step_rate(
    clip: data.ClipSpec, batch_size: int, device: str, steps: int, bf16: bool, channels_last: bool = False
) -> float | None:
    """Clips/s of R(2+1)D-18 forward + backward + SGD step on random input, or None without the model."""
    try:
        from trainer.models import autocast, prepare_for_speed, r2plus1d_18
    except ImportError:
        print("note: trainer.models.r2plus1d_18 not found; training-step rate skipped")
        return None
    torch.manual_seed(0)
    model = prepare_for_speed(r2plus1d_18(num_classes=400).to(device), channels_last=channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(batch_size, 3, clip.length, clip.crop, clip.crop, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last_3d)
    y = torch.randint(0, 400, (batch_size,), device=device)

    def step() -> None:
        with autocast(device, "bf16" if bf16 else "fp32"):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()
    if device == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    return steps * batch_size / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument(
        "--shards", type=Path, help="a shard folder (dataset.json inside); default: made from --media"
    )
    ap.add_argument("--set", default="train")
    ap.add_argument("--media", type=Path, default=MEDIA)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/xdc-bench-loader"))
    ap.add_argument("--batch", type=int, help="default 8 on CPU, 32 on CUDA")
    ap.add_argument(
        "--workers", type=int, help="DALI threads = DataLoader workers; default 2 on CPU, 8 on CUDA"
    )
    ap.add_argument("--batches", type=int, help="timed batches per round; default 6 on CPU, 20 on CUDA")
    ap.add_argument(
        "--rounds", type=int, default=5, help="rounds per loader, taking turns; the median is kept"
    )
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument(
        "--train-steps", type=int, help="timed training steps; default 1 (batch 4) on CPU, 20 on CUDA"
    )
    ap.add_argument("--skip-pyav", action="store_true", help="time the DALI loader alone (no baseline)")
    ap.add_argument("--json-out", type=Path, help="append each figure to this JSON-lines file")
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device here")

    cuda = args.device == "cuda"
    short_side, crop = (256, 224) if cuda else (128, 112)
    batch = args.batch or (32 if cuda else 8)
    workers = args.workers or (min(8, os.cpu_count() or 1) if cuda else 2)
    count = args.batches or (20 if cuda else 6)
    steps = args.train_steps or (20 if cuda else 1)
    root = args.shards or make_shards(args.media, args.workdir / f"short{short_side}", short_side)
    shards = data.find_shards(root, args.set)
    clip = data.ClipSpec(crop=crop)
    total = (args.warmup + count * args.rounds) * batch

    run = data.Runtime(device="gpu" if cuda else "cpu", num_threads=workers, prefetch_queue_depth=2, seed=0)
    dali = data.train_loader(shards, batch_size=batch, epoch_size=total, clip=clip, run=run)
    loaders = {"dali": dali}
    if not args.skip_pyav:
        dataset = PyAVClips(shards, clip)
        loaders["pyav"] = torch.utils.data.DataLoader(
            dataset,
            batch_size=batch,
            sampler=torch.utils.data.RandomSampler(dataset, replacement=True, num_samples=total),
            num_workers=workers,
            pin_memory=cuda,
            drop_last=True,
            prefetch_factor=2,
        )
    rates = timed_rounds(loaders, batch, args.warmup, count, args.rounds, args.device)
    dali_rate, base_rate = rates["dali"], rates.get("pyav")
    where = f"{'mixed' if cuda else 'cpu'}, {workers} threads, batch {batch}, {clip.length}x{crop}x{crop}"
    emit(args.json_out, "DALI loader", round(dali_rate, 1), "clips/s", decoding=where, segments=len(shards))
    if base_rate is not None:
        emit(args.json_out, "PyAV + DataLoader", round(base_rate, 1), "clips/s", workers=workers)

    step_batch = batch if cuda else min(batch, 4)
    steps_rates = {"fp32": training_step_rate(clip, step_batch, args.device, steps, bf16=False)}
    if cuda:
        steps_rates["bf16"] = training_step_rate(clip, step_batch, args.device, steps, bf16=True)
        steps_rates["bf16+channels-last"] = training_step_rate(
            clip, step_batch, args.device, steps, bf16=True, channels_last=True
        )
    for name, rate in steps_rates.items():
        if rate is not None:
            emit(args.json_out, f"R(2+1)D-18 step {name}", round(rate, 1), "clips/s", batch=step_batch)
    result = {
        "device": torch.cuda.get_device_name() if cuda else f"cpu ({os.cpu_count()} cores)",
        "shards": str(root),
        "segments": len(shards),
        "clip": f"{clip.length}x{crop}x{crop} from short side {short_side}",
        "batch": batch,
        "workers": workers,
        "dali_clips_per_s": round(dali_rate, 1),
        "pyav_dataloader_clips_per_s": None if base_rate is None else round(base_rate, 1),
        "ratio_dali_over_pyav": None if base_rate is None else round(dali_rate / base_rate, 2),
        "rounds": args.rounds,
        "train_step_batch": step_batch,
        **{
            f"r2plus1d18_train_step_clips_per_s_{name}": None if rate is None else round(rate, 1)
            for name, rate in steps_rates.items()
        },
    }
    measured = {name: rate for name, rate in steps_rates.items() if rate is not None}
    if measured:
        fastest = max(measured, key=measured.get)
        result["dali_over_training"] = round(dali_rate / measured[fastest], 2)
        emit(
            args.json_out, "DALI loader / fastest training step", result["dali_over_training"], "x",
            goal=">= 2", met=result["dali_over_training"] >= 2, step=fastest,
        )  # fmt: skip
    width = max(map(len, result))
    for key, value in result.items():
        print(f"{key:<{width}}  {value}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
