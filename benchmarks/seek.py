"""Does DALI's video decoder seek? Clips of 8 frames from frame 0 vs frame 280 of one long segment.

    .venv/bin/python benchmarks/seek.py --shards SHARDS [SHARDS ...]                 # CPU decoder (VP9)
    .venv/bin/python benchmarks/seek.py --device cuda --shards VP9_SHARDS H264_SHARDS  # GPU ("mixed")

SHARDS are shard folders whose segments hold >= 288 frames (`xdctools shard --segment-frames 320` of
videos of 10 s or more; `scripts/gpu_check.py --build-shards` makes long-vp9 and long-h264). Each start
is its own pipeline decoding batches of `--batch` clips (the segments, repeated) with the frame list the
training loader passes (`fn.decoders.video(frames=...)`); a random start over the segment is timed too.
Ratio start 280 / start 0: about 1 means the decoder seeks to the keyframe before the clip; far below 1
means it decodes every frame from the segment's start (docs: ../shared/reference/notes.md measured the
CPU decoder at 180 vs 12 clips/s, a ratio of 0.07), which is why the shards store 64-frame segments.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from trainer.data import VIDEO_EXTS, find_shards  # noqa: E402
from xdctools.shard import format as fmt  # noqa: E402
from xdctools.shard.read import parse_index  # noqa: E402

LENGTH = 8


def emit(path: Path | None, name: str, value: float | str, unit: str = "", **extra: object) -> None:
    """One figure as a JSON line, appended at once (a run cut off keeps what it measured)."""
    if path is not None:
        with path.open("a", encoding="utf-8") as f:
            f.write(json.dumps({"name": name, "value": value, "unit": unit, **extra}) + "\n")


def long_segments(root: Path, need: int) -> tuple[str, list[tuple[bytes, int]]]:
    """(video extension, [(encoded segment, frames)]) of the segments with at least `need` frames."""
    shards = find_shards(root, "train")
    out = []
    for tar, idx in zip(shards.tars, shards.indexes, strict=True):
        raw = tar.read_bytes()
        for _, members in parse_index(idx.read_text()):
            ext = next(e for e in VIDEO_EXTS if e in members)
            at, size = members[fmt.INFO_EXT]
            frames = fmt.decode_info(raw[at : at + size])["num_frames"]
            if frames >= need:
                offset, size = members[ext]
                out.append((raw[offset : offset + size], frames))
    return shards.video_ext or "?", out


def clips_per_s(
    segments: list[tuple[bytes, int]], start: int | None, args: argparse.Namespace, device: str
) -> float:
    """Clips/s decoding `args.batch` clips per batch at frame `start` (None: uniform random start)."""
    from nvidia.dali import fn, types
    from nvidia.dali.pipeline import Pipeline

    batch = [np.frombuffer(segments[i % len(segments)][0], dtype=np.uint8) for i in range(args.batch)]
    lengths = [segments[i % len(segments)][1] for i in range(args.batch)]
    rng = np.random.default_rng(0)

    def frame_lists() -> list[np.ndarray]:
        firsts = [start if start is not None else int(rng.integers(0, n - LENGTH + 1)) for n in lengths]
        return [np.arange(s, s + LENGTH, dtype=np.int32) for s in firsts]

    gpu = device == "mixed"
    pipe = Pipeline(batch_size=args.batch, num_threads=args.threads, device_id=0 if gpu else None, seed=0)
    with pipe:
        encoded = fn.external_source(source=lambda: batch, batch=True, dtype=types.UINT8, ndim=1)
        frames = fn.external_source(source=frame_lists, batch=True, dtype=types.INT32, ndim=1)
        pipe.set_outputs(fn.decoders.video(encoded, device=device, frames=frames, pad_mode="edge"))
    pipe.build()
    for _ in range(args.warmup):
        pipe.run()
    t = time.perf_counter()
    for _ in range(args.batches):
        (out,) = pipe.run()
        if gpu:
            out.as_cpu()  # waits for the decode
    return args.batches * args.batch / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--shards", type=Path, nargs="+", required=True, help="shard folders of long segments")
    ap.add_argument("--far", type=int, default=280, help="the far start frame (default 280)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--batches", type=int, default=10, help="timed batches per start")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=min(4, os.cpu_count() or 1))
    ap.add_argument("--json-out", type=Path, help="append each figure to this JSON-lines file")
    args = ap.parse_args()
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            sys.exit("--device cuda: no CUDA device here")
    device = "mixed" if args.device == "cuda" else "cpu"
    print(
        f"fn.decoders.video on {device}: {args.batch} clips x {LENGTH} frames a batch, {args.threads} threads"
    )
    for root in args.shards:
        ext, segments = long_segments(root, args.far + LENGTH)
        codec = {"webm": "vp9", "mp4": "h264"}.get(ext, ext)
        if not segments:
            print(f"{root}: no segment of {args.far + LENGTH}+ frames")
            emit(args.json_out, f"{codec} seek", "no long segment", note=str(root))
            continue
        if codec == "h264" and device == "cpu":
            print(f"{root}: DALI's CPU decoder has no H.264; run with --device cuda")
            continue
        rates = {}
        for label, start in (("start 0", 0), (f"start {args.far}", args.far), ("random start", None)):
            rates[label] = clips_per_s(segments, start, args, device)
            print(f"{codec:5s} {label:12s} {rates[label]:8.1f} clips/s", flush=True)
            emit(args.json_out, f"{codec} {device} {label}", round(rates[label], 1), "clips/s")
        ratio = rates[f"start {args.far}"] / rates["start 0"]
        verdict = "seeks" if ratio > 0.5 else "decodes from the segment start (no seek)"
        print(f"{codec:5s} ratio start {args.far} / start 0: {ratio:.2f}: {verdict}")
        emit(args.json_out, f"{codec} {device} ratio start {args.far} / start 0", round(ratio, 2),
             note=verdict, segments=len(segments))  # fmt: skip


if __name__ == "__main__":
    main()
