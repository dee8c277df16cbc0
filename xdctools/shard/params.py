"""Per-file transcoding parameters of `xdctools shard`, validated once and recorded in dataset.json."""

from __future__ import annotations

from dataclasses import dataclass, fields
from fractions import Fraction

from xdctools.errors import ConfigError
from xdctools.shard import format as fmt

CODECS = ("vp9", "h264")
DEFAULT_CRF = {"vp9": 32, "h264": 23}
MAX_FPS = 240
OPERATIONAL = ("ffmpeg_threads", "timeout_s")  # how a file is processed, not what comes out


@dataclass(frozen=True)
class ShardParams:
    """How every input is re-encoded; `crf=None` picks the codec's default (vp9 32, h264 23).

    `fps=None` keeps the source's average rate (made constant). `speed` is libvpx's `-cpu-used`
    (realtime deadline); libx264 uses `-preset veryfast` and ignores it. `min_frames` is the length of
    the shortest usable video: one training clip.
    """

    codec: str = "vp9"
    short_side: int = fmt.DEFAULT_SHORT_SIDE
    fps: Fraction | None = None
    gop: int = fmt.DEFAULT_GOP
    segment_frames: int = fmt.DEFAULT_SEGMENT_FRAMES
    crf: int | None = None
    speed: int = 8
    ffmpeg_threads: int = 1
    audio_required: bool = False
    min_frames: int = 8
    sample_rate: int = fmt.SAMPLE_RATE
    timeout_s: float = 600.0

    def __post_init__(self) -> None:
        if self.codec not in CODECS:
            raise ConfigError(f"codec: {self.codec!r} is not one of {', '.join(CODECS)}")
        _positive_int("short_side", self.short_side)
        if self.short_side % 2:
            raise ConfigError(f"short_side: {self.short_side} must be even (4:2:0 needs even dimensions)")
        if self.fps is not None:
            try:  # a float goes through its shortest repr: 29.97 -> 2997/100, not a binary fraction
                rate = Fraction(repr(self.fps) if isinstance(self.fps, float) else self.fps)
            except (TypeError, ValueError, ZeroDivisionError):
                raise ConfigError(f"fps: {self.fps!r} is not a number or a fraction 'num/den'") from None
            if not 0 < rate <= MAX_FPS:
                raise ConfigError(f"fps: {self.fps} must be in (0, {MAX_FPS}]")
            object.__setattr__(self, "fps", rate)
        _positive_int("gop", self.gop)
        _positive_int("segment_frames", self.segment_frames)
        if self.segment_frames % self.gop:
            raise ConfigError(
                f"segment_frames: {self.segment_frames} must be a multiple of gop ({self.gop}), "
                "so every segment starts on a keyframe"
            )
        if self.crf is None:
            object.__setattr__(self, "crf", DEFAULT_CRF[self.codec])
        high = 63 if self.codec == "vp9" else 51
        if not isinstance(self.crf, int) or not 0 <= self.crf <= high:
            raise ConfigError(f"crf: {self.crf!r} must be an integer in [0, {high}] for {self.codec}")
        if not isinstance(self.speed, int) or not 0 <= self.speed <= 8:
            raise ConfigError(f"speed: {self.speed!r} must be an integer in [0, 8] (libvpx -cpu-used)")
        _positive_int("ffmpeg_threads", self.ffmpeg_threads)
        if not isinstance(self.audio_required, bool):
            raise ConfigError(f"audio_required: {self.audio_required!r} must be true or false")
        _positive_int("min_frames", self.min_frames)
        if self.min_frames > self.segment_frames:
            raise ConfigError(
                f"min_frames: {self.min_frames} exceeds segment_frames ({self.segment_frames}); "
                "a clip must fit in one segment"
            )
        if self.sample_rate != fmt.SAMPLE_RATE:
            raise ConfigError(
                f"sample_rate: {self.sample_rate} Hz is not supported; the mel parameters of the shard "
                f"format assume {fmt.SAMPLE_RATE} Hz"
            )
        if (
            not isinstance(self.timeout_s, (int, float))
            or isinstance(self.timeout_s, bool)
            or self.timeout_s <= 0
        ):
            raise ConfigError(f"timeout_s: {self.timeout_s!r} must be a positive number of seconds")

    @property
    def video_ext(self) -> str:
        return fmt.VIDEO_EXTS[self.codec]

    def to_dict(self, output_only: bool = False) -> dict:
        """JSON-able, key-ordered; `output_only` drops threads and timeout, which never change the output."""
        out: dict = {}
        for f in fields(self):
            if output_only and f.name in OPERATIONAL:
                continue
            value = getattr(self, f.name)
            out[f.name] = f"{value.numerator}/{value.denominator}" if isinstance(value, Fraction) else value
        return dict(sorted(out.items()))


def _positive_int(name: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"{name}: {value!r} must be a positive integer")
