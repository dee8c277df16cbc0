"""The work of shard, extract and train as picklable calls: one process, a Slurm array task or a rank.

The commands build a task from their options and call it here, or hand it to `xdctools.slurm`, which
runs the same call in each Slurm task and, after a preemption, `task.requeued()` (shard resumes from its
unit markers, extract from the chunks written, train from its newest checkpoint).
"""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from xdctools.errors import ConfigError, DependencyError

if TYPE_CHECKING:
    from trainer.outcome import RunResult
    from xdctools.recipe import Recipe
    from xdctools.shard.jobs import Plan
    from xdctools.shard.params import ShardParams
    from xdctools.shard.run import Summary


def require_ffmpeg() -> None:
    """ffmpeg and ffprobe on PATH, checked before any file: without them every file would fail."""
    missing = [name for name in ("ffmpeg", "ffprobe") if shutil.which(name) is None]
    if missing:
        raise DependencyError(
            f"{' and '.join(missing)}: not found on PATH; install ffmpeg (Debian: apt-get install ffmpeg)"
        )


# --- shard ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShardTask:
    """`xdctools shard` on one node's slice of the units: what `--node-rank R --num-nodes M` runs, in one
    process or in Slurm array task R of M. The plan is rebuilt from the inputs in each task."""

    root: Path
    output: Path
    inputs: dict[str, Any] = field(default_factory=dict)  # build_plan's keywords: kind, csv, splits, ...
    order: str = "shuffled"  # or name
    seed: int = 0
    params: dict[str, Any] = field(default_factory=dict)  # ShardParams' fields but audio_required
    audio: str | None = None  # required, optional, or None: the plan's default
    shard_size: int = 1000
    max_shard_bytes: int | None = None
    workers: int = 1
    retry_failed: bool = False

    def plan(self) -> Plan:
        from xdctools.shard.plan import build_plan, shuffle_plan

        plan = build_plan(self.root, **self.inputs)
        return shuffle_plan(plan, self.seed) if self.order == "shuffled" else plan

    def shard_params(self, plan: Plan) -> ShardParams:
        from xdctools.shard.params import ShardParams

        audio_required = plan.audio_required if self.audio is None else self.audio == "required"
        return ShardParams(**self.params, audio_required=audio_required)

    def units(self) -> int:
        """The plan's shard units (all nodes'), after checking the inputs and the parameters."""
        from xdctools.shard.run import make_units

        plan = self.plan()
        self.shard_params(plan)
        if self.shard_size < 1:
            raise ConfigError(f"--shard-size: must be at least 1 video, got {self.shard_size}")
        return len(make_units(plan, self.shard_size))

    def __call__(self, node_rank: int = 0, num_nodes: int = 1, progress: Any = None) -> Summary:
        from xdctools.shard.run import run_shard

        plan = self.plan()
        params = self.shard_params(plan)
        require_ffmpeg()
        return run_shard(
            plan,
            params,
            self.output,
            shard_size=self.shard_size,
            max_shard_bytes=self.max_shard_bytes,
            workers=self.workers,
            node_rank=node_rank,
            num_nodes=num_nodes,
            progress=progress,
            retry_failed=self.retry_failed,
        )

    def requeued(self) -> ShardTask:
        return self  # complete units are kept: the same call resumes


def merge_summaries(summaries: Sequence[Summary]) -> Summary:
    """The summaries of the nodes' slices as one run's: counts added, the plan's missing files once."""
    from xdctools.shard.run import Summary

    out = Summary()
    for s in summaries:
        out.ok += s.ok
        for reason, n in s.failed.items():
            out.failed[reason] = out.failed.get(reason, 0) + n
        out.videos += s.videos
        out.hours = round(out.hours + s.hours, 6)
        out.bytes += s.bytes
        out.units_written += s.units_written
        out.units_skipped += s.units_skipped
        out.units_retried += s.units_retried
        out.shards_written += s.shards_written
        out.shards_skipped += s.shards_skipped
        if s.complete:
            out.complete, out.errors_path, out.dataset_path = True, s.errors_path, s.dataset_path
    if summaries:
        out.missing, out.missing_first = summaries[0].missing, list(summaries[0].missing_first)
    return out


# --- extract -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Extracted:
    """What an extraction wrote: the store, its videos, the feature size per modality, the weights' kind."""

    path: Path
    videos: int
    dims: dict[str, int]
    source: str


@dataclass(frozen=True)
class ExtractTask:
    """`xdctools extract` on this process's rank (torchrun's, or a Slurm rank's): each rank reads its
    part of the segments; the store is the same whatever the number of ranks."""

    checkpoint: Path
    shards: Path
    out: Path
    set_name: str = "train"
    modalities: tuple[str, ...] | None = None
    batch_size: int = 32
    device: str = "cpu"
    precision: str = "fp32"
    clip_frames: int = 8
    stride: int = 1
    crop: int | None = None
    short_side: int | None = None
    bn_eps: float | None = None
    threads: int = 2
    overwrite: bool = False

    def check(self) -> None:
        """What can be checked before any rank starts: the shard set and the checkpoint file."""
        from trainer.data import find_shards
        from xdctools.errors import InputError

        if not self.checkpoint.is_file():
            raise InputError(f"{self.checkpoint}: checkpoint not found")
        find_shards(self.shards, self.set_name)

    def __call__(self, progress: Callable[..., None] | None = None) -> Extracted | None:
        """Rank 0 returns what was written (the others None); `progress` is called on rank 0 only."""
        from trainer import distributed
        from trainer.data import ClipSpec, Runtime, find_shards
        from trainer.extract import extract_features, load_encoders

        loaded = load_encoders(self.checkpoint, modalities=self.modalities, bn_eps=self.bn_eps)
        has_video = "video" in loaded.encoders
        shard_set = find_shards(self.shards, self.set_name, video=has_video)
        crop = (
            self.crop if self.crop is not None else min(224, self.short_side or shard_set.short_side or 224)
        )
        dist = distributed.init("cuda" if self.device == "gpu" else "cpu")
        if dist.device.type == "cpu" and self.device == "gpu":
            raise ConfigError("--device gpu: no CUDA device is available here")
        for encoder in loaded.encoders.values():
            encoder.to(dist.device)
        clip = ClipSpec(
            length=self.clip_frames,
            stride=self.stride,
            crop=crop,
            short_side=self.short_side,
            video=has_video,
        )
        run = Runtime(
            device=self.device,
            device_id=dist.local_rank,
            num_threads=self.threads,
            rank=dist.rank,
            world_size=dist.world_size,
        )
        attrs = {"iteration": loaded.iteration, "set": self.set_name}
        attrs |= {"source": str(self.checkpoint), "weights": loaded.source}
        store = extract_features(
            loaded.encoders,
            shard_set,
            self.out,
            batch_size=self.batch_size,
            clip=clip,
            run=run,
            device=dist.device,
            precision=self.precision,
            attrs=attrs,
            overwrite=self.overwrite,
            progress=progress if dist.is_main else None,
            stage=f"extract {self.set_name}",
        )
        done = Extracted(Path(store.path), store.n, dict(store.dims), loaded.source) if dist.is_main else None
        distributed.cleanup()
        return done

    def requeued(self) -> ExtractTask:
        return dataclasses.replace(self, overwrite=False)  # keep the chunks the first attempt wrote


# --- train ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainTask:
    """`xdctools train` on this process's rank: the deep-clustering loop of a resolved recipe."""

    recipe: Recipe
    resume: bool = True

    def __call__(self, progress: Callable[..., None] | None = None) -> RunResult:
        """What came out (every rank gets it); `progress` is called on rank 0 only."""
        from trainer import distributed
        from trainer.loop import run

        main = distributed.env_ranks()[0] == 0
        result = run(self.recipe, resume=self.resume, progress=progress if main else None)
        distributed.cleanup()
        return result

    def requeued(self) -> TrainTask:
        return dataclasses.replace(self, resume=True)  # from the newest checkpoint, even after --no-resume
