"""Throughput of `run_shard` against the bare ffmpeg CLI doing the same transcode of the same files.

The bare baseline runs, per file, exactly the ffmpeg command the toolkit runs (same filters, encoder
settings, segment muxer and audio output, built by `media.build_command`; probing is done before the clock
starts), sequentially for 1 worker and as N parallel processes for N workers. The toolkit adds probing,
the log-mel, the sample members, tar writing and the process pool. Goal: toolkit/bare >= 0.85.

    .venv/bin/python benchmarks/shard.py                 # 12 synthetic 10 s clips, short side 256
    .venv/bin/python benchmarks/shard.py --media DIR     # the video files under DIR instead
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from xdctools.shard.jobs import Job
from xdctools.shard.media import build_command, output_fps, output_size, run_ffprobe, summarize
from xdctools.shard.params import ShardParams
from xdctools.shard.plan import VIDEO_SUFFIXES, build_plan
from xdctools.shard.run import run_shard

PATTERNS = ("testsrc2", "smptebars", "mandelbrot", "testsrc", "rgbtestsrc", "yuvtestsrc")


def make_clips(folder: Path, count: int, seconds: float, size: str) -> list[Path]:
    """Kinetics-like clips: H.264 + AAC in MP4, each with its own pattern and tone."""
    clips = []
    for i in range(count):
        path = folder / f"clip{i:03d}.mp4"
        pattern = PATTERNS[i % len(PATTERNS)]
        video = f"{pattern}=size={size}:rate=30"
        audio = f"sine=frequency={220 * (1 + i % 5)}:sample_rate=44100"
        args = ["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i", video, "-f", "lavfi", "-i", audio]
        args += [
            "-c:v",
            "libx264",
            "-preset",
            "veryfast",
            "-pix_fmt",
            "yuv420p",
            "-c:a",
            "aac",
            "-t",
            str(seconds),
        ]
        subprocess.run([*args, str(path)], check=True)
        clips.append(path)
    return clips


def bare_commands(paths: list[Path], params: ShardParams) -> list[list[str]]:
    """The toolkit's own ffmpeg argv for each file (probed here, outside the timing)."""
    commands = []
    for i, path in enumerate(paths):
        summary = summarize(run_ffprobe(path, params.timeout_s))
        video = summary["video"]
        fps = output_fps(summary, params)
        size = output_size(
            video["width"], video["height"], video["sar"], video["rotation"], params.short_side
        )
        job = Job("train", i, str(path), path.name)
        commands.append(build_command(str(path.resolve()), summary, job, params, fps, size))
    return commands


def run_bare(commands: list[list[str]], workers: int) -> float:
    """Seconds for `workers` ffmpeg processes at a time to run every command, each in its own folder."""

    def one(argv: list[str]) -> None:
        with tempfile.TemporaryDirectory(prefix="bench-bare-") as tmp:
            subprocess.run(argv, cwd=tmp, check=True, stdin=subprocess.DEVNULL, capture_output=True)

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(one, commands))
    return time.perf_counter() - start


def run_toolkit(folder: Path, params: ShardParams, workers: int) -> tuple[float, int]:
    plan = build_plan(folder, kind="folder")
    with tempfile.TemporaryDirectory(prefix="bench-shards-") as out:
        start = time.perf_counter()
        summary = run_shard(plan, params, out, shard_size=1000, workers=workers)
        seconds = time.perf_counter() - start
    return seconds, summary.ok


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--media", type=Path, help="Folder of video files (default: synthetic clips).")
    parser.add_argument("--clips", type=int, default=12, help="Synthetic clips to make.")
    parser.add_argument("--seconds", type=float, default=10.0, help="Length of each synthetic clip.")
    parser.add_argument("--size", default="480x360", help="Size of the synthetic clips.")
    parser.add_argument("--short-side", type=int, default=256)
    parser.add_argument("--workers", default="1,2", help="Worker counts to measure, e.g. 1,2,4.")
    parser.add_argument(
        "--repeat", type=int, default=1, help="Runs of each; the fastest counts (noisy hosts)."
    )
    args = parser.parse_args()
    params = ShardParams(short_side=args.short_side, audio_required=False)

    with tempfile.TemporaryDirectory(prefix="bench-media-") as tmp:
        folder = Path(tmp)
        if args.media is None:
            paths = make_clips(folder, args.clips, args.seconds, args.size)
        else:  # links in a flat folder, so the toolkit and the baseline see the same files
            sources = sorted(p for p in args.media.rglob("*") if p.suffix.lower() in VIDEO_SUFFIXES)
            paths = []
            for i, source in enumerate(sources):
                link = folder / f"{i:04d}_{source.name}"
                link.symlink_to(source.resolve())
                paths.append(link)
        commands = bare_commands(paths, params)
        print(f"{len(paths)} files, short side {args.short_side}, codec {params.codec}", flush=True)
        print(f"{'workers':>7} {'bare videos/s':>14} {'toolkit videos/s':>17} {'ratio':>6}  (toolkit ok)")
        for workers in (int(w) for w in args.workers.split(",")):
            bare = min(run_bare(commands, workers) for _ in range(args.repeat))
            toolkit, ok = min(run_toolkit(folder, params, workers) for _ in range(args.repeat))
            bare_rate, toolkit_rate = len(paths) / bare, len(paths) / toolkit
            print(
                f"{workers:>7} {bare_rate:>14.2f} {toolkit_rate:>17.2f} {toolkit_rate / bare_rate:>6.2f}"
                f"  ({ok}/{len(paths)})",
                flush=True,
            )


if __name__ == "__main__":
    sys.exit(main())
