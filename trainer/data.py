"""DALI loaders from the shards: training, evaluation and extraction, one pipeline definition on CPU or GPU.

`build_pipeline` is the only graph. Every sample is a video segment (see `xdctools.shard.format`):
its `info.npy` gives the numbers the graph needs, so clip positions are computed in-graph from them
(the arithmetic mirrors `trainer.sampling`, which the tests compare against), the clip's frames are
decoded by `fn.decoders.video` with a per-sample frame list (DALI's CPU decoder cannot seek, so a
clip costs the frames before it in its segment, at most `segment_frames`), and the audio window of
WINDOW_FRAMES mel frames centred on the clip (shifted inside the video near its ends:
`format.clip_mel_start`) is cut from the segment's stored mel with `fn.slice`.

Modes (what a sample yields):
  train    one clip at a random start, random crop, random flip, optional spectrogram masking
  eval     the video's `num_clips` evenly spaced clips that fall in this segment (0..several), centre crop
  extract  the clip centred in the segment, centre crop; every segment exactly once, in shard order

`device="gpu"` decodes on the GPU (`mixed`) and resizes/crops/normalises there; `device="cpu"`
runs the same graph on the CPU (VP9 only: DALI's CPU decoder has no H.264).

Batches are dicts of torch tensors:
  video    float32 (B, 3, L, H, W), RGB normalised with KINETICS_MEAN/STD   (absent when video=False)
  audio    float32 (B, 1, N_MELS, WINDOW_FRAMES): log-mel dB standardised with MEL_MEAN/MEL_STD
  index    int64 (B,): the source video's index in its shard set (the trainer maps it to a pseudo-label)
  segment  int64 (B,): the segment within the video (train, extract)
  clip     int64 (B,): the clip id within the video, 0..num_clips-1 (eval)
  frame    int64 (B,): the clip's first frame in the whole video
  label    int64 (B,): the true class, -1 when unknown
`video` and `audio` live on the GPU with device="gpu"; the integer columns stay on the CPU.
"""

from __future__ import annotations

import io
import math
import os
import re
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from trainer import sampling
from xdctools.errors import ConfigError, DataError
from xdctools.shard import format as fmt
from xdctools.shard.read import DATASET_FILE, read_dataset_json, read_index, read_member, tar_index

Mode = Literal["train", "eval", "extract"]
Device = Literal["cpu", "gpu"]

# RGB mean/std in [0, 1] of Kinetics-400, as torchvision's video models (R(2+1)D-18) were trained with.
KINETICS_MEAN = (0.43216, 0.394666, 0.37645)
KINETICS_STD = (0.22803, 0.22145, 0.216989)
# Log-mel standardisation (dB), measured on the shards of the 4 real Kinetics clips with sound in
# ../shared/data (mean -30.7 dB, std 17.9 dB); digital silence (TOP_DB_FLOOR) maps to -3.9.
MEL_MEAN = -30.0
MEL_STD = 18.0
# Light SpecAugment: one band of up to this many mel bins and one span of up to this many mel frames,
# set to the mean (0 after standardisation).
SPEC_FREQ_MASK = 6
SPEC_TIME_MASK = 16

VIDEO_EXTS = tuple(fmt.VIDEO_EXTS.values())  # ("webm", "mp4")
READER = "reader"


# --- shards: listing and up-front validation (reads the .idx files, never the media) ----------


@dataclass(frozen=True)
class ShardSet:
    """Tars of one shard set, checked against their indexes; samples in DALI's reading order."""

    tars: tuple[Path, ...]
    indexes: tuple[Path, ...]
    keys: tuple[str, ...]  # every sample's key, tar after tar, in stored order
    sizes: tuple[int, ...]  # samples per tar
    video_ext: str | None  # "webm", "mp4", or None for an audio-only set
    short_side: int | None = None  # stored frame size, from dataset.json when present
    name_ordered: bool = False  # dataset.json says the videos were written in name (= class) order
    classes: tuple[str, ...] | None = None  # class names of dataset.json, when it lists them

    def __len__(self) -> int:
        return len(self.keys)

    def rank_keys(self, rank: int, world_size: int) -> tuple[str, ...]:
        """Keys a rank reads in extraction and evaluation, in order."""
        start, stop = sampling.rank_range(len(self.keys), rank, world_size)
        return self.keys[start:stop]


def check_shards(
    tars: Sequence[str | os.PathLike], *, video: bool = True, short_side: int | None = None
) -> ShardSet:
    """Validate tars from their `.idx` files: present, readable, a tar, long enough, every member there.

    Needs `info.npy` and `mel.npy` in every sample, plus the video member when `video` is true.
    Raises DataError naming the shard (and the key) at the first problem. Reads a few bytes per tar.
    """
    if not tars:
        raise DataError("no shards given")
    paths = tuple(Path(t) for t in tars)
    keys: list[str] = []
    sizes: list[int] = []
    indexes: list[Path] = []
    video_exts: set[str] = set()
    for tar in paths:
        idx = tar.with_suffix(".idx")
        if not tar.is_file():
            raise DataError(f"{tar}: shard missing")
        if not idx.is_file():
            raise DataError(f"{idx}: index of shard {tar.name} missing (DALI needs it)")
        samples = read_index(idx)
        if not samples:
            raise DataError(f"{tar}: shard holds no samples")
        end = 0
        for key, members in samples:
            for ext in (fmt.INFO_EXT, fmt.MEL_EXT):
                if ext not in members:
                    raise DataError(f"{tar}: sample {key} lacks its {ext} member")
            vids = [ext for ext in VIDEO_EXTS if ext in members]
            if video and not vids:
                raise DataError(f"{tar}: sample {key} lacks its video member ({' or '.join(VIDEO_EXTS)})")
            video_exts.update(vids)
            end = max(end, *(offset + size for offset, size in members.values()))
        _check_tar(tar, end, samples[0][1])
        keys.extend(key for key, _ in samples)
        sizes.append(len(samples))
        indexes.append(idx)
    if len(video_exts) > 1:
        raise DataError(f"{paths[0].parent}: shards mix video formats {sorted(video_exts)}")
    video_ext = video_exts.pop() if video and video_exts else None
    return ShardSet(paths, tuple(indexes), tuple(keys), tuple(sizes), video_ext, short_side)


def _check_tar(tar: Path, end: int, first: dict[str, tuple[int, int]]) -> None:
    """The file opens, is at least as long as its index needs, and a tar header precedes the first member."""
    try:
        size = tar.stat().st_size
        with tar.open("rb") as f:
            f.seek(min(offset for offset, _ in first.values()) - 512)
            header = f.read(512)
    except OSError as e:
        raise DataError(f"{tar}: unreadable shard ({e.strerror or e})") from e
    if size < end:
        raise DataError(f"{tar}: truncated shard ({size} bytes, its index needs {end})")
    if header[257:262] != b"ustar":
        raise DataError(f"{tar}: not a tar archive where its index points")


def find_shards(root: str | os.PathLike, set_name: str, *, video: bool = True) -> ShardSet:
    """The checked tars of one set of `xdctools shard` output.

    With `<root>/dataset.json` (a finished run) its list of shards is authoritative, so a deleted
    shard is an error, not a smaller dataset; without it, `<root>/<set>/<set>-*.tar` sorted by name.
    """
    root = Path(root)
    doc = read_dataset_json(root)
    if doc is None:
        tars = sorted((root / set_name).glob(f"{set_name}-*.tar"))
        if not tars:
            raise DataError(f"{root / set_name}: no shards of set {set_name!r} found")
        return check_shards(tars, video=video)
    meta = root / DATASET_FILE
    try:
        sets = doc["sets"]
        short_side = doc["parameters"]["shard"]["short_side"]
        name_ordered = doc["parameters"].get("shuffle_seed") is None  # absent: written before shuffling
    except (KeyError, TypeError, AttributeError) as e:
        raise DataError(f"{meta}: unreadable ({type(e).__name__}: {e})") from e
    classes = doc.get("classes")
    if set_name not in sets:
        raise DataError(f"{meta}: no set {set_name!r} (sets: {', '.join(sorted(sets)) or 'none'})")
    listed = sets[set_name].get("shards", [])
    if not listed:
        raise DataError(f"{meta}: set {set_name!r} has no shards")
    shards = check_shards([root / s["tar"] for s in listed], video=video, short_side=short_side)
    for entry, size in zip(listed, shards.sizes, strict=True):
        if entry.get("samples", size) != size:
            raise DataError(
                f"{root / entry['tar']}: index holds {size} samples, {meta.name} says {entry['samples']}"
            )
    return replace(shards, name_ordered=name_ordered, classes=None if classes is None else tuple(classes))


def warn_if_name_ordered(shards: ShardSet) -> None:
    """Training on name-ordered shards runs, but DALI's 1,024-sample shuffle buffer then fills each
    batch from a few neighbouring classes (see `xdctools.shard.plan.shuffle_plan`): say so once."""
    if shards.name_ordered:
        warnings.warn(
            f"{shards.tars[0].parent}: videos are stored in name (class) order, so training batches "
            "mix few classes; reshard with `xdctools shard` (shuffled order by default)",
            stacklevel=2,
        )


# --- configuration ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ClipSpec:
    """What a clip is: `length` frames every `stride` frames, `crop` square pixels.

    `short_side` resizes decoded frames so their short side is that many pixels (the CPU recipes:
    128, crop 112); None keeps the stored size (the paper: 256, crop 224). `video=False` reads audio
    only (audio-only sets, or an audio encoder alone).
    """

    length: int = 8
    stride: int = 1
    crop: int = 224
    short_side: int | None = None
    video: bool = True
    mean: tuple[float, float, float] = KINETICS_MEAN
    std: tuple[float, float, float] = KINETICS_STD
    mel_mean: float = MEL_MEAN
    mel_std: float = MEL_STD

    @property
    def span(self) -> int:
        return self.length * self.stride

    def check(self) -> None:
        for name in ("length", "stride", "crop"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"clip {name}: {value!r} must be a positive integer")
        if self.short_side is not None and self.short_side < self.crop:
            raise ConfigError(
                f"clip crop {self.crop} is larger than the resized short side {self.short_side}"
            )
        if self.mel_std <= 0 or min(self.std) <= 0:
            raise ConfigError("clip std and mel_std must be positive")


@dataclass(frozen=True)
class Runtime:
    """Where and how a pipeline runs. Each rank reads its part of the samples (DALI's sharding)."""

    device: Device = "cpu"
    device_id: int = 0  # GPU of this rank; ignored on CPU
    num_threads: int = 2
    prefetch_queue_depth: int = 2
    seed: int = 0
    rank: int = 0
    world_size: int = 1

    def check(self) -> None:
        if self.device not in ("cpu", "gpu"):
            raise ConfigError(f"device: {self.device!r} is not 'cpu' or 'gpu'")
        if self.num_threads < 1 or self.prefetch_queue_depth < 1:
            raise ConfigError("num_threads and prefetch_queue_depth must be at least 1")
        sampling.rank_range(0, self.rank, self.world_size)  # raises on a bad rank


# --- the pipeline ----------------------------------------------------------------------------


def _checked_clips(
    shards: ShardSet, mode: Mode, batch_size: int, clip: ClipSpec, run: Runtime, num_clips: int
) -> int:
    """Clips per sample of `mode`, after refusing what DALI would fail on later with a less clear error."""
    clip.check()
    run.check()
    if mode not in ("train", "eval", "extract"):
        raise ConfigError(f"loader mode {mode!r} is not train, eval or extract")
    if batch_size < 1:
        raise ConfigError(f"batch size {batch_size} must be positive")
    if clip.video and run.device == "cpu" and shards.video_ext == fmt.VIDEO_EXTS["h264"]:
        raise ConfigError(f"{shards.tars[0]}: H.264 shards need device 'gpu' (DALI decodes VP9 on the CPU)")
    if clip.video and clip.short_side is None and shards.short_side and clip.crop > shards.short_side:
        raise ConfigError(f"clip crop {clip.crop} is larger than the stored short side {shards.short_side}")
    clips = num_clips if mode == "eval" else 1
    if clips < 1:
        raise ConfigError(f"num_clips {num_clips} must be positive")
    if run.device == "gpu" and not torch.cuda.is_available():
        raise ConfigError("device 'gpu': no CUDA device is available here (use device 'cpu')")
    return clips


def _webdataset_members(shards: ShardSet, clip: ClipSpec, run: Runtime, train: bool):
    """DALI's webdataset reader of this rank's samples: (info, mel[, video]) members, shuffled to train."""
    from nvidia.dali import fn

    per_rank = len(shards.rank_keys(run.rank, run.world_size))
    exts = [fmt.INFO_EXT, fmt.MEL_EXT] + ([";".join(VIDEO_EXTS)] if clip.video else [])
    return fn.readers.webdataset(
        paths=[str(p) for p in shards.tars],
        index_paths=[str(p) for p in shards.indexes],
        ext=exts,
        missing_component_behavior="error",
        shard_id=run.rank,
        num_shards=run.world_size,
        random_shuffle=train,  # a buffer of initial_fill samples (shuffle_after_epoch: a no-op here)
        initial_fill=max(1, min(1024, per_rank)),
        stick_to_shard=not train,
        pad_last_batch=not train,
        seed=run.seed + 7919 * run.rank,
        name=READER,
    )


def build_pipeline(
    shards: ShardSet,
    mode: Mode,
    *,
    batch_size: int,
    clip: ClipSpec = ClipSpec(),
    run: Runtime = Runtime(),
    num_clips: int = 10,
    spec_augment: bool = False,
    flip: bool = True,
):
    """The DALI pipeline of `mode` (see the module docstring); outputs are named by `output_names`."""
    from nvidia.dali import fn
    from nvidia.dali.pipeline import Pipeline

    clips = _checked_clips(shards, mode, batch_size, clip, run, num_clips)
    train = mode == "train"
    pipe = Pipeline(
        batch_size=batch_size,
        num_threads=run.num_threads,
        device_id=run.device_id if run.device == "gpu" else None,
        seed=run.seed + 7919 * run.rank,
        prefetch_queue_depth=run.prefetch_queue_depth,
    )
    with pipe:
        members = _webdataset_members(shards, clip, run, train)
        info = fn.decoders.numpy(members[0])
        mel = fn.decoders.numpy(members[1])
        fields = _sample_fields(info)
        starts, ids = _clip_starts(fields, mode, clip.span, clips)
        mel_starts = _mel_starts(fields, starts, clip.span)
        audio = _audio_windows(mel, mel_starts, clips, clip, spec_augment and train)
        outputs = {
            "audio": audio,
            "index": info[fmt.INFO["video"]],
            "segment": info[fmt.INFO["segment"]],
            "label": info[fmt.INFO["label"]],
            "frame": starts + info[fmt.INFO["start_frame"]],
        }
        if mode == "eval":
            outputs["clip"] = fn.pad(ids, axes=(0,), fill_value=-1)
            outputs["frame"] = fn.pad(outputs["frame"], axes=(0,), fill_value=-1)
            outputs["audio"] = fn.pad(audio, axes=(0,), fill_value=0.0)
        if clip.video:
            video = _video_clips(members[2], starts, ids, clip, run, mode, flip=flip)
            outputs["video"] = fn.pad(video, axes=(1,), fill_value=0.0) if mode == "eval" else video
        if run.device == "gpu":
            outputs["audio"] = outputs["audio"].gpu()
        pipe.set_outputs(*outputs.values())
    pipe.output_names = list(outputs)
    return pipe


def _i32(node):
    from nvidia.dali import fn, types

    return fn.cast(node, dtype=types.INT32)


def _vector(node):
    """A per-sample scalar as a 1-element vector (slice anchors and shapes are vectors)."""
    from nvidia.dali import fn

    return fn.reshape(node, shape=[1])


def _sample_fields(info) -> dict:
    """The info fields as DataNodes; an audio-only sample (fps 0, no frames) is timed in mel frames.

    Audio-only samples store fps 0/1 and no frames (`format.audio_only_mel`: column MEL_PAD_FRAMES
    is time 0). Counting their mel frames as frames at MEL_FPS makes every clip computation below
    apply unchanged: a clip of `span` frames is then `span` mel frames, centred as for video.
    """
    from nvidia.dali import fn, types
    from nvidia.dali import math as dmath

    fields = {name: info[i] for name, i in fmt.INFO.items()}
    audio_only = fn.cast(fields["fps_num"] == 0, dtype=types.INT64)
    frames = dmath.max(fields["mel_frames"] - 2 * fmt.MEL_PAD_FRAMES, 0) * audio_only
    fields["num_frames"] = fields["num_frames"] + frames
    fields["video_frames"] = fields["video_frames"] + frames
    fields["fps_num"] = fields["fps_num"] + audio_only * fmt.MEL_FPS
    fields["fps_den"] = fields["fps_den"] + audio_only * (1 - fields["fps_den"])
    return fields


def _clip_starts(fields: dict, mode: Mode, span: int, num_clips: int):
    """(starts, ids): int64 (M,) clip starts within the segment and their clip ids (-1: none).

    train: M=1, uniform over the segment; extract: M=1, centred; eval: the clips of the video's
    `num_clips` evenly spaced ones that this segment takes, as `sampling.segment_clips` computes them.
    A segment that takes none yields M=1 with id -1 and start 0, and decodes one frame.
    """
    from nvidia.dali import fn, types
    from nvidia.dali import math as dmath

    def field_(name: str):
        return fields[name]

    n = field_("num_frames")
    room = dmath.max(n - span, 0)
    none = types.Constant(np.zeros(1, dtype=np.int64))
    if mode == "train":
        u = fn.random.uniform(range=[0.0, 1.0])
        start = fn.cast(dmath.floor(u * fn.cast(room + 1, dtype=types.FLOAT)), dtype=types.INT64)
        return _vector(dmath.min(start, room)), none
    if mode == "extract":
        return _vector(room // 2), none

    total, s0 = field_("video_frames"), field_("start_frame")
    free = dmath.max(total - span, 0)
    k = types.Constant(np.arange(num_clips, dtype=np.int64))
    spread = (2 * k * free + (num_clips - 1)) // (2 * max(num_clips - 1, 1))  # round half up
    starts = k + free // 2 if num_clips == 1 else spread
    centres = dmath.min(2 * starts + span, 2 * total - 1)
    end = s0 + n
    tail = fn.cast((s0 > 0) & (total - s0 < span), dtype=types.INT64)
    to_end = fn.cast(total - end < span, dtype=types.INT64)
    lo = 2 * (s0 + tail * (total - s0))
    hi = 2 * (end + to_end * (total - end))
    first = fn.reductions.sum(fn.cast(centres < lo, dtype=types.INT64))
    count = dmath.max(fn.reductions.sum(fn.cast(centres < hi, dtype=types.INT64)) - first, 0)
    has = fn.cast(count > 0, dtype=types.INT64)
    anchor = _i32(_vector(dmath.min(first, num_clips - 1)))
    take = _i32(_vector(dmath.max(count, 1)))

    def cut(vec):
        return fn.slice(
            vec, anchor, take, axes=[0], normalized_anchor=False, normalized_shape=False,
            out_of_bounds_policy="trim_to_shape",
        )  # fmt: skip

    local = dmath.min(dmath.max(cut(starts) - s0, 0), room) * has
    return local, cut(k) * has + (has - 1)


def _mel_starts(fields: dict, starts, span: int):
    """int64 (M,): `format.clip_mel_start` of each clip, in integers: the centred window's column
    round((start + span/2) / fps * MEL_FPS), shifted inside the video's audio when it is long enough."""
    from nvidia.dali import fn, types
    from nvidia.dali import math as dmath

    num, den = fields["fps_num"], fields["fps_den"]
    centred = _round_half_even((2 * starts + span) * fmt.MEL_FPS * den, 2 * num)
    origin = fmt.MEL_PAD_FRAMES - _round_half_even(fields["start_frame"] * fmt.MEL_FPS * den, num)
    end = origin + _round_half_even(fields["video_frames"] * fmt.MEL_FPS * den, num)
    lo = dmath.max(origin, 0)
    hi = dmath.min(end, fields["mel_frames"]) - fmt.WINDOW_FRAMES
    fits = fn.cast(lo <= hi, dtype=types.INT64)
    return centred + fits * (dmath.min(dmath.max(centred, lo), hi) - centred)


def _round_half_even(num, den):
    """num / den rounded as Python's round() does (ties to even), elementwise on int64 DataNodes."""
    from nvidia.dali import fn, types

    q = num // den
    r = num - q * den
    up = (2 * r > den) | ((2 * r == den) & (q - 2 * (q // 2) == 1))
    return q + fn.cast(up, dtype=types.INT64)


def _audio_windows(mel, mel_starts, num_clips: int, clip: ClipSpec, augment: bool):
    """float32 (M, N_MELS, WINDOW_FRAMES): the mel windows starting at `mel_starts` (M,), standardised.

    Columns outside the stored mel read as TOP_DB_FLOOR (silence), as the shard format defines.
    """
    from nvidia.dali import fn, types

    width = types.Constant(np.array([fmt.WINDOW_FRAMES], dtype=np.int32))

    def window(anchor):
        return fn.slice(
            mel, _i32(anchor), width, axes=[1], normalized_anchor=False, normalized_shape=False,
            out_of_bounds_policy="pad", fill_values=fmt.TOP_DB_FLOOR,
        )  # fmt: skip

    if num_clips == 1:
        windows = fn.expand_dims(window(mel_starts), axes=[0])
    else:  # one slice per possible clip, then keep the first M
        padded = fn.pad(mel_starts, shape=[num_clips])
        windows = fn.stack(*[window(_vector(padded[j])) for j in range(num_clips)], axis=0)
        windows = fn.slice(
            windows, types.Constant(np.zeros(1, dtype=np.int32)), mel_starts.shape(dtype=types.INT32),
            axes=[0], normalized_anchor=False, normalized_shape=False,
        )  # fmt: skip
    out = (fn.cast(windows, dtype=types.FLOAT) - clip.mel_mean) * (1.0 / clip.mel_std)
    if augment:
        out = out * _band_mask(fmt.N_MELS, SPEC_FREQ_MASK, (fmt.N_MELS, 1))
        out = out * _band_mask(fmt.WINDOW_FRAMES, SPEC_TIME_MASK, (fmt.WINDOW_FRAMES,))
    return out


def _band_mask(size: int, max_width: int, shape: tuple[int, ...]):
    """float32 `shape`: 0 on one random band of 0..max_width of the `size` positions, 1 elsewhere."""
    from nvidia.dali import fn, types
    from nvidia.dali import math as dmath

    width = dmath.floor(fn.random.uniform(range=[0.0, max_width + 1.0]))
    start = dmath.floor(fn.random.uniform(range=[0.0, 1.0]) * (size - width + 1.0))
    pos = types.Constant(np.arange(size, dtype=np.float32).reshape(shape))
    return fn.cast((pos < start) | (pos >= start + width), dtype=types.FLOAT)


def _video_clips(encoded, starts, ids, clip: ClipSpec, run: Runtime, mode: Mode, *, flip: bool = True):
    """float32 (3, M*L, crop, crop): the clips' frames decoded, resized, cropped, flipped, normalised.

    Frames past the segment's end repeat its last frame (pad_mode="edge"), so a segment shorter
    than a clip still yields a full clip. `flip=False` keeps training clips unmirrored, for content
    whose meaning a mirror changes (handwritten digits, text).
    """
    from nvidia.dali import fn, types

    offsets = types.Constant((np.arange(clip.length, dtype=np.int64) * clip.stride).reshape(1, -1))
    frames = fn.expand_dims(starts, axes=[1]) + offsets  # (M, L)
    if mode == "eval":  # a segment without clips decodes frame 0 only
        frames = frames * fn.cast(ids[0:1] >= 0, dtype=types.INT64)
    frames = _i32(fn.reshape(frames, shape=[-1]))
    decoder = "mixed" if run.device == "gpu" else "cpu"
    video = fn.decoders.video(encoded, device=decoder, frames=frames, pad_mode="edge")
    if clip.short_side is not None:
        video = fn.resize(video, resize_shorter=clip.short_side, antialias=True)
    train = mode == "train"
    return fn.crop_mirror_normalize(
        video,
        crop=(clip.crop, clip.crop),
        crop_pos_x=fn.random.uniform(range=[0.0, 1.0]) if train else 0.5,
        crop_pos_y=fn.random.uniform(range=[0.0, 1.0]) if train else 0.5,
        mirror=fn.random.coin_flip() if train and flip else 0,
        mean=[255.0 * m for m in clip.mean],
        std=[255.0 * s for s in clip.std],
        dtype=types.FLOAT,
        output_layout="CFHW",
    )


# --- torch iterators -------------------------------------------------------------------------


@dataclass
class _DaliLoader:
    """Wraps a pipeline in DALIGenericIterator; iterating yields one epoch of dicts of torch tensors."""

    pipe: object
    shards: ShardSet
    clip: ClipSpec
    run: Runtime
    batch_size: int
    steps: int  # batches per epoch on this rank
    size: int | None  # samples per epoch for a size-driven iterator; None: follow the reader
    _iter: object = field(default=None, init=False, repr=False)

    def _iterator(self):
        from nvidia.dali.plugin.base_iterator import LastBatchPolicy
        from nvidia.dali.plugin.pytorch import DALIGenericIterator

        if self._iter is None:
            try:
                self.pipe.build()
            except RuntimeError as e:
                raise DataError(
                    f"{self.shards.tars[0].parent}: DALI pipeline failed to build: {_first(e)}"
                ) from e
            kwargs = (
                {"size": self.size, "last_batch_policy": LastBatchPolicy.DROP}
                if self.size is not None
                else {"reader_name": READER, "last_batch_policy": LastBatchPolicy.PARTIAL}
            )
            with warnings.catch_warnings():  # DALI asks for reader_name; the epoch is ours, in clips
                warnings.simplefilter("ignore")
                self._iter = DALIGenericIterator(
                    [self.pipe], self.pipe.output_names, auto_reset=True, prepare_first_batch=False, **kwargs
                )
        return self._iter

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        it = iter(self._iterator())
        while True:
            try:
                out = next(it)
            except StopIteration:
                return
            except RuntimeError as e:
                raise _read_error(self.shards, e) from e
            yield self._rows(out[0])

    def _rows(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        batch["audio"] = batch["audio"].reshape(-1, 1, fmt.N_MELS, fmt.WINDOW_FRAMES)
        batch["frame"] = batch["frame"].reshape(-1)
        return batch


_SOURCE = re.compile(r'"([^"]+?\.tar):\d+:([^"]+)"')


def _read_error(shards: ShardSet, e: Exception) -> DataError:
    """DataError naming the shard and member when DALI's message has them (it quotes "tar:offset:member")."""
    found = _SOURCE.search(str(e))
    if found:
        return DataError(f"{found[1]}: member {found[2]} cannot be read: {_first(e)}")
    broken = broken_npy_member(shards)  # DALI's numpy decoder does not say which sample it choked on
    if broken is not None:
        tar, member, reason = broken
        return DataError(f"{tar}: member {member} cannot be read: {reason} (DALI: {_first(e)})")
    return DataError(f"{shards.tars[0].parent}: reading the shards failed: {_first(e)}")


def broken_npy_member(shards: ShardSet) -> tuple[Path, str, str] | None:
    """The first npy member (mel, info, labels) whose header numpy cannot read: (tar, member, reason).

    Run only after a read failed: one seek and a few hundred bytes per member, through the .idx offsets.
    """
    for tar in shards.tars:
        with open(tar, "rb") as f:
            for key, members in tar_index(tar):
                for ext, (offset, size) in members.items():
                    if not ext.endswith(".npy"):
                        continue
                    try:
                        head = io.BytesIO(read_member(f, (offset, min(size, 4096))))
                        if np.lib.format.read_magic(head) != (1, 0):
                            raise ValueError("not npy version 1.0, the one DALI reads")
                        np.lib.format.read_array_header_1_0(head)
                    except ValueError as e:
                        return tar, f"{key}.{ext}", f"not an npy array ({e})"
    return None


def _first(e: Exception) -> str:
    """The line of a DALI error that says what went wrong (it follows 'encountered:')."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    if "encountered:" in lines and lines.index("encountered:") + 1 < len(lines):
        return lines[lines.index("encountered:") + 1]
    return lines[0] if lines else type(e).__name__


class TrainLoader(_DaliLoader):
    """Exactly `len(self)` = epoch_size // (batch * world_size) batches per epoch on every rank."""


class ExtractLoader(_DaliLoader):
    """Each of this rank's samples once per epoch, in `keys` order; the padding DALI adds is dropped."""

    @property
    def keys(self) -> tuple[str, ...]:
        return self.shards.rank_keys(self.run.rank, self.run.world_size)


class EvalLoader(_DaliLoader):
    """Rows are clips: (video, clip) pairs, each video's clips in order; `len` counts segment batches."""

    def _rows(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        ids = batch.pop("clip")  # (B, M), -1 where a segment has fewer clips
        keep = ids >= 0
        b, m = ids.shape
        rows = {"clip": ids[keep], "frame": batch.pop("frame")[keep]}
        for name in ("index", "segment", "label"):
            rows[name] = batch[name].reshape(b, 1).expand(b, m)[keep]
        audio = batch["audio"]
        rows["audio"] = audio[keep.to(audio.device)].reshape(-1, 1, fmt.N_MELS, fmt.WINDOW_FRAMES)
        if "video" in batch:
            video = batch["video"]  # (B, 3, M*L, H, W)
            _, c, _, h, w = video.shape
            video = video.reshape(b, c, m, self.clip.length, h, w).transpose(1, 2)
            rows["video"] = video[keep.to(video.device)]
        return rows


def train_loader(
    shards: ShardSet,
    *,
    batch_size: int,
    epoch_size: int | None = None,
    clip: ClipSpec = ClipSpec(),
    run: Runtime = Runtime(),
    spec_augment: bool = False,
    flip: bool = True,
) -> TrainLoader:
    """Random clips with augmentation; `epoch_size` in clips over all ranks (default: one per segment)."""
    epoch = len(shards) if epoch_size is None else epoch_size
    steps = sampling.batches_per_epoch(epoch, batch_size, run.world_size)
    pipe = build_pipeline(
        shards, "train", batch_size=batch_size, clip=clip, run=run, spec_augment=spec_augment, flip=flip
    )
    return TrainLoader(pipe, shards, clip, run, batch_size, steps, steps * batch_size)


def eval_loader(
    shards: ShardSet,
    *,
    batch_size: int,
    num_clips: int = 10,
    clip: ClipSpec = ClipSpec(),
    run: Runtime = Runtime(),
) -> EvalLoader:
    """`num_clips` evenly spaced clips per video, centre crop; `batch_size` counts segments, rows vary.

    Average predictions with `sampling.mean_per_video(pred, batch["index"])`. With several ranks a
    video's segments may sit on two ranks: gather the rows before averaging.
    """
    pipe = build_pipeline(shards, "eval", batch_size=batch_size, clip=clip, run=run, num_clips=num_clips)
    rows = len(shards.rank_keys(run.rank, run.world_size))
    return EvalLoader(pipe, shards, clip, run, batch_size, math.ceil(rows / batch_size), None)


def extract_loader(
    shards: ShardSet,
    *,
    batch_size: int,
    clip: ClipSpec = ClipSpec(),
    run: Runtime = Runtime(),
) -> ExtractLoader:
    """One centred clip and its audio window per segment, each segment once; pool per video with
    `sampling.mean_per_video(features, batch["index"])` after gathering all ranks' rows."""
    pipe = build_pipeline(shards, "extract", batch_size=batch_size, clip=clip, run=run)
    rows = len(shards.rank_keys(run.rank, run.world_size))
    return ExtractLoader(pipe, shards, clip, run, batch_size, math.ceil(rows / batch_size), None)
