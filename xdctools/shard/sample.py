"""The members of each sample of one video (pure: bytes and arrays in, (name, bytes) lists out)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from fractions import Fraction

import numpy as np

from xdctools.shard import format as fmt
from xdctools.shard.jobs import Job
from xdctools.shard.mel import audio_only_mel, segment_mel
from xdctools.shard.params import ShardParams

Member = tuple[str, bytes]

MEL_PARAMS = {
    "sample_rate": fmt.SAMPLE_RATE,
    "n_mels": fmt.N_MELS,
    "n_fft": fmt.N_FFT,
    "hop_length": fmt.HOP_LENGTH,
    "win_length": fmt.WIN_LENGTH,
    "window": "hann",
    "center": True,
    "pad_mode": "constant",
    "power": 2.0,
    "fmin": fmt.FMIN,
    "fmax": fmt.FMAX,
    "db": {"ref": 1.0, "amin": 1e-10, "top_db": None},
    "floor_db": fmt.TOP_DB_FLOOR,
    "mel_fps": fmt.MEL_FPS,
    "window_frames": fmt.WINDOW_FRAMES,
    "pad_frames": fmt.MEL_PAD_FRAMES,
    "pad_seconds": fmt.MEL_PAD_SECONDS,
    "dtype": "float16",
}


def build_samples(
    job: Job,
    segments: Sequence[bytes],
    starts: Sequence[int],
    counts: Sequence[int],
    fps: Fraction | None,
    mel: np.ndarray | None,
    meta: dict,
    params: ShardParams,
) -> list[list[Member]]:
    """Per segment, its (member name, bytes) list in `format.MEMBER_ORDER`.

    `mel` is the whole video's float32 log-mel (N_MELS, F), or None for a missing or silent track
    (stored as TOP_DB_FLOOR). An audio-only job (`segments` empty) gives one sample whose mel covers
    the whole clip. `meta` is the video-level metadata from `media.process_job`.
    """
    if job.audio_only:
        samples = meta["audio_samples"]
        full = mel if mel is not None else np.full((fmt.N_MELS, 0), fmt.TOP_DB_FLOOR, np.float32)
        return [_sample(job, 0, 1, None, audio_only_mel(full, samples), meta, params, b"", 0, 0)]
    if fps is None:
        raise ValueError("a video job needs the stored frame rate")
    if not len(segments) == len(starts) == len(counts):
        raise ValueError(f"{len(segments)} segments, {len(starts)} starts, {len(counts)} counts")
    full = mel if mel is not None else np.full((fmt.N_MELS, 0), fmt.TOP_DB_FLOOR, np.float32)
    out = []
    for i, (data, start, count) in enumerate(zip(segments, starts, counts, strict=True)):
        seg_mel = segment_mel(full, start, count, fps)
        out.append(_sample(job, i, len(segments), fps, seg_mel, meta, params, data, start, count))
    return out


def _sample(
    job: Job,
    index: int,
    total: int,
    fps: Fraction | None,
    seg_mel: np.ndarray,
    meta: dict,
    params: ShardParams,
    video: bytes,
    start: int,
    count: int,
) -> list[Member]:
    key = fmt.make_key(job.index, job.name, index)
    info = fmt.encode_info(
        video=job.index,
        segment=index,
        num_segments=total,
        start_frame=start,
        num_frames=count,
        video_frames=meta["frames"],
        fps_num=fps.numerator if fps else 0,
        fps_den=fps.denominator if fps else 1,
        label=job.class_index,
        has_audio=int(meta["has_audio"]),
        mel_frames=seg_mel.shape[1],
    )
    members = {
        fmt.INFO_EXT: info,
        fmt.META_EXT: metadata_json(job, index, total, fps, seg_mel.shape[1], meta, params, start, count),
        fmt.MEL_EXT: fmt.npy_bytes(seg_mel.astype(np.float16)),
    }
    if job.class_index >= 0:
        members[fmt.CLS_EXT] = str(job.class_index).encode("ascii")
    if job.class_indices:
        members[fmt.LABELS_EXT] = fmt.encode_labels(job.class_indices)
    if not job.audio_only:
        members[params.video_ext] = video
    return [(f"{key}.{ext}", members[ext]) for ext in fmt.MEMBER_ORDER if ext in members]


def metadata_json(
    job: Job,
    index: int,
    total: int,
    fps: Fraction | None,
    mel_frames: int,
    meta: dict,
    params: ShardParams,
    start: int,
    count: int,
) -> bytes:
    """The `json` member: sorted keys, compact, so equal inputs give equal bytes."""
    source = meta["source"]
    src_video, src_audio = source.get("video") or {}, source.get("audio") or {}
    doc: dict = {
        "key": fmt.make_key(job.index, job.name, index),
        "source": {
            "path": job.path,
            "name": job.name,
            "container": source.get("container"),
            "duration": source.get("duration"),
            "bytes": source.get("bytes"),
            "video": src_video or None,
            "audio": src_audio or None,
        },
        "label": job.label,
        "class_index": job.class_index,
        "set": job.set_name,
        "trim": meta.get("trim"),
        "duration": meta["duration_s"],
        "audio_only": job.audio_only,
        "audio": {
            "present": bool(src_audio),
            "has_audio": bool(meta["has_audio"]),
            "silent": meta.get("audio_silent"),
            "rms_dbfs": meta.get("audio_rms_dbfs"),
            "codec": src_audio.get("codec"),
            "sample_rate": src_audio.get("sample_rate"),
            "channels": src_audio.get("channels"),
            "stored_sample_rate": params.sample_rate,
            "stored_samples": meta.get("audio_samples", 0),
            "decode_errors": meta.get("audio_decode_errors", 0),
        },
        "mel": {**MEL_PARAMS, "frames": mel_frames},
        "codec": params.to_dict(output_only=True),
    }
    if job.class_indices:  # multi-label: "label" is null and "class_index" -1, as in info.npy
        doc["labels"] = list(job.labels)
        doc["class_indices"] = list(job.class_indices)
    if not job.audio_only:
        doc["video"] = {
            "frames": meta["frames"],
            "fps": f"{fps.numerator}/{fps.denominator}",
            "fps_float": float(fps),
            "width": meta["width"],
            "height": meta["height"],
            "rotation_applied": src_video.get("rotation", 0),
            "num_segments": total,
        }
        doc["segment"] = {
            "index": index,
            "start_frame": start,
            "num_frames": count,
            "start_s": float(start / fps),
            "duration_s": float(count / fps),
            "mel_origin": fmt.segment_mel_origin(start, fps),
        }
    for name, value in job.extra:
        if name in doc:
            raise ValueError(f"job extra field {name!r} collides with a metadata field")
        doc[name] = value
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), allow_nan=False).encode("utf-8")
