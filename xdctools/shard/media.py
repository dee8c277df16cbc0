"""One input file -> its samples (one in-process probe, one fused ffmpeg pass) or a failure reason."""

from __future__ import annotations

import csv
import errno
import io
import json
import math
import os
import re
import signal
import struct
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import ffmpeg
import numpy as np

from xdctools.errors import DISK_FULL_ERRNOS, InputError
from xdctools.shard import format as fmt
from xdctools.shard.jobs import Job
from xdctools.shard.mel import log_mel
from xdctools.shard.params import MAX_FPS, ShardParams
from xdctools.shard.sample import build_samples

try:  # PyAV is a runtime dependency (setup.py); an install without it still works, probing by ffprobe
    import av
except ImportError:  # pragma: no cover - exercised only on installs without PyAV
    av = None

# Failure reasons: stable strings, counted in dataset.json and written to errors.jsonl with their kind.
EMPTY_FILE = "empty_file"
UNREADABLE = "unreadable"
NO_VIDEO_STREAM = "no_video_stream"
NOT_A_VIDEO = "not_a_video"
CORRUPT_STREAM = "corrupt_stream"
NO_AUDIO = "no_audio"
SILENT_AUDIO = "silent_audio"
TOO_SHORT = "too_short"
FFMPEG_FAILED = "ffmpeg_failed"
FFMPEG_CRASHED = "ffmpeg_crashed"
TIMEOUT = "timeout"
FFMPEG_KILLED = "ffmpeg_killed"
DISK_FULL = "disk_full"
OUT_OF_MEMORY = "out_of_memory"

# Kinds: a media failure is the input's (permanent: the same bytes fail the same way); a transient one is
# the machine's (time, memory, disk), and the next run retries the file. See docs/shard.md.
MEDIA = "media"
TRANSIENT = "transient"
REASON_KINDS = {
    EMPTY_FILE: MEDIA,
    UNREADABLE: MEDIA,
    NO_VIDEO_STREAM: MEDIA,
    NOT_A_VIDEO: MEDIA,
    CORRUPT_STREAM: MEDIA,
    NO_AUDIO: MEDIA,
    SILENT_AUDIO: MEDIA,
    TOO_SHORT: MEDIA,
    FFMPEG_FAILED: MEDIA,  # ffmpeg exited with an error on this file: unsupported or undecodable
    FFMPEG_CRASHED: MEDIA,  # ffmpeg died of its own fault (SIGSEGV, SIGABRT, ...): this file crashes it again
    TIMEOUT: TRANSIENT,
    FFMPEG_KILLED: TRANSIENT,  # stopped from outside: SIGKILL (out-of-memory killer), SIGTERM, a CPU limit
    DISK_FULL: TRANSIENT,  # ENOSPC, EFBIG, EDQUOT; ffmpeg killed by SIGXFSZ (a file-size limit)
    OUT_OF_MEMORY: TRANSIENT,  # MemoryError, ENOMEM
}
REASONS = tuple(REASON_KINDS)
# Signals that stop ffmpeg from outside (the file is not to blame); SIGXFSZ is a file-size limit: disk full.
STOP_SIGNALS = frozenset(
    {signal.SIGKILL, signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGXCPU}
)
FFMPEG_SIGNAL_EXIT = 255  # ffmpeg's exit code after it caught SIGTERM, SIGINT, SIGQUIT or SIGXCPU
# What ffmpeg prints at the end of a line when a write fails; it may still exit 0 (measured: ffmpeg 5.1 on a
# full device prints "Error writing trailer of audio.f32: No space left on device" and exits 0). Its "Cannot
# allocate memory" is left out: libav says it for absurd sizes read from corrupt files too (a media failure).
DISK_FULL_ERRORS = tuple(os.strerror(code) for code in sorted(DISK_FULL_ERRNOS))

SILENCE_DBFS = -70.0  # an audio track whose RMS is below this is digitally silent
DEFAULT_FPS = Fraction(25)  # ffmpeg's own default, for streams that state no rate at all
IMAGE_CODECS = frozenset({"mjpeg", "png", "bmp", "tiff", "webp", "jpeg2000", "jpegls", "ppm", "pgm", "qoi"})
UNKNOWN_DURATION_S = 4 * 3600  # cut positions prepared for a video whose container states no duration
MAX_CUT_ARG = 100_000  # characters of the -segment_frames list (Linux limits one argument to 128 KiB)
VIDEO_PATTERN = "seg%04d"
SEGMENT_LIST = "segments.csv"
AUDIO_FILE = "audio.f32"
_DECODE_ERROR = re.compile(r"^Error while decoding stream #0:(\d+)")
# Demuxers whose PyAV (newer libav) summary was checked field by field against ffprobe on PATH; files of
# any other container are probed by ffprobe. "mov,..." also needs `_mvhd_duration_us` (see there).
PYAV_CONTAINERS = frozenset({"mov,mp4,m4a,3gp,3g2,mj2", "matroska,webm", "avi", "mpeg"})
MOV_CONTAINER = "mov,mp4,m4a,3gp,3g2,mj2"
AV_TIME_BASE = 1_000_000  # libav's internal time base (container durations are in microseconds)


@dataclass
class JobResult:
    """What a worker sends back for one Job; picklable, never an exception for a bad input file.

    `samples[i]` is segment i's (member name, bytes) list in `format.MEMBER_ORDER`; on failure it is
    empty and `reason` is one of REASONS with a human `detail`.
    """

    ok: bool
    samples: list[list[tuple[str, bytes]]] = field(default_factory=list)
    reason: str | None = None
    detail: str = ""
    meta: dict = field(default_factory=dict)


class MediaFailure(Exception):
    """One input file failed: a stable reason (its kind in REASON_KINDS, media or transient) and a detail."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


# --- probing -----------------------------------------------------------------------------------


def probe(path: str | os.PathLike, timeout_s: float = 60.0) -> dict:
    """The summary of `path` (see `summarize`); InputError naming the file when it cannot be probed."""
    try:
        return probe_summary(path, timeout_s)
    except MediaFailure as exc:
        raise InputError(f"{path}: {exc.reason.replace('_', ' ')}: {exc.detail}") from None


def probe_summary(path: str | os.PathLike, timeout_s: float) -> dict:
    """`summarize(run_ffprobe(path))`, read in-process by PyAV when it can vouch for every field.

    ffprobe costs a process start and a libav load (~0.1 s) per file; PyAV opens the file in ~10 ms. Any
    file PyAV cannot open, or whose summary may differ from ffprobe's, goes to ffprobe, so failure reasons
    and their detail text are ffprobe's.
    """
    summary = pyav_summary(path, timeout_s)
    return summary if summary is not None else summarize(run_ffprobe(path, timeout_s))


def run_ffprobe(path: str | os.PathLike, timeout_s: float) -> dict:
    """ffprobe's JSON (format + streams). ffmpeg.probe has no timeout, so this calls ffprobe itself."""
    path = str(path)
    try:
        size = os.path.getsize(path)
    except OSError as exc:
        raise MediaFailure(UNREADABLE, exc.strerror or str(exc)) from None
    if size == 0:
        raise MediaFailure(EMPTY_FILE, "0 bytes")
    args = ["ffprobe", "-v", "error", "-show_format", "-show_streams", "-of", "json", path]
    try:
        proc = subprocess.run(args, capture_output=True, timeout=timeout_s, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise MediaFailure(TIMEOUT, f"ffprobe took more than {timeout_s:g} s (--timeout)") from None
    stopped = stopped_failure(proc.returncode, "ffprobe")
    if stopped is not None:
        raise stopped
    if proc.returncode != 0:
        raise MediaFailure(
            UNREADABLE, _stderr_summary(proc.stderr, path) or f"ffprobe exit {proc.returncode}"
        )
    try:
        return json.loads(proc.stdout.decode("utf-8", "replace"))
    except json.JSONDecodeError:
        raise MediaFailure(UNREADABLE, "ffprobe printed no JSON") from None


def summarize(raw: dict) -> dict:
    """JSON-able summary of ffprobe's output: container, duration, first video and audio stream.

    Attached pictures (cover art) are not video. `rotation` is clockwise degrees in [0, 360), the
    rotation ffmpeg's autorotate applies; durations are seconds or None when the file states none.
    """
    fmt_info = raw.get("format", {})
    streams = raw.get("streams", [])
    video = next(
        (
            s
            for s in streams
            if s.get("codec_type") == "video" and not s.get("disposition", {}).get("attached_pic")
        ),
        None,
    )
    audio = next((s for s in streams if s.get("codec_type") == "audio"), None)
    durations = [_float(fmt_info.get("duration"))] + [_stream_duration(s) for s in (video, audio) if s]
    known = [d for d in durations if d is not None and d > 0]
    out: dict = {
        "container": fmt_info.get("format_name", ""),
        "duration": known[0] if known else None,
        "bytes": _int(fmt_info.get("size")),
        "video": None,
        "audio": None,
    }
    if video is not None:
        avg, rate = fmt.parse_fps(video.get("avg_frame_rate")), fmt.parse_fps(video.get("r_frame_rate"))
        out["video"] = {
            "index": int(video["index"]),
            "codec": video.get("codec_name", "unknown"),
            "width": _int(video.get("width")) or 0,
            "height": _int(video.get("height")) or 0,
            "sar": _ratio(video.get("sample_aspect_ratio")),
            "pix_fmt": video.get("pix_fmt"),
            "avg_fps": _fraction_text(avg),
            "r_fps": _fraction_text(rate),
            "frames": _int(video.get("nb_frames")),
            "duration": _stream_duration(video),
            "rotation": _rotation(video),
        }
    if audio is not None:
        out["audio"] = {
            "index": int(audio["index"]),
            "codec": audio.get("codec_name", "unknown"),
            "sample_rate": _int(audio.get("sample_rate")),
            "channels": _int(audio.get("channels")),
            "channel_layout": audio.get("channel_layout"),
        }
    return out


def pyav_summary(path: str | os.PathLike, timeout_s: float) -> dict | None:
    """The summary `summarize(run_ffprobe(path))` gives, read with PyAV; None when it may differ.

    PyAV's fields are written out as ffprobe's JSON (same names, same number formatting) and go through
    `summarize`. PyAV bundles a newer libav than the ffmpeg/ffprobe on PATH, so files where the two are
    known or likely to disagree return None: a container outside PYAV_CONTAINERS, an MP4/QuickTime file
    without a plain movie header duration (`_mvhd_duration_us`), any stream besides video and audio (the
    newer libav leaves subtitle ends out of the container duration), no decodable first video frame (the
    rotation is read from it), an unknown codec, pixel format or channel layout, or a legacy `rotate` tag.
    """
    if av is None:
        return None
    try:
        if os.path.getsize(path) == 0:
            return None
        with av.open(str(path), metadata_errors="replace", timeout=timeout_s) as container:
            raw = _pyav_raw(container)
        if raw is not None and raw["format"]["format_name"] == MOV_CONTAINER:
            duration_us = _mvhd_duration_us(path)
            if duration_us is None:
                return None
            raw["format"]["duration"] = _ffprobe_time(duration_us, Fraction(1, AV_TIME_BASE))
    except Exception:  # anything PyAV cannot read is ffprobe's to judge and explain
        return None
    return None if raw is None else summarize(raw)


def _pyav_raw(container: av.container.InputContainer) -> dict | None:
    """The part of ffprobe's -show_format -show_streams JSON that `summarize` reads; None when unsure."""
    if container.format.name not in PYAV_CONTAINERS:
        return None
    streams = []
    video_seen = False
    for stream in container.streams:
        kind = stream.type
        ctx = stream.codec_context
        if kind not in ("video", "audio") or ctx is None or stream.metadata.get("rotate") is not None:
            return None
        entry: dict = {
            "index": stream.index,
            "codec_type": kind,
            "codec_name": ctx.codec.canonical_name,
            "duration": _ffprobe_time(stream.duration, stream.time_base),
            "nb_frames": str(stream.frames) if stream.frames else None,
            "disposition": {
                "attached_pic": int(bool(stream.disposition & av.stream.Disposition.attached_pic))
            },
            "tags": dict(stream.metadata),
        }
        if kind == "video":
            if ctx.format is None or not ctx.width or not ctx.height:
                return None
            sar = stream.sample_aspect_ratio
            entry.update(
                width=ctx.width,
                height=ctx.height,
                sample_aspect_ratio=f"{sar.numerator}:{sar.denominator}" if sar else None,
                pix_fmt=ctx.format.name,
                avg_frame_rate=_ffprobe_rate(stream.average_rate),
                r_frame_rate=_ffprobe_rate(stream.base_rate),
            )
            if not video_seen and not entry["disposition"]["attached_pic"]:
                video_seen = True
                rotation = _first_frame_rotation(container, stream)
                if rotation is None:
                    return None
                if rotation:
                    entry["side_data_list"] = [{"rotation": rotation}]
        else:
            layout = ctx.layout.name
            if not ctx.sample_rate or not ctx.channels or re.fullmatch(r"\d+ channels", layout):
                return None  # an unspecified channel order: ffprobe prints no layout
            entry.update(sample_rate=str(ctx.sample_rate), channels=ctx.channels, channel_layout=layout)
        streams.append(entry)
    return {
        "format": {
            "format_name": container.format.name,
            "duration": _ffprobe_time(container.duration, Fraction(1, AV_TIME_BASE)),
            "size": str(container.size),
        },
        "streams": streams,
    }


def _first_frame_rotation(container: av.container.InputContainer, stream: av.VideoStream) -> int | None:
    """The display matrix's counter-clockwise angle, as ffprobe's side data prints it; None if no frame.

    PyAV does not expose the stream's display matrix, but the decoder attaches it to every frame.
    """
    stream.codec_context.thread_count = 1  # one frame: no thread pool to start
    for frame in container.decode(stream):
        return frame.rotation
    return None


def _mvhd_duration_us(path: str | os.PathLike) -> int | None:
    """The MP4/QuickTime movie header's duration in microseconds, as ffprobe 5.1's mov demuxer states it.

    That libav takes the container duration from `moov/mvhd` (rescaled, rounded to nearest); newer ones
    compute it from the tracks, which differs by a few ms (or more when a subtitle track runs longer).
    None when there is no plain first `moov` with an `mvhd`, the file is fragmented (`mvex`: the old
    demuxer ignores mvhd then), or the header states no duration.
    """
    with open(path, "rb") as f:
        end = os.fstat(f.fileno()).st_size
        for kind, start, stop in _boxes(f, 0, end):
            if kind != b"moov":
                continue
            children = list(_boxes(f, start, stop))
            headers = [(body, child_end) for child, body, child_end in children if child == b"mvhd"]
            if len(headers) != 1 or any(child == b"mvex" for child, _, _ in children):
                return None
            body, child_end = headers[0]
            f.seek(body)
            head = f.read(min(child_end - body, 32))
            layout = ">B3xQQIQ" if head[:1] == b"\x01" else ">B3xIIII"
            if len(head) < struct.calcsize(layout):
                return None
            version, _, _, scale, duration = struct.unpack_from(layout, head)
            if version > 1 or scale <= 0 or duration <= 0 or (version == 0 and duration == 0xFFFFFFFF):
                return None
            return (duration * AV_TIME_BASE + scale // 2) // scale  # av_rescale, AV_ROUND_NEAR_INF
    return None


def _boxes(f: io.BufferedReader, start: int, end: int) -> Iterator[tuple[bytes, int, int]]:
    """(type, body start, box end) of the ISO BMFF boxes between start and end; stops at a malformed one."""
    pos = start
    while pos + 8 <= end:
        f.seek(pos)
        size, kind = struct.unpack(">I4s", f.read(8))
        header = 8
        if size == 1:
            raw = f.read(8)
            if len(raw) < 8:
                return
            size, header = struct.unpack(">Q", raw)[0], 16
        elif size == 0:
            size = end - pos
        if size < header or pos + size > end:
            return
        yield kind, pos + header, pos + size
        pos += size


def _ffprobe_time(value: int | None, time_base: Fraction | None) -> str | None:
    """ffprobe's rendering of a timestamp: value * av_q2d(time_base) printed with %f."""
    if value is None or time_base is None:
        return None
    return f"{value * (time_base.numerator / time_base.denominator):f}"


def _ffprobe_rate(rate: Fraction | None) -> str:
    return "0/0" if rate is None else f"{rate.numerator}/{rate.denominator}"


def _rotation(stream: dict) -> int:
    for side in stream.get("side_data_list", []) or []:
        if "rotation" in side:
            # ffprobe reports the display matrix's counter-clockwise angle (-90 for a 90° clockwise turn)
            return round(-float(side["rotation"])) % 360
    rotate = stream.get("tags", {}).get("rotate")
    return round(float(rotate)) % 360 if rotate not in (None, "") else 0


def _stream_duration(stream: dict) -> float | None:
    value = _float(stream.get("duration"))
    if value is None:  # Matroska keeps it in a tag: "00:00:10.381000000"
        tag = (stream.get("tags") or {}).get("DURATION")
        if tag:
            try:
                h, m, s = tag.split(":")
                value = int(h) * 3600 + int(m) * 60 + float(s)
            except ValueError:
                value = None
    return value


def _float(value: object) -> float | None:
    try:
        out = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def _int(value: object) -> int | None:
    try:
        return int(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


def _ratio(text: str | None) -> str:
    try:
        num, den = (int(x) for x in (text or "").split(":"))
    except ValueError:
        return "1:1"
    return f"{num}:{den}" if num > 0 and den > 0 else "1:1"


def _fraction_text(value: Fraction | None) -> str | None:
    return None if value is None else f"{value.numerator}/{value.denominator}"


# --- decisions (pure) --------------------------------------------------------------------------


def check_source(summary: dict, job: Job, params: ShardParams) -> None:
    """Raise MediaFailure for inputs that need no transcoding to be rejected."""
    if job.audio_only:
        if summary["audio"] is None:
            raise MediaFailure(NO_AUDIO, "the file has no audio stream")
        return
    video = summary["video"]
    container = summary["container"]
    if video is None:
        raise MediaFailure(NO_VIDEO_STREAM, f"streams found: {_stream_kinds(summary)}")
    if container == "image2" or container.endswith("_pipe"):
        raise MediaFailure(NOT_A_VIDEO, f"an image ({video['codec']} in {container})")
    if video["codec"] in IMAGE_CODECS and (video["frames"] or 0) <= 1 and summary["duration"] is None:
        raise MediaFailure(NOT_A_VIDEO, f"a single {video['codec']} image")
    if params.audio_required and summary["audio"] is None:
        raise MediaFailure(NO_AUDIO, "the file has no audio stream and audio is required")


def _stream_kinds(summary: dict) -> str:
    kinds = [k for k in ("video", "audio") if summary[k] is not None]
    return ", ".join(kinds) or "none"


def output_fps(summary: dict, params: ShardParams) -> Fraction:
    """The constant rate of the stored video: --fps, else the source's average rate."""
    if params.fps is not None:
        return params.fps
    video = summary["video"]
    for text in (video["avg_fps"], video["r_fps"]):
        rate = fmt.parse_fps(text)
        if rate is not None and rate <= MAX_FPS:
            return rate
    return DEFAULT_FPS


def output_size(width: int, height: int, sar: str, rotation: int, short_side: int) -> tuple[int, int]:
    """(width, height) of the stored video: displayed aspect kept, short side scaled, both even.

    Same rounding as ffmpeg's `scale=-2`: the long side is round(long * S / short / 2) * 2; square
    pixels are stored (anamorphic sources are resampled to their display aspect).
    """
    num, den = (int(x) for x in sar.split(":"))
    disp_w, disp_h = Fraction(width * num, den), Fraction(height)
    if rotation % 180 == 90:
        disp_w, disp_h = disp_h, disp_w
    if disp_w <= 0 or disp_h <= 0:
        return short_side, short_side
    short, long_ = min(disp_w, disp_h), max(disp_w, disp_h)
    scaled = max(2, math.floor(long_ * short_side / short / 2 + Fraction(1, 2)) * 2)
    return (short_side, scaled) if disp_w <= disp_h else (scaled, short_side)


def expected_seconds(summary: dict, job: Job) -> float | None:
    """Seconds of the (trimmed) output, when the container says how long the input is."""
    duration = summary["duration"]
    start = job.start or 0.0
    if job.end is not None:
        end = job.end if duration is None else min(job.end, duration)
        return max(0.0, end - start)
    return None if duration is None else max(0.0, duration - start)


def cut_frames(seconds: float | None, fps: Fraction, segment_frames: int) -> str:
    """The -segment_frames list: a cut every segment_frames frames, past the expected end.

    ffmpeg puts everything after the last listed cut into one segment, so the list runs 5% + 2
    segments past the probed duration; `segment_counts` detects a video longer than that.
    """
    seconds = UNKNOWN_DURATION_S if seconds is None else seconds
    n = math.ceil(seconds * 1.05 * float(fps) / segment_frames) + 2
    cuts: list[str] = []
    length = 0
    for i in range(1, n + 1):
        text = str(i * segment_frames)
        length += len(text) + 1
        if length > MAX_CUT_ARG:
            break
        cuts.append(text)
    return ",".join(cuts)


def segment_counts(
    csv_text: str, fps: Fraction, segment_frames: int
) -> tuple[list[str], list[int], list[int]]:
    """(file names, start frames, frame counts) of the segments the segment muxer listed.

    Cuts fall every segment_frames frames, so all but the last segment hold exactly that many; the
    last one's count comes from its end time (constant rate, so frames = round(end * fps)). Raises
    MediaFailure when the times disagree with that.
    """
    rows = [row for row in csv.reader(io.StringIO(csv_text)) if row]
    if len(rows) == 1 and round(Fraction(rows[0][2]) * fps) == 0:
        rows = []  # no frame at all (e.g. a trim past the end): the muxer still lists one empty file
    names, starts, counts = [], [], []
    for i, (name, start, end) in enumerate(rows):
        first = round(Fraction(start) * fps)
        last = round(Fraction(end) * fps)
        if first != i * segment_frames:
            raise MediaFailure(
                FFMPEG_FAILED, f"segment {i} starts at frame {first}, not {i * segment_frames}"
            )
        count = last - first
        if count <= 0 or count > segment_frames or (i < len(rows) - 1 and count != segment_frames):
            detail = f"segment {i} holds {count} frames (cuts every {segment_frames})"
            if i == len(rows) - 1 and count > segment_frames:
                detail = "the video is longer than its container states; the list of cuts ran out"
            raise MediaFailure(FFMPEG_FAILED, detail)
        names.append(name)
        starts.append(first)
        counts.append(count)
    return names, starts, counts


def decode_errors(stderr: str, stream_index: int) -> list[str]:
    """ffmpeg's `Error while decoding stream #0:N` lines for the stream we keep.

    ffmpeg prints one whenever the decoder rejects a packet (broken NAL units, truncated frames);
    good files print none (checked on every file of the test collection).
    """
    out = []
    for line in stderr.splitlines():
        match = _DECODE_ERROR.match(line.strip())
        if match and int(match.group(1)) == stream_index:
            out.append(line.strip())
    return out


def rms_dbfs(audio: np.ndarray) -> float:
    """RMS level of float audio in dB relative to full scale; -inf for all zeros."""
    if audio.size == 0:
        return -math.inf
    rms = math.sqrt(float(np.mean(np.square(audio, dtype=np.float64))))
    return 20 * math.log10(rms) if rms > 0 else -math.inf


# --- the ffmpeg command ------------------------------------------------------------------------


def build_command(
    path: str, summary: dict, job: Job, params: ShardParams, fps: Fraction, size: tuple[int, int]
) -> list[str]:
    """argv of the single ffmpeg pass, run inside the job's temp dir.

    Writes `seg%04d.<ext>` (segments of segment_frames frames, each opening on a keyframe),
    `segments.csv` (name, start, end seconds) and `audio.f32` (mono float32 at sample_rate, sample 0
    at video time 0).
    """
    in_kwargs: dict = {"threads": params.ffmpeg_threads}
    if job.start:
        in_kwargs["ss"] = f"{job.start:.6f}"
    if job.end is not None:
        in_kwargs["to"] = f"{job.end:.6f}"
    source = ffmpeg.input(path, **in_kwargs)
    outputs = []
    if not job.audio_only:
        video = (
            source[str(summary["video"]["index"])]
            .filter("fps", fps=_fraction_text(fps), start_time=0)
            .filter("scale", size[0], size[1])
            .filter("setsar", 1)
            .filter("format", "yuv420p")
        )
        outputs.append(
            ffmpeg.output(
                video, f"{VIDEO_PATTERN}.{params.video_ext}", **_video_args(summary, job, params, fps)
            )
        )
    if summary["audio"] is not None:
        audio = (
            source[str(summary["audio"]["index"])]
            .filter("aresample", params.sample_rate, first_pts=0, **{"async": 1})
            .filter("aformat", sample_fmts="flt", channel_layouts="mono")
        )
        outputs.append(ffmpeg.output(audio, AUDIO_FILE, f="f32le"))
    args = ffmpeg.compile(ffmpeg.merge_outputs(*outputs), overwrite_output=True)
    threads = str(params.ffmpeg_threads)
    return [args[0], "-nostdin", "-hide_banner", "-v", "error", "-filter_complex_threads", threads, *args[1:]]


def _video_args(summary: dict, job: Job, params: ShardParams, fps: Fraction) -> dict:
    gop = params.gop
    common = {
        "g": gop,
        "keyint_min": gop,
        "force_key_frames": f"expr:eq(mod(n,{gop}),0)",
        "threads": params.ffmpeg_threads,
        "an": None,
        "sn": None,
        "dn": None,
        "map_metadata": -1,
        "map_chapters": -1,
        "fflags": "+bitexact",
        "f": "segment",
        "segment_frames": cut_frames(expected_seconds(summary, job), fps, params.segment_frames),
        "segment_list": SEGMENT_LIST,
        "segment_list_type": "csv",
        "reset_timestamps": 1,
    }
    if params.codec == "vp9":
        codec = {
            "c:v": "libvpx-vp9",
            "deadline": "realtime",
            "cpu-used": params.speed,
            "crf": params.crf,
            "b:v": 0,
            "row-mt": 1,
            "flags:v": "+bitexact",
            "segment_format": "webm",
        }
    else:
        codec = {
            "c:v": "libx264",
            "preset": "veryfast",
            "crf": params.crf,
            "bf": 0,
            "sc_threshold": 0,
            "flags:v": "+cgop+bitexact",
            "segment_format": "mp4",
            "segment_format_options": "movflags=+faststart",  # moov first: readable as a stream
        }
    return {**codec, **common}


# --- running -----------------------------------------------------------------------------------


def run_ffmpeg(args: list[str], cwd: str, timeout_s: float) -> tuple[int, str]:
    """(exit code, stderr text); MediaFailure(timeout) after timeout_s (ffmpeg is killed)."""
    try:
        proc = subprocess.run(args, cwd=cwd, capture_output=True, timeout=timeout_s, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise MediaFailure(TIMEOUT, f"ffmpeg took more than {timeout_s:g} s (--timeout)") from None
    return proc.returncode, proc.stderr.decode("utf-8", "replace")


@dataclass
class Transcoded:
    """What the ffmpeg pass left in the temp dir, read into memory."""

    segment_list: str  # the segment muxer's csv: name, start and end seconds
    segments: dict[str, bytes]  # file name -> bytes
    audio: np.ndarray | None  # float32 mono samples; None when the source has no audio stream


def process_job(job: Job, params: ShardParams) -> JobResult:
    """Turn one input file into its samples, or into a failure reason.

    Never raises for a bad file (a media reason) or for a lack of time, memory or disk (a transient one);
    any other exception is a bug of ours and propagates, so the run stops instead of blaming the file.
    """
    try:
        return _process(job, params)
    except MediaFailure as exc:
        return JobResult(ok=False, reason=exc.reason, detail=exc.detail)
    except (OSError, MemoryError) as exc:
        failure = os_failure(exc)
        if failure is None:
            raise
        return JobResult(ok=False, reason=failure.reason, detail=failure.detail)


def _process(job: Job, params: ShardParams) -> JobResult:
    summary = probe_summary(job.path, params.timeout_s)
    check_source(summary, job, params)
    fps = None if job.audio_only else output_fps(summary, params)
    size = (0, 0) if job.audio_only else output_size(**_size_args(summary), short_side=params.short_side)
    args = build_command(os.path.abspath(job.path), summary, job, params, fps or Fraction(1), size)
    with tempfile.TemporaryDirectory(prefix="xdc-job-") as tmp:
        code, stderr = run_ffmpeg(args, tmp, params.timeout_s)
        audio_errors = check_ffmpeg(code, stderr, job, summary, params.audio_required)
        out = read_outputs(Path(tmp), summary["audio"] is not None)
    return assemble(job, params, summary, fps, size, out, audio_errors=len(audio_errors))


def _size_args(summary: dict) -> dict:
    video = summary["video"]
    return {k: video[k] for k in ("width", "height", "sar", "rotation")}


def check_ffmpeg(code: int, stderr: str, job: Job, summary: dict, audio_required: bool) -> list[str]:
    """A pass stopped from outside -> ffmpeg_killed or disk_full (what it left proves nothing about the
    file); decode errors in the kept stream -> corrupt_stream; a failed write -> disk_full, even with
    exit 0; any other failure -> ffmpeg_failed.

    Returns the decode errors of a video job's audio stream: ffmpeg fills the rejected packets with
    silence, so that audio is damaged (the job fails when audio is required; else it is dropped).
    """
    stopped = stopped_failure(code, "ffmpeg")
    if stopped is not None:
        raise stopped
    kept = summary["audio"]["index"] if job.audio_only else summary["video"]["index"]
    errors = decode_errors(stderr, kept)
    if errors:
        raise MediaFailure(CORRUPT_STREAM, f"{len(errors)} decode error(s): {errors[0]}")
    audio = None if job.audio_only else summary["audio"]
    audio_errors = [] if audio is None else decode_errors(stderr, audio["index"])
    if audio_errors and audio_required:
        raise MediaFailure(CORRUPT_STREAM, f"audio: {len(audio_errors)} decode error(s): {audio_errors[0]}")
    full = disk_full_failure(stderr)
    if full is not None:
        raise full
    if code != 0:
        detail = _stderr_summary(stderr.encode(), job.path, last=1) or f"ffmpeg exit {code}"
        raise MediaFailure(FFMPEG_FAILED, detail)
    return audio_errors


def stopped_failure(code: int, program: str) -> MediaFailure | None:
    """The reason of a process that did not finish on its own, from its exit status; None otherwise.

    Killed by SIGXFSZ (a file-size limit; Python ignores that signal, its children do not): disk_full.
    Stopped from outside (SIGKILL, SIGTERM, ...; ffmpeg exits 255 after catching one): ffmpeg_killed.
    Any other signal is a crash on this input (SIGSEGV, SIGABRT, ...): ffmpeg_crashed, a media reason.
    """
    if code == FFMPEG_SIGNAL_EXIT:
        return MediaFailure(FFMPEG_KILLED, f"{program} exit {code}: it caught a signal and stopped")
    if code >= 0:
        return None
    try:
        sig = signal.Signals(-code)
    except ValueError:
        return MediaFailure(FFMPEG_CRASHED, f"{program} killed by signal {-code}")
    detail = f"{program} killed by {sig.name} (exit {code})"
    if sig == signal.SIGXFSZ:
        return MediaFailure(DISK_FULL, f"{detail}: a file-size limit was reached")
    return MediaFailure(FFMPEG_KILLED if sig in STOP_SIGNALS else FFMPEG_CRASHED, detail)


def disk_full_failure(stderr: str) -> MediaFailure | None:
    """disk_full when a line of ffmpeg's stderr ends with a failed write's error, whatever its exit code."""
    for line in stderr.splitlines():
        if line.rstrip().endswith(tuple(f": {text}" for text in DISK_FULL_ERRORS)):
            return MediaFailure(DISK_FULL, line.strip()[:400])
    return None


def os_failure(exc: BaseException) -> MediaFailure | None:
    """disk_full or out_of_memory for an exception raised on this machine's limits; None for anything else."""
    if isinstance(exc, MemoryError):
        return MediaFailure(OUT_OF_MEMORY, f"MemoryError: {exc}" if str(exc) else "MemoryError")
    if isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS:
        return MediaFailure(DISK_FULL, f"{exc.strerror}: {exc.filename}" if exc.filename else str(exc))
    if isinstance(exc, OSError) and exc.errno == errno.ENOMEM:
        return MediaFailure(OUT_OF_MEMORY, str(exc))
    return None


def read_outputs(workdir: Path, has_audio_stream: bool) -> Transcoded:
    listing = workdir / SEGMENT_LIST
    audio = None
    if has_audio_stream:  # ffmpeg leaves no file when the stream never produced a sample
        path = workdir / AUDIO_FILE
        audio = np.fromfile(path, dtype="<f4") if path.exists() else np.zeros(0, np.float32)
    return Transcoded(
        segment_list=listing.read_text() if listing.exists() else "",
        segments={p.name: p.read_bytes() for p in sorted(workdir.glob("seg[0-9]*"))},
        audio=audio,
    )


def assemble(
    job: Job,
    params: ShardParams,
    summary: dict,
    fps: Fraction | None,
    size: tuple[int, int],
    out: Transcoded,
    audio_errors: int = 0,
) -> JobResult:
    """Judge the audio and the frame count, compute the mel and build the samples (no I/O).

    audio_errors: decode errors ffmpeg reported in a video job's audio stream; such audio is dropped.
    """
    audio = out.audio
    if audio is not None and audio.size == 0:
        if job.audio_only or params.audio_required:
            raise MediaFailure(NO_AUDIO, "the audio stream decoded to no samples")
        audio = None
    level = None if audio is None else rms_dbfs(audio)
    silent = level is not None and level < SILENCE_DBFS
    if silent and params.audio_required:
        raise MediaFailure(SILENT_AUDIO, f"RMS {level:.1f} dBFS is below {SILENCE_DBFS:g} dBFS")
    has_audio = audio is not None and not silent and not audio_errors
    meta = {
        "source": {"path": job.path, **summary},
        "has_audio": has_audio,
        "audio_silent": None if audio is None else silent,
        "audio_rms_dbfs": None if level is None or not math.isfinite(level) else round(level, 2),
        "audio_samples": 0 if audio is None else int(audio.size),
        "audio_decode_errors": audio_errors,
        "trim": None if job.start is None and job.end is None else [job.start, job.end],
    }

    if job.audio_only:
        if meta["audio_samples"] < fmt.HOP_LENGTH:
            raise MediaFailure(TOO_SHORT, f"{meta['audio_samples']} audio samples")
        meta.update(duration_s=meta["audio_samples"] / params.sample_rate, frames=0, num_segments=1)
        mel = log_mel(audio, params.sample_rate) if has_audio else None
        samples = build_samples(job, [], [], [], None, mel, meta, params)
    else:
        if fps is None:
            raise ValueError("a video job needs its output frame rate")
        names, starts, counts = segment_counts(out.segment_list, fps, params.segment_frames)
        frames = sum(counts)
        if frames == 0:
            trimmed = " in the trimmed range" if meta["trim"] else ""
            raise MediaFailure(TOO_SHORT, f"no video frame decoded{trimmed}")
        if frames == 1:
            raise MediaFailure(NOT_A_VIDEO, f"a single {summary['video']['codec']} frame")
        if frames < params.min_frames:
            raise MediaFailure(TOO_SHORT, f"{frames} frames at {fps} fps, fewer than {params.min_frames}")
        meta.update(
            duration_s=float(frames / fps),
            frames=frames,
            fps=_fraction_text(fps),
            width=size[0],
            height=size[1],
            num_segments=len(names),
        )
        missing = [name for name in names if name not in out.segments]
        if missing:
            raise MediaFailure(FFMPEG_FAILED, f"segment {missing[0]} is listed but was not written")
        mel = log_mel(audio, params.sample_rate) if has_audio else None
        segments = [out.segments[name] for name in names]
        samples = build_samples(job, segments, starts, counts, fps, mel, meta, params)
    meta["bytes"] = sum(len(data) for sample in samples for _, data in sample)
    return JobResult(ok=True, samples=samples, meta=meta)


def _stderr_summary(stderr: bytes, path: str, last: int = 3) -> str:
    """ffmpeg's last stderr lines on one line, without the file path and addresses it repeats."""
    lines = [line.strip() for line in stderr.decode("utf-8", "replace").splitlines() if line.strip()]
    cleaned = []
    for line in lines[-last:]:
        for prefix in (f"{path}: ", f"{os.path.abspath(path)}: "):
            if line.startswith(prefix):
                line = line[len(prefix) :]
        cleaned.append(re.sub(r" @ 0x[0-9a-f]+\]", "]", line))
    return "; ".join(cleaned)[:400]
