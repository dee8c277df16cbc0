"""Synthetic audio-visual collections: classes where a visual pattern and a sound co-occur, as real MP4 files.

Each class c pairs a shape, a motion and a hue with a tone (frequency, timbre, rhythm); the shape's
brightness follows the tone's rhythm, so the two modalities are also synchronous. Nuisance drawn per
video (background colour, gradient and noise, position, size, speed, orientation, amplitude, phase,
detune, a flickering distractor square, a distractor beep, background hiss) keeps a class from being
one constant clip, while hue and tone frequency keep it learnable from either modality by a tiny model.

Generators (`render_video`, `render_flash_click`) are pure numpy; `encode_mp4` is the only function
that runs ffmpeg, and `synthesize` writes a class-folder tree `DIR/<class>/<name>.mp4` + `DIR/synth.json`.
"""

from __future__ import annotations

import colorsys
import json
import math
import multiprocessing
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path

import ffmpeg
import numpy as np

from xdctools.atomic import write_text_atomic
from xdctools.errors import DependencyError, InputError, XdcError

SHAPES = ("circle", "square", "triangle", "cross", "ring", "star")
MOTIONS = ("horizontal", "vertical", "orbit", "diagonal", "zigzag", "pulse")
TIMBRES = ("sine", "square", "saw")
RHYTHMS_HZ = (0.0, 2.0, 4.0)  # tone gating rate; 0 = continuous
TONE_RANGE_HZ = (300.0, 3000.0)  # class tones are log-spaced over this range
MAX_CLASSES = 32
SYNTH_VERSION = 1  # bump when the generator's output changes for a given seed

# Harmonic weights (fundamental first): the fundamental always dominates the spectrum.
_HARMONICS = {
    "sine": (1.0,),
    "square": (1.0, 0.0, 1 / 3, 0.0, 1 / 5),
    "saw": (1.0, 1 / 2, 1 / 3, 1 / 4),
}


@dataclass(frozen=True)
class ClassSpec:
    """What defines class `index`: the visual pattern and the sound that co-occur."""

    index: int
    name: str
    shape: str
    motion: str
    hue: float  # HSV hue in [0, 1)
    hue_jitter: float  # per-video hue offset allowed: a third of the gap to the next class hue
    tone_hz: float
    timbre: str
    rhythm_hz: float
    max_detune: float  # relative tone detune allowed per video: half the gap to the next class, /3


def class_specs(num_classes: int) -> list[ClassSpec]:
    """Class c: shape, motion, hue and tone; names sort in index order (`c00-circle-300hz`, ...)."""
    if not 1 <= num_classes <= MAX_CLASSES:
        raise ValueError(f"num_classes must be in 1..{MAX_CLASSES}, got {num_classes}")
    lo, hi = TONE_RANGE_HZ
    step = (hi / lo) ** (1 / (num_classes - 1)) if num_classes > 1 else 2.0
    specs = []
    for c in range(num_classes):
        shape = SHAPES[c % len(SHAPES)]
        motion = MOTIONS[(c + c // len(SHAPES)) % len(MOTIONS)]
        tone = lo * step**c if num_classes > 1 else math.sqrt(lo * hi)
        specs.append(
            ClassSpec(
                index=c,
                name=f"c{c:02d}-{shape}-{round(tone)}hz",
                shape=shape,
                motion=motion,
                hue=c / num_classes,
                hue_jitter=1 / (3 * num_classes),
                tone_hz=float(tone),
                timbre=TIMBRES[(c // 2) % len(TIMBRES)],
                rhythm_hz=RHYTHMS_HZ[c % len(RHYTHMS_HZ)],
                max_detune=min(0.03, (math.sqrt(step) - 1) / 3),
            )
        )
    return specs


# --- pure generators ---------------------------------------------------------------------------


def _shape_norm(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """A norm that is <= 1 inside the shape (u, v in units of the shape's radius)."""
    au, av = np.abs(u), np.abs(v)
    if shape == "circle":
        return np.hypot(u, v)
    if shape == "square":
        return np.maximum(au, av) / 0.8
    if shape == "star":  # five rounded points
        return np.hypot(u, v) / (0.7 + 0.3 * np.cos(5 * np.arctan2(u, -v)))
    if shape == "cross":
        return np.minimum(np.maximum(au / 0.3, av), np.maximum(au, av / 0.3))
    if shape == "ring":
        rho = np.maximum(np.hypot(u, v), 1e-6)
        return np.maximum(rho, 0.55 / rho)
    if shape == "triangle":  # equilateral, apex up, circumradius 1
        n = [(0.0, 1.0), (-math.sqrt(3) / 2, -0.5), (math.sqrt(3) / 2, -0.5)]
        return np.max(np.stack([(a * u + b * v) / 0.5 for a, b in n]), axis=0)
    raise ValueError(f"unknown shape {shape!r}")


def _trajectory(motion: str, t: np.ndarray, rng: np.random.Generator, w: int, h: int, r: float):
    """Centre (x, y) in pixels and a radius scale, each of shape (T,)."""
    speed = rng.uniform(0.25, 0.7)  # oscillations per second
    phase = rng.uniform(0, 2 * math.pi)
    reach_x, reach_y = w / 2 - r - 2, h / 2 - r - 2  # keep the shape inside the frame
    ax, ay = reach_x * rng.uniform(0.6, 1.0), reach_y * rng.uniform(0.6, 1.0)
    cx = w / 2 + rng.uniform(-1, 1) * (reach_x - ax)
    cy = h / 2 + rng.uniform(-1, 1) * (reach_y - ay)
    s = np.sin(2 * math.pi * speed * t + phase)
    c = np.cos(2 * math.pi * speed * t + phase)
    ones = np.ones_like(t)
    if motion == "horizontal":
        return cx + ax * s, cy * ones, ones
    if motion == "vertical":
        return cx * ones, cy + ay * s, ones
    if motion == "orbit":
        return cx + ax * c, cy + ay * s, ones
    if motion == "diagonal":
        sign = rng.choice([-1.0, 1.0])
        return cx + ax * s, cy + sign * ay * s, ones
    if motion == "zigzag":
        tri = 2 / math.pi * np.arcsin(s)  # triangle wave in [-1, 1]
        return cx + ax * tri, cy + 0.5 * ay * np.sign(np.sin(2 * math.pi * 3 * speed * t + phase)), ones
    if motion == "pulse":
        return cx * ones, cy * ones, 1 + 0.35 * s
    raise ValueError(f"unknown motion {motion!r}")


def _gate(t: np.ndarray, rate_hz: float, phase: float) -> np.ndarray:
    """Smooth on/off envelope in [0, 1] at `rate_hz` (all ones when 0): the class rhythm."""
    if rate_hz <= 0:
        return np.ones_like(t)
    return 0.5 * (1 + np.tanh(6 * np.sin(2 * math.pi * rate_hz * t + phase)))


def _tone(t: np.ndarray, freq: float, timbre: str, phase: float, sample_rate: int) -> np.ndarray:
    """Unit-peak-bounded harmonic tone; harmonics at or above 0.95 * Nyquist are left out (no aliasing)."""
    weights = _HARMONICS[timbre]
    out = np.zeros_like(t)
    total = 0.0
    for k, wk in enumerate(weights, start=1):
        if wk == 0 or k * freq >= 0.95 * sample_rate / 2:
            continue
        out += wk * np.sin(2 * math.pi * k * freq * t + k * phase)
        total += wk
    return out / total


def _num_frames(seconds: float, fps: float) -> int:
    return max(1, round(seconds * fps))


def _render_audio(
    cls: ClassSpec, rng: np.random.Generator, t: np.ndarray, seconds: float, sample_rate: int
) -> tuple[np.ndarray, float]:
    """Tone under its rhythm, stray beep and hiss, in [-1, 1]; and the rhythm phase the shape shares."""
    amp = rng.uniform(0.25, 0.6)
    tone_phase = rng.uniform(0, 2 * math.pi)
    detune = 1 + rng.uniform(-1, 1) * cls.max_detune
    rhythm_phase = rng.uniform(0, 2 * math.pi)
    hiss = rng.uniform(0.02, 0.1)
    has_beep = rng.random() < 0.7
    beep_hz = math.exp(rng.uniform(math.log(200.0), math.log(4000.0)))
    beep_len = rng.uniform(0.15, 0.4)
    beep_at = rng.uniform(0, max(seconds - beep_len, 0.0))
    beep_amp = rng.uniform(0.2, 0.35)

    audio = amp * _gate(t, cls.rhythm_hz, rhythm_phase)
    audio = audio * _tone(t, cls.tone_hz * detune, cls.timbre, tone_phase, sample_rate)
    if has_beep:
        inside = (t >= beep_at) & (t < beep_at + beep_len)
        ramp = np.sin(math.pi * np.clip((t - beep_at) / beep_len, 0, 1))  # no clicks at the edges
        audio += inside * ramp * beep_amp * amp * np.sin(2 * math.pi * beep_hz * t)
    audio += amp * hiss * rng.standard_normal(len(t))
    return np.clip(audio, -1, 1).astype(np.float32), rhythm_phase


def _background(rng: np.random.Generator, nt: int, xx: np.ndarray, yy: np.ndarray) -> np.ndarray:
    """(T, H, W, 3) float32 dark colour, gradient and grey noise, so scenes differ by video and frame."""
    h, w = xx.shape
    bg = rng.uniform(0, 90, size=3)
    grad = rng.uniform(-20, 20, size=2)
    noise_sigma = rng.uniform(0, 5)  # grey (luma) noise, new every frame
    gradient = grad[0] * (xx / w - 0.5) + grad[1] * (yy / h - 0.5)
    frames = np.empty((nt, h, w, 3), dtype=np.float32)
    frames[:] = (bg[None, None, :] + gradient[..., None]).astype(np.float32)
    frames += noise_sigma * rng.standard_normal((nt, h, w, 1), dtype=np.float32)
    return frames


def _draw_distractor(frames: np.ndarray, rng: np.random.Generator, t: np.ndarray) -> None:
    """A square blinking in most videos: motion and colour that say nothing about the class."""
    if rng.random() < 0.7:
        h, w = frames.shape[1:3]
        side = int(rng.integers(6, 13))
        fx, fy = int(rng.integers(0, w - side)), int(rng.integers(0, h - side))
        colour = rng.uniform(60, 255, size=3).astype(np.float32)
        blink = np.sin(2 * math.pi * rng.uniform(1, 6) * t + rng.uniform(0, 2 * math.pi)) > 0
        frames[blink, fy : fy + side, fx : fx + side, :] = colour


def _draw_shape(
    frames: np.ndarray,
    cls: ClassSpec,
    rng: np.random.Generator,
    t: np.ndarray,
    rhythm_phase: float,
    xx: np.ndarray,
    yy: np.ndarray,
) -> None:
    """The class's visual half: its shape in its hue, moving, spinning, pulsing on the tone's rhythm."""
    h, w = xx.shape
    radius = min(w, h) * rng.uniform(0.12, 0.2)
    hue = (cls.hue + rng.uniform(-1, 1) * cls.hue_jitter) % 1.0  # within the class's share of the wheel
    rgb = np.array(colorsys.hsv_to_rgb(hue, rng.uniform(0.75, 1.0), rng.uniform(0.85, 1.0))) * 255
    angle0 = rng.uniform(0, 2 * math.pi)
    spin = rng.uniform(-1.5, 1.5)  # radians per second
    x, y, scale = _trajectory(cls.motion, t, rng, w, h, radius * 1.35)
    brightness = 0.55 + 0.45 * _gate(t, cls.rhythm_hz, rhythm_phase)
    for i in range(len(t)):
        r = radius * scale[i]
        # Only the shape's bounding box is drawn: the norm is > 1 outside a radius of r.
        x0, x1 = max(0, int(x[i] - r - 2)), min(w, int(x[i] + r + 3))
        y0, y1 = max(0, int(y[i] - r - 2)), min(h, int(y[i] + r + 3))
        if x0 >= x1 or y0 >= y1:
            continue
        a = angle0 + spin * t[i]
        dx, dy = (xx[y0:y1, x0:x1] - x[i]) / r, (yy[y0:y1, x0:x1] - y[i]) / r
        u = math.cos(a) * dx + math.sin(a) * dy
        v = -math.sin(a) * dx + math.cos(a) * dy
        alpha = np.clip((1 - _shape_norm(cls.shape, u, v)) * r + 0.5, 0, 1)[..., None]  # ~1 px soft edge
        box = frames[i, y0:y1, x0:x1]
        box += (rgb * brightness[i]).astype(np.float32) * alpha - box * alpha


def render_video(
    cls: ClassSpec,
    rng: np.random.Generator,
    *,
    seconds: float = 4.0,
    fps: float = 25.0,
    size: tuple[int, int] = (160, 120),
    sample_rate: int = 16_000,
) -> tuple[np.ndarray, np.ndarray]:
    """One video of class `cls`: frames uint8 (T, H, W, 3) RGB, T = round(seconds*fps); audio float32
    (round(seconds*sample_rate),) mono in [-1, 1]. All nuisance comes from `rng`, in a fixed order."""
    w, h = size
    t_frames = np.arange(_num_frames(seconds, fps), dtype=np.float64) / fps
    t_audio = np.arange(max(1, round(seconds * sample_rate)), dtype=np.float64) / sample_rate
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)

    # Audio nuisance first (the shared rhythm phase among it), then the visual nuisance.
    audio, rhythm_phase = _render_audio(cls, rng, t_audio, seconds, sample_rate)
    frames = _background(rng, len(t_frames), xx, yy)
    _draw_distractor(frames, rng, t_frames)
    _draw_shape(frames, cls, rng, t_frames, rhythm_phase, xx, yy)
    return np.clip(np.rint(frames), 0, 255).astype(np.uint8), audio


def render_flash_click(
    flash_time: float,
    *,
    seconds: float = 4.0,
    fps: float = 25.0,
    size: tuple[int, int] = (160, 120),
    sample_rate: int = 16_000,
    flash_frames: int = 3,
    click_seconds: float = 0.01,
) -> tuple[np.ndarray, np.ndarray]:
    """Dark frames except white frames [round(flash_time*fps), +flash_frames); silence except a
    `click_seconds` 1 kHz burst starting at sample round(flash_time*sample_rate). Shapes as render_video."""
    w, h = size
    nt = _num_frames(seconds, fps)
    ns = max(1, round(seconds * sample_rate))
    first = round(flash_time * fps)
    if not 0 <= first < nt or flash_time + click_seconds > seconds:
        raise ValueError(f"flash_time {flash_time} s is outside the {seconds} s video")
    frames = np.full((nt, h, w, 3), 16, dtype=np.uint8)
    frames[first : first + flash_frames] = 255
    audio = np.zeros(ns, dtype=np.float32)
    start = round(flash_time * sample_rate)
    n = max(1, round(click_seconds * sample_rate))
    t = np.arange(n) / sample_rate
    audio[start : start + n] = (0.9 * np.hanning(n) * np.sin(2 * math.pi * 1000.0 * t)).astype(np.float32)
    return frames, audio


# --- I/O ---------------------------------------------------------------------------------------


def _fps_text(fps: float) -> str:
    frac = Fraction(str(fps)).limit_denominator(1001)
    return f"{frac.numerator}/{frac.denominator}"


def encode_mp4(path: Path, frames: np.ndarray, audio: np.ndarray, *, fps: float, sample_rate: int) -> None:
    """H.264 (yuv420p, GOP 16) + AAC mono MP4 written by one ffmpeg call, atomically (temp + rename).

    Bit-exact flags, no metadata and one encoder thread: the same arrays give the same bytes.
    """
    path = Path(path)
    h, w = frames.shape[1:3]
    if w % 2 or h % 2:
        raise ValueError(f"frame size {w}x{h} must be even (4:2:0)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = str(path.with_name(f".{path.name}.{os.getpid()}.partial"))  # hidden, not a video name
    audio_tmp = tmp + ".f32"
    try:
        np.ascontiguousarray(audio, dtype="<f4").tofile(audio_tmp)
        video_in = ffmpeg.input(
            "pipe:", format="rawvideo", pix_fmt="rgb24", s=f"{w}x{h}", framerate=_fps_text(fps)
        )
        audio_in = ffmpeg.input(audio_tmp, format="f32le", ar=sample_rate, ac=1)
        out = ffmpeg.output(
            video_in.video,
            audio_in.audio,
            tmp,
            format="mp4",
            vcodec="libx264",
            pix_fmt="yuv420p",
            preset="ultrafast",
            crf=20,
            g=16,
            threads=1,
            acodec="aac",
            audio_bitrate="96k",
            ar=sample_rate,
            ac=1,
            map_metadata=-1,
            fflags="+bitexact",
            **{"flags:v": "+bitexact", "flags:a": "+bitexact"},
        )
        try:
            out.overwrite_output().global_args("-nostdin", "-loglevel", "error").run(
                input=np.ascontiguousarray(frames, dtype=np.uint8).tobytes(),
                capture_stdout=True,
                capture_stderr=True,
            )
        except FileNotFoundError as exc:
            raise DependencyError(
                "ffmpeg not found on PATH: install it (e.g. apt-get install ffmpeg)"
            ) from exc
        except ffmpeg.Error as exc:
            msg = exc.stderr.decode(errors="replace").strip().splitlines()
            raise XdcError(f"{path}: ffmpeg failed: {msg[-1] if msg else 'no message'}") from exc
        os.replace(tmp, path)
    finally:
        for leftover in (tmp, audio_tmp):
            if os.path.exists(leftover):
                os.remove(leftover)


def write_flash_click(
    path: str | os.PathLike,
    flash_time: float,
    *,
    seconds: float = 4.0,
    fps: float = 25.0,
    size: tuple[int, int] = (160, 120),
    sample_rate: int = 16_000,
    flash_frames: int = 3,
) -> Path:
    """Write the flash/click alignment video (see `render_flash_click`) as MP4; returns the path."""
    frames, audio = render_flash_click(
        flash_time, seconds=seconds, fps=fps, size=size, sample_rate=sample_rate, flash_frames=flash_frames
    )
    encode_mp4(Path(path), frames, audio, fps=fps, sample_rate=sample_rate)
    return Path(path)


@dataclass(frozen=True)
class SynthParams:
    """Everything that decides the collection's content: same params, same files."""

    classes: int = 6
    per_class: int = 8
    seconds: float = 4.0
    fps: float = 25.0
    size: tuple[int, int] = (160, 120)
    sample_rate: int = 16_000
    seed: int = 0

    def validate(self) -> None:
        w, h = self.size
        checks = [
            (1 <= self.classes <= MAX_CLASSES, f"classes must be in 1..{MAX_CLASSES}"),
            (self.per_class >= 1, "per_class must be >= 1"),
            (self.seed >= 0, "seed must be >= 0"),
            (self.seconds > 0, "seconds must be > 0"),
            (0 < self.fps <= 240, "fps must be in (0, 240]"),
            (w >= 32 and h >= 32 and w % 2 == 0 and h % 2 == 0, "size must be even and at least 32x32"),
            (8_000 <= self.sample_rate <= 48_000, "sample_rate must be in 8000..48000"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(f"{msg} (got {self})")


@dataclass(frozen=True)
class SynthResult:
    """Where the collection is and what this call did."""

    root: Path
    files: list[Path]  # every video of the collection, in (class, index) order
    written: int  # videos encoded by this call (the others were already there)


def video_name(cls: ClassSpec, i: int) -> str:
    """Short (it becomes part of the shard key) and unique across classes."""
    return f"c{cls.index:02d}_{i:04d}.mp4"


def describe(params: SynthParams, complete: bool = True) -> dict:
    """The `synth.json` document: parameters, classes, and every file (relative path, class)."""
    specs = class_specs(params.classes)
    return {
        "generator": "xdctools synth",
        "version": SYNTH_VERSION,
        "complete": complete,  # false while the files are being written
        "params": {**asdict(params), "size": list(params.size)},
        "classes": [asdict(s) for s in specs],
        "files": [
            {"path": f"{s.name}/{video_name(s, i)}", "class": s.name, "class_index": s.index}
            for s in specs
            for i in range(params.per_class)
        ],
    }


def check_output_root(root: Path, meta: Path, doc: dict, *, keys: Sequence[str], other: str) -> None:
    """`root` is absent, empty, or holds a `meta` whose `keys` equal `doc`'s (an interrupted run to finish).

    InputError otherwise; `other` says what a mismatching `meta` holds ("a synth collection with ...").
    """
    if root.exists() and not root.is_dir():
        raise InputError(f"{root}: exists and is not a folder")
    if meta.exists():
        try:
            old = json.loads(meta.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise InputError(f"{meta}: unreadable ({exc})") from exc
        doc = json.loads(json.dumps(doc))  # tuples as lists, as read back
        if not all(old.get(k) == doc[k] for k in keys):
            raise InputError(f"{root}: holds {other}; choose an empty folder")
    elif root.exists() and any(root.iterdir()):
        raise InputError(f"{root}: folder is not empty and holds no {meta.name}; choose an empty folder")


def make_missing(
    jobs: Sequence[tuple],
    make_one: Callable[[tuple], Path],
    *,
    workers: int = 1,
    progress: Callable[[Path], None] | None = None,
    chunksize: int = 1,
) -> int:
    """Run `make_one(job)` for each job whose output file (`job[0]`) is missing; returns how many ran.

    `make_one` is a module-level function (worker processes are spawned, so it must pickle) that
    writes `job[0]` and returns it. `progress` is called once per file: first for those already
    present, then for each as it is made, in job order.
    """
    files = [job[0] for job in jobs]
    pending = [job for job in jobs if not job[0].exists()]
    for f in files:
        if f.exists() and progress:
            progress(f)
    if workers <= 1 or len(pending) <= 1:
        for job in pending:
            done = make_one(job)
            if progress:
                progress(done)
    else:
        ctx = multiprocessing.get_context("spawn")  # no fork: the caller may hold torch/OpenMP threads
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
            for done in pool.map(make_one, pending, chunksize=chunksize):
                if progress:
                    progress(done)
    return len(pending)


def _make_one(args: tuple[Path, ClassSpec, int, SynthParams]) -> Path:
    path, cls, i, p = args
    rng = np.random.default_rng([p.seed, cls.index, i])  # independent of workers and order
    frames, audio = render_video(
        cls, rng, seconds=p.seconds, fps=p.fps, size=p.size, sample_rate=p.sample_rate
    )
    encode_mp4(path, frames, audio, fps=p.fps, sample_rate=p.sample_rate)
    return path


def synthesize(
    root: str | os.PathLike,
    params: SynthParams = SynthParams(),
    *,
    workers: int = 1,
    progress: Callable[[Path], None] | None = None,
) -> SynthResult:
    """Write the collection under `root`; rerunning with the same params finishes an interrupted run.

    `root` must be empty, absent, or hold a synth collection made with the same params (else
    InputError). `progress` is called once per finished video (also for ones already present).
    """
    root = Path(root)
    try:
        params.validate()
    except ValueError as exc:
        raise InputError(f"{root}: {exc}") from exc
    doc = describe(params)
    meta = root / "synth.json"
    check_output_root(
        root, meta, doc, keys=("params", "version"), other="a synth collection with other parameters"
    )
    root.mkdir(parents=True, exist_ok=True)
    # Written first (complete: false), so a rerun recognises an interrupted collection as its own.
    write_text_atomic(meta, json.dumps(describe(params, complete=False), indent=2) + "\n")

    specs = class_specs(params.classes)
    jobs = [(root / s.name / video_name(s, i), s, i, params) for s in specs for i in range(params.per_class)]
    written = make_missing(jobs, _make_one, workers=workers, progress=progress)
    write_text_atomic(meta, json.dumps(doc, indent=2) + "\n")
    return SynthResult(root=root, files=[job[0] for job in jobs], written=written)
