"""The shard format: member names, mel parameters and the frame <-> time mapping, shared by writer and loader.

Every constant a loader relies on lives here; `docs/shard-format.md` explains them.

A *video* is stored as consecutive *segments* of at most `segment_frames` frames (default 64).
Each segment is one WebDataset sample. DALI's CPU video decoder cannot seek, so decoding a clip
costs every frame before it inside its file: short segments bound that cost.

Members of a sample with key K:
  K.webm      VP9 segment (or K.mp4 with --codec h264); absent for audio-only sets
  K.mel.npy   float16 log-mel, shape (N_MELS, mel_frames), npy v1.0; covers
              [segment start - MEL_PAD_SECONDS, segment end + MEL_PAD_SECONDS]
  K.info.npy  int64 vector, fields INFO_FIELDS (DALI reads it without a JSON parser)
  K.json      metadata of the source video and this segment
  K.cls       class index as ASCII text (only when the label is known)
  K.labels.npy  int64 vector of the video's class indices, sorted (multi-label sets only: AudioSet)
"""

from __future__ import annotations

import io
import math
import re
from collections.abc import Sequence
from fractions import Fraction

import numpy as np

# --- audio / mel -----------------------------------------------------------------------------
SAMPLE_RATE = 16_000  # Hz, mono
N_MELS = 40
HOP_LENGTH = 320  # samples: 20 ms, so 50 mel frames per second
WIN_LENGTH = 400  # samples: 25 ms Hann window
N_FFT = 512
FMIN = 0.0
FMAX = 8_000.0
MEL_FPS = SAMPLE_RATE // HOP_LENGTH  # 50 mel frames per second
TOP_DB_FLOOR = -100.0  # log-mel value of digital silence: 10*log10(amin=1e-10)
WINDOW_SECONDS = 2.0
WINDOW_FRAMES = int(WINDOW_SECONDS * MEL_FPS)  # 100: the audio encoder's input width
MEL_PAD_SECONDS = WINDOW_SECONDS / 2
MEL_PAD_FRAMES = int(MEL_PAD_SECONDS * MEL_FPS)  # 50 stored mel frames before the segment start

# --- video -----------------------------------------------------------------------------------
DEFAULT_SEGMENT_FRAMES = 64
DEFAULT_GOP = 16
DEFAULT_SHORT_SIDE = 256

# --- members ---------------------------------------------------------------------------------
MEL_EXT = "mel.npy"
INFO_EXT = "info.npy"
META_EXT = "json"
CLS_EXT = "cls"
LABELS_EXT = "labels.npy"
VIDEO_EXTS = {"vp9": "webm", "h264": "mp4"}
# Member order inside a sample: fixed, so tars are byte-identical across runs. The label list follows the
# info member, so a reader of both (`trainer.extract.read_catalog`) reads adjacent bytes.
MEMBER_ORDER = (CLS_EXT, INFO_EXT, LABELS_EXT, META_EXT, MEL_EXT, "mp4", "webm")

INFO_FIELDS = (
    "video",  # global index of the source video within its shard set
    "segment",  # index of this segment within the video
    "num_segments",  # segments of the video
    "start_frame",  # first frame of this segment within the video
    "num_frames",  # frames in this segment
    "video_frames",  # frames in the whole video
    "fps_num",  # frame rate of the stored video, as a fraction
    "fps_den",
    "label",  # class index, -1 when unknown
    "has_audio",  # 1 when the source had a non-silent, undamaged audio track
    "mel_frames",  # width of the stored mel
)
INFO = {name: i for i, name in enumerate(INFO_FIELDS)}


def encode_info(**fields: int) -> bytes:
    """The `info.npy` member: int64 vector in INFO_FIELDS order."""
    missing = set(INFO_FIELDS) - set(fields)
    extra = set(fields) - set(INFO_FIELDS)
    if missing or extra:
        raise ValueError(f"info fields: missing {sorted(missing)}, unknown {sorted(extra)}")
    return npy_bytes(np.array([int(fields[name]) for name in INFO_FIELDS], dtype=np.int64))


def decode_info(data: bytes | np.ndarray) -> dict[str, int]:
    arr = decode_int64_vector(bytes(data)) if isinstance(data, (bytes, bytearray)) else np.asarray(data)
    return {name: int(arr[i]) for i, name in enumerate(INFO_FIELDS)}


def encode_labels(class_indices: Sequence[int]) -> bytes:
    """The `labels.npy` member: the video's class indices, int64, sorted and distinct, npy v1.0."""
    labels = np.asarray(class_indices, dtype=np.int64).reshape(-1)
    if labels.size == 0 or (labels < 0).any() or (np.diff(labels) <= 0).any():
        raise ValueError(f"labels must be a non-empty increasing list of indices >= 0, got {labels.tolist()}")
    return npy_bytes(labels)


def decode_labels(data: bytes) -> np.ndarray:
    """The class indices of a `labels.npy` member as an int64 vector."""
    return decode_int64_vector(data).reshape(-1)


_INT64_VECTOR_HEADER = re.compile(rb"\{'descr': '<i8', 'fortran_order': False, 'shape': \((\d+),\), \} *\n")


def decode_int64_vector(data: bytes) -> np.ndarray:
    """An int64 npy vector (`info.npy`, `labels.npy`) as a writable array.

    The header numpy writes for such a vector is matched as bytes: a catalog reads two of these per
    sample, and np.load, which parses the header with ast.literal_eval, takes about 20x longer
    (67 us against 3.4 us a member, measured). Any other npy goes through np.load (ValueError when it
    is not an array file).
    """
    if data[:8] == b"\x93NUMPY\x01\x00":
        end = 10 + int.from_bytes(data[8:10], "little")
        match = _INT64_VECTOR_HEADER.fullmatch(data, 10, end)
        if match is not None:
            return np.frombuffer(data, dtype="<i8", count=int(match.group(1)), offset=end).astype(np.int64)
    return np.asarray(np.load(io.BytesIO(data), allow_pickle=False), dtype=np.int64)


def npy_bytes(arr: np.ndarray) -> bytes:
    """Serialise as npy format v1.0 (the only version DALI's numpy decoder accepts)."""
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.ascontiguousarray(arr), version=(1, 0), allow_pickle=False)
    return buf.getvalue()


def segment_mel_frames(num_frames: int, fps: Fraction) -> int:
    """Width of a segment's stored mel: its duration in mel frames plus both pads."""
    return math.ceil(num_frames / fps * MEL_FPS) + 2 * MEL_PAD_FRAMES


def segment_mel_origin(start_frame: int, fps: Fraction) -> int:
    """Index, in the whole video's mel, of the first stored mel frame of a segment.

    Video frame f starts at time f/fps; mel frame j (librosa, center=True) is centred at j/MEL_FPS.
    The origin is rounded to the nearest mel frame, so audio and video agree within 10 ms.
    """
    return round(start_frame / fps * MEL_FPS) - MEL_PAD_FRAMES


def clip_mel_start(
    clip_start: int,
    clip_span: int,
    fps: Fraction | float,
    *,
    segment_start: int,
    video_frames: int,
    mel_frames: int,
) -> int:
    """Start column, in a segment's stored mel, of the WINDOW_FRAMES audio window of a clip.

    `clip_start` is the clip's first frame within the segment, `clip_span` the frames it covers
    (`length * stride`), `segment_start` the segment's first frame in the video, `mel_frames` the
    width of its stored mel. The window is centred on the clip's centre time tc (with the stored pad
    of MEL_PAD_FRAMES it starts at round(tc * MEL_FPS), ties to even), then shifted to lie inside the
    video and the stored mel where both are at least a window long: a clip within 1 s of either end
    hears the video's audio rather than a pad of silence, which would otherwise be the strongest
    thing an audio encoder sees (the digits set: 9x the feature spread of centred windows), and a
    clip shorter than the window stays inside it. A shorter video keeps the centred, padded window.
    """
    fps = Fraction(fps)
    centred = round(Fraction(2 * clip_start + clip_span) * MEL_FPS / (2 * fps))
    origin = -segment_mel_origin(segment_start, fps)  # column of time 0
    end = origin + round(Fraction(video_frames) * MEL_FPS / fps)  # column of the video's end
    lo, hi = max(origin, 0), min(end, mel_frames) - WINDOW_FRAMES
    return min(max(centred, lo), hi) if lo <= hi else centred


_SLUG = re.compile(r"[^A-Za-z0-9_-]+")
_MEDIA_SUFFIX = re.compile(r"\.[A-Za-z0-9]{2,5}(?=$|#)")


def make_key(video: int, name: str, segment: int) -> str:
    """Sample key: no dots (WebDataset splits the extension at the first dot), unique by index.

    The slug of the relative name (extension dropped) is only for people reading keys.
    """
    slug = _SLUG.sub("_", _MEDIA_SUFFIX.sub("", name)).strip("_")[:60] or "x"
    return f"v{video:08d}_{slug}_s{segment:03d}"


def parse_fps(text: str | None) -> Fraction | None:
    """ffprobe's 'num/den' rate as a Fraction; None when absent or zero."""
    if not text or text in ("0/0", "0/1", "N/A"):
        return None
    try:
        value = Fraction(text)
    except (ValueError, ZeroDivisionError):
        return None
    return value if value > 0 else None
