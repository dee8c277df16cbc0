"""Index arithmetic of the loaders: clip positions in segments, epoch sizes, rank ranges, per-video means.

Pure functions on integers and arrays, no I/O. The DALI graph in `trainer.data` computes the same
clip positions in-graph; the tests check the two agree.

Positions are in frames. A clip of `length` frames taken every `stride` frames covers `span =
length * stride` frames [start, start + span). Clip centres are compared in half-frames (2*start +
span) so that every comparison stays in integers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from xdctools.errors import ConfigError


def uniform_clip_starts(video_frames: int, num_clips: int, span: int) -> np.ndarray:
    """int64 (num_clips,): first frames of `num_clips` clips spread evenly over the whole video.

    The first clip starts at frame 0, the last ends at the video's last frame; starts are
    round-half-up of k * (video_frames - span) / (num_clips - 1). A video shorter than a clip gets
    every clip at 0 (the loader pads it); one clip sits in the middle.
    """
    if num_clips < 1 or span < 1:
        raise ValueError(f"num_clips ({num_clips}) and span ({span}) must be positive")
    free = max(video_frames - span, 0)
    if num_clips == 1:
        return np.array([free // 2], dtype=np.int64)
    k = np.arange(num_clips, dtype=np.int64)
    return (2 * k * free + (num_clips - 1)) // (2 * (num_clips - 1))


def clip_centres2(starts: np.ndarray, span: int, video_frames: int) -> np.ndarray:
    """Clip centres in half-frames, kept inside the video (a clip longer than the video: its last frame)."""
    return np.minimum(2 * np.asarray(starts, dtype=np.int64) + span, 2 * video_frames - 1)


def owned_range2(video_frames: int, start_frame: int, num_frames: int, span: int) -> tuple[int, int]:
    """[lo, hi) in half-frames: the clip centres a segment takes.

    A segment takes the clips centred inside it, except that a tail shorter than one clip (the last
    segment, or the last few) cannot hold a clip: its clips go to the segment before it, which decodes
    them shifted back to fit. So a tail segment takes nothing, and the segment before it takes up to
    the video's end.
    """
    end = start_frame + num_frames
    tail = start_frame > 0 and video_frames - start_frame < span
    lo = video_frames if tail else start_frame
    hi = video_frames if video_frames - end < span else end
    return 2 * lo, 2 * hi


def local_starts(starts: np.ndarray, start_frame: int, num_frames: int, span: int) -> np.ndarray:
    """Clip starts relative to a segment, shifted to fit inside it (at 0 when the segment is shorter)."""
    room = max(num_frames - span, 0)
    return np.clip(np.asarray(starts, dtype=np.int64) - start_frame, 0, room)


@dataclass(frozen=True)
class SegmentClips:
    """The clips of a video that one segment decodes: clip ids first..first+count-1."""

    first: int
    count: int
    starts: np.ndarray  # int64 (count,), first frame of each clip within the segment


def segment_clips(
    video_frames: int, start_frame: int, num_frames: int, num_clips: int, span: int
) -> SegmentClips:
    """Which of a video's `num_clips` evenly spaced clips fall in this segment, and where.

    Depends on this segment's own fields only (they are all in its info member), so each segment
    can be handled alone; over a video's segments every clip id appears exactly once.
    """
    starts = uniform_clip_starts(video_frames, num_clips, span)
    centres = clip_centres2(starts, span, video_frames)
    lo, hi = owned_range2(video_frames, start_frame, num_frames, span)
    first = int(np.count_nonzero(centres < lo))
    count = max(int(np.count_nonzero(centres < hi)) - first, 0)
    mine = starts[first : first + count]
    return SegmentClips(first, count, local_starts(mine, start_frame, num_frames, span))


def video_clips(
    video_frames: int, segments: Sequence[tuple[int, int]], num_clips: int, span: int
) -> list[SegmentClips]:
    """`segment_clips` for each (start_frame, num_frames) of one video, in segment order."""
    return [segment_clips(video_frames, s, n, num_clips, span) for s, n in segments]


def centre_clip_start(num_frames: int, span: int) -> int:
    """Start of the clip centred in a segment (extraction takes one per segment)."""
    return max(num_frames - span, 0) // 2


def round_half_even(num: int, den: int) -> int:
    """num / den rounded as Python's round() does (ties to even), in integers; den > 0."""
    q, r = divmod(num, den)
    return q + int(2 * r > den or (2 * r == den and q % 2 == 1))


def batches_per_epoch(epoch_size: int, batch_size: int, world_size: int) -> int:
    """Batches each rank yields per epoch: epoch_size // (batch_size * world_size), the same on every rank.

    `epoch_size` counts clips (the paper's "epoch size"), not videos or segments.
    """
    if batch_size < 1 or world_size < 1:
        raise ConfigError(f"batch size ({batch_size}) and world size ({world_size}) must be positive")
    steps = epoch_size // (batch_size * world_size)
    if steps < 1:
        raise ConfigError(
            f"epoch size {epoch_size} is smaller than one global batch ({batch_size} x {world_size} ranks)"
        )
    return steps


def rank_range(num_samples: int, rank: int, world_size: int) -> tuple[int, int]:
    """[start, stop) of the samples a rank reads, in the order of the listed shards (DALI's sharding rule)."""
    if not 0 <= rank < world_size:
        raise ConfigError(f"rank {rank} is not in [0, {world_size})")
    return num_samples * rank // world_size, num_samples * (rank + 1) // world_size


def mean_per_video(values: np.ndarray, video: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(videos, means): `values` (R, ...) averaged over rows sharing a video index, videos ascending.

    Serves both evaluation (clip predictions -> video prediction) and extraction (segment features
    -> video feature, which the clustering uses). Sums in float64; means keep a float input's dtype.
    """
    values = np.asarray(values)
    video = np.asarray(video).reshape(-1)
    if values.shape[0] != video.shape[0]:
        raise ValueError(f"{values.shape[0]} rows of values but {video.shape[0]} video indices")
    if video.size == 0:
        return np.zeros(0, dtype=np.int64), np.zeros((0, *values.shape[1:]), dtype=values.dtype)
    order = np.argsort(video, kind="stable")
    sorted_video = video[order]
    bounds = np.flatnonzero(np.r_[True, sorted_video[1:] != sorted_video[:-1]])
    sums = np.add.reduceat(values[order].astype(np.float64), bounds, axis=0)
    counts = np.diff(np.r_[bounds, len(video)]).reshape(-1, *([1] * (values.ndim - 1)))
    out_dtype = values.dtype if np.issubdtype(values.dtype, np.floating) else np.float64
    return sorted_video[bounds].astype(np.int64), (sums / counts).astype(out_dtype)
