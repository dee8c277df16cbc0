"""The audio-visual digits set: a moving MNIST digit with an FSDD recording of the same digit, as real MP4s.

The digit is the only factor the two modalities share; handwriting, size, contrast, motion, background
texture and noise (video) and speaker, loudness and timing (audio, over one fixed faint hiss) are
nuisance drawn per video.
It is the real check of XDC: cluster one modality, learn it from the other, probe the digit.

Sources never cross splits. Train videos use FSDD recordings with index 5-49 (FSDD's own training set)
and MNIST t10k images 0-4999; test videos use index 0-4 (FSDD's test set) and images 5000-9999. The two
MNIST halves have different writers (NIST SD-3 vs SD-1), and the second half is the harder one, so test
accuracies run a little below train accuracies for every method alike.

Layout written by `make_digits(root, ...)`:
    root/train/<digit>/<digit>_<nnnn>.mp4     class folders "0".."9": sorted names = digit = class index
    root/test/<digit>/<digit>_<nnnn>.mp4
    root/digits.json                          params and the sources of every video (auditable)
    root/manifest.csv                         path,label,set for both splits (written when complete)

Intended pipeline (one output folder holding both sets, through the manifest):
    xdctools digits digits/videos
    xdctools shard digits/videos/manifest.csv -o digits/shards --short-side 128
or one folder per split, as class trees:
    xdctools shard digits/videos/train -o digits/shards/train-set --short-side 128
    xdctools shard digits/videos/test -o digits/shards/test-set --short-side 128 --set-name test
(two class-tree runs cannot share one output folder: `shard` refuses an output made from another plan).

`render_digit_video` is pure numpy; only `load_mnist`, `list_fsdd`, `read_recording` and `make_digits`
touch files, and `xdctools.synth.encode_mp4` runs ffmpeg.
"""

from __future__ import annotations

import colorsys
import csv
import gzip
import io
import json
import math
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

from xdctools.atomic import write_text_atomic
from xdctools.errors import InputError
from xdctools.synth import check_output_root, encode_mp4, make_missing

SPLITS = ("train", "test")
FSDD_INDICES = {"train": range(5, 50), "test": range(0, 5)}  # FSDD's own convention
MNIST_HALVES = {"train": range(0, 5000), "test": range(5000, 10_000)}  # of the 10,000 t10k images
SAMPLE_RATE = 16_000
HISS = 0.002  # std of the audio's background noise
DIGITS_VERSION = 2  # bump when the generator's output changes for the same params and data
MNIST_FILES = ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
_FSDD_NAME = re.compile(r"^(\d)_([A-Za-z]+)_(\d+)\.wav$")


# --- sources ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Recording:
    """One FSDD file: `recordings/{digit}_{speaker}_{index}.wav`, `frames` samples at `sample_rate`."""

    path: Path
    digit: int
    speaker: str
    index: int
    frames: int
    sample_rate: int

    @property
    def seconds(self) -> float:
        return self.frames / self.sample_rate


def _recordings_dir(folder: Path) -> Path:
    """FSDD's `recordings/` folder, given the FSDD root or that folder itself."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(
            f"{folder}: FSDD folder not found (expected recordings/<digit>_<speaker>_<index>.wav)"
        )
    return folder / "recordings" if (folder / "recordings").is_dir() else folder


def list_fsdd(folder: str | os.PathLike) -> list[Recording]:
    """Every FSDD recording under `folder` (the FSDD root or its recordings/), sorted by name."""
    rec_dir = _recordings_dir(Path(folder))
    found = []
    for name in sorted(os.listdir(rec_dir)):
        match = _FSDD_NAME.match(name)
        if not match:
            continue
        path = rec_dir / name
        try:
            info = sf.info(str(path))
        except RuntimeError as exc:  # soundfile.LibsndfileError
            raise InputError(f"{path}: unreadable wav ({exc})") from exc
        digit, speaker, index = int(match.group(1)), match.group(2), int(match.group(3))
        found.append(Recording(path, digit, speaker, index, int(info.frames), int(info.samplerate)))
    if not found:
        raise InputError(f"{rec_dir}: no FSDD recordings (<digit>_<speaker>_<index>.wav) found")
    return found


def _read_idx(folder: Path, stem: str, magic: int) -> np.ndarray:
    """An idx array (`stem.gz` or `stem`) as uint8, shaped by its header."""
    path = next((p for p in (folder / f"{stem}.gz", folder / stem) if p.is_file()), None)
    if path is None:
        raise InputError(f"{folder}: {stem}.gz not found (MNIST t10k images and labels, idx format)")
    try:
        data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise InputError(f"{path}: cannot read ({exc})") from exc
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(data) < header or int.from_bytes(data[:4], "big") != magic:
        raise InputError(f"{path}: not an idx file of uint8 with {ndim} dimension(s) (bad magic number)")
    shape = tuple(int(d) for d in np.frombuffer(data, ">u4", count=ndim, offset=4))
    if len(data) - header != math.prod(shape):
        raise InputError(f"{path}: {len(data) - header} data bytes, expected {math.prod(shape)} for {shape}")
    return np.frombuffer(data, np.uint8, offset=header).reshape(shape)


def load_mnist(folder: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """MNIST t10k: images uint8 (10000, 28, 28), white ink on black; labels uint8 (10000,)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: MNIST folder not found (expected {MNIST_FILES[0]}.gz and labels)")
    images = _read_idx(folder, MNIST_FILES[0], 0x0803)
    labels = _read_idx(folder, MNIST_FILES[1], 0x0801)
    if images.ndim != 3 or labels.shape != images.shape[:1]:
        raise InputError(f"{folder}: {images.shape[0]} images but {labels.shape[0]} labels")
    if images.shape[0] < MNIST_HALVES["test"].stop or labels.max(initial=0) > 9:
        raise InputError(f"{folder}: expected the 10,000 t10k digits, found {images.shape[0]} images")
    return images, labels


def read_recording(path: str | os.PathLike, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """A recording as float32 mono at `sample_rate` (polyphase resampling: 8 kHz -> 16 kHz is exact x2)."""
    from scipy.signal import resample_poly

    try:
        audio, rate = sf.read(str(path), dtype="float32", always_2d=True)
    except RuntimeError as exc:  # soundfile.LibsndfileError
        raise InputError(f"{path}: unreadable wav ({exc})") from exc
    audio = audio.mean(axis=1)
    if rate != sample_rate:
        g = math.gcd(rate, sample_rate)
        audio = resample_poly(audio, sample_rate // g, rate // g)
    return audio.astype(np.float32)


def resampled_length(frames: int, rate: int, sample_rate: int = SAMPLE_RATE) -> int:
    """Samples `read_recording` returns for `frames` samples at `rate` (resample_poly's ceil)."""
    g = math.gcd(rate, sample_rate)
    up, down = sample_rate // g, rate // g
    return -(-frames * up // down)


# --- pure generator -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Nuisance:
    """Everything random about one video except its sources; recorded in digits.json."""

    digit_px: int  # side of the scaled digit, pixels
    x0: float  # top-left corner at t = 0, pixels
    y0: float
    vx: float  # velocity, pixels per second; the digit bounces off the frame edges
    vy: float
    contrast: float  # ink opacity in (0, 1]
    ink: tuple[float, float, float]  # RGB of the ink
    background: tuple[float, float, float]  # mean RGB of the background
    texture: float  # std of the static low-frequency background texture
    texture_cells: int  # texture grid cells along the short side (its blob size)
    frame_noise: float  # std of grey noise, new every frame
    audio_offset_s: float  # where the recording starts in the clip
    audio_peak: float  # peak amplitude of the recording after scaling
    hiss: float  # std of the background noise added to the audio


def draw_nuisance(
    rng: np.random.Generator, *, size: tuple[int, int], seconds: float, audio_samples: int, sample_rate: int
) -> Nuisance:
    """Per-video nuisance from `rng`, in a fixed order; the recording (audio_samples) fits in the clip."""
    w, h = size
    short = min(w, h)
    digit_px = int(rng.integers(round(0.31 * short), round(0.5 * short) + 1))
    speed = rng.uniform(0.15, 0.5) * short  # pixels per second
    angle = rng.uniform(0, 2 * math.pi)
    x0, y0 = rng.uniform(0, w - digit_px), rng.uniform(0, h - digit_px)
    contrast = rng.uniform(0.55, 1.0)
    ink_hue, ink_sat = rng.uniform(0, 1), rng.uniform(0, 0.6)
    ink = _hsv_to_rgb(ink_hue, ink_sat, rng.uniform(0.8, 1.0))
    background = tuple(float(v) for v in rng.uniform(0, 80, size=3))
    texture = rng.uniform(4, 22)
    texture_cells = int(rng.integers(3, 9))
    frame_noise = rng.uniform(2, 9)
    # The recording is centred on the video's middle (jitter ±0.1 s): the loaders' 2 s audio window
    # holds the clip (in a 2 s video, the whole video), so every clip's window hears the spoken digit
    # (a window of hiss alone would teach the audio encoder nothing about the digit).
    ns = max(1, round(seconds * sample_rate))
    slack = max(0, ns - audio_samples)
    centre = ns / 2 + rng.uniform(-0.1, 0.1) * sample_rate
    offset = int(np.clip(round(centre - audio_samples / 2), 0, slack))
    return Nuisance(
        digit_px=digit_px,
        x0=float(x0),
        y0=float(y0),
        vx=float(speed * math.cos(angle)),
        vy=float(speed * math.sin(angle)),
        contrast=float(contrast),
        ink=ink,
        background=background,
        texture=float(texture),
        texture_cells=texture_cells,
        frame_noise=float(frame_noise),
        audio_offset_s=offset / sample_rate,
        audio_peak=float(rng.uniform(0.3, 0.85)),
        # One noise floor for every video: a random one fills the silent half of each 2 s window and is
        # what randomly initialised audio features cluster by (measured on 300 videos: k-means NMI of
        # random width-0.125 features with the digit 0.15 with a random floor, 0.20 without).
        hiss=HISS,
    )


def _hsv_to_rgb(hue: float, sat: float, val: float) -> tuple[float, float, float]:
    return tuple(float(c * 255) for c in colorsys.hsv_to_rgb(hue, sat, val))


def _bounce(start: float, velocity: float, t: np.ndarray, span: float) -> np.ndarray:
    """Position in [0, span] of a point moving at `velocity` that reflects off 0 and `span`."""
    if span <= 0:
        return np.zeros_like(t)
    q = np.mod(start + velocity * t, 2 * span)
    return np.where(q <= span, q, 2 * span - q)


def digit_positions(
    nuisance: Nuisance, num_frames: int, fps: float, size: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """Integer top-left (x, y) of the digit in each frame, shape (T,) each; always fully inside."""
    w, h = size
    t = np.arange(num_frames, dtype=np.float64) / fps
    x = _bounce(nuisance.x0, nuisance.vx, t, w - nuisance.digit_px)
    y = _bounce(nuisance.y0, nuisance.vy, t, h - nuisance.digit_px)
    return np.rint(x).astype(np.int64), np.rint(y).astype(np.int64)


def _resize_matrix(n_out: int, n_in: int) -> np.ndarray:
    """(n_out, n_in) linear interpolation weights, pixel centres aligned."""
    src = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
    lo = np.floor(src).astype(np.int64)
    hi = np.minimum(lo + 1, n_in - 1)
    frac = src - lo
    m = np.zeros((n_out, n_in))
    m[np.arange(n_out), lo] += 1 - frac
    m[np.arange(n_out), hi] += frac
    return m


def scale_image(image: np.ndarray, px: int) -> np.ndarray:
    """A grey image (h, w) uint8 bilinearly resized to (px, px) float32 in [0, 1]."""
    img = np.asarray(image, dtype=np.float64) / 255.0
    out = _resize_matrix(px, img.shape[0]) @ img @ _resize_matrix(px, img.shape[1]).T
    return np.clip(out, 0, 1).astype(np.float32)


def render_digit_video(
    image: np.ndarray,
    audio: np.ndarray,
    rng: np.random.Generator,
    *,
    seconds: float = 2.0,
    fps: float = 25.0,
    size: tuple[int, int] = (128, 128),
    sample_rate: int = SAMPLE_RATE,
) -> tuple[np.ndarray, np.ndarray, Nuisance]:
    """One video: `image` (28, 28) uint8 moving over a textured, noisy background, `audio` (float32 at
    `sample_rate`, at most `seconds` long) placed inside the clip over faint hiss.

    Returns frames uint8 (T, H, W, 3) RGB with T = round(seconds*fps), audio float32
    (round(seconds*sample_rate),) in [-1, 1], and the nuisance drawn (first) from `rng`.
    """
    w, h = size
    nt = max(1, round(seconds * fps))
    ns = max(1, round(seconds * sample_rate))
    audio = np.asarray(audio, dtype=np.float32)
    if len(audio) > ns:
        raise ValueError(
            f"the recording ({len(audio) / sample_rate:.2f} s) is longer than the clip ({seconds} s)"
        )
    nz = draw_nuisance(rng, size=size, seconds=seconds, audio_samples=len(audio), sample_rate=sample_rate)

    # Audio: the recording at a random loudness and offset, over white hiss.
    out = (nz.hiss * rng.standard_normal(ns)).astype(np.float32)
    peak = float(np.max(np.abs(audio), initial=0.0))
    start = round(nz.audio_offset_s * sample_rate)
    if peak > 0:
        out[start : start + len(audio)] += audio * (nz.audio_peak / peak)
    out = np.clip(out, -1, 1)

    # Background: a colour, a static smooth texture (coarse noise upsampled), grey noise per frame.
    cells_y = max(2, round(nz.texture_cells * h / min(w, h)))
    cells_x = max(2, round(nz.texture_cells * w / min(w, h)))
    coarse = rng.standard_normal((cells_y, cells_x))
    texture = _resize_matrix(h, cells_y) @ coarse @ _resize_matrix(w, cells_x).T
    background = np.asarray(nz.background, dtype=np.float32) + (nz.texture * texture)[..., None]
    frames = np.empty((nt, h, w, 3), dtype=np.float32)
    frames[:] = background.astype(np.float32)
    frames += nz.frame_noise * rng.standard_normal((nt, h, w, 1), dtype=np.float32)

    # The digit: ink blended over the background with the scaled image as opacity.
    alpha = (scale_image(image, nz.digit_px) * nz.contrast)[..., None]
    ink = np.asarray(nz.ink, dtype=np.float32)
    xs, ys = digit_positions(nz, nt, fps, size)
    s = nz.digit_px
    for i in range(nt):
        box = frames[i, ys[i] : ys[i] + s, xs[i] : xs[i] + s]
        box += alpha * (ink - box)
    return np.clip(np.rint(frames), 0, 255).astype(np.uint8), out, nz


# --- the set ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DigitsParams:
    """Everything that decides the set's content, besides the FSDD and MNIST files themselves."""

    per_digit_train: int = 200  # FSDD has 270 train recordings per digit: none is used twice
    per_digit_test: int = 30  # all of FSDD's test split (6 speakers x indices 0-4)
    seconds: float = 2.0
    fps: float = 25.0
    size: tuple[int, int] = (128, 128)
    sample_rate: int = SAMPLE_RATE
    seed: int = 0

    def validate(self) -> None:
        w, h = self.size
        checks = [
            (self.per_digit_train >= 1 and self.per_digit_test >= 1, "per-digit counts must be >= 1"),
            (self.seed >= 0, "seed must be >= 0"),
            (0.5 <= self.seconds <= 60, "seconds must be in [0.5, 60]"),
            (0 < self.fps <= 120, "fps must be in (0, 120]"),
            (w >= 32 and h >= 32 and w % 2 == 0 and h % 2 == 0, "size must be even and at least 32x32"),
            (8_000 <= self.sample_rate <= 48_000, "sample_rate must be in 8000..48000"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(f"{msg} (got {self})")


@dataclass(frozen=True)
class Source:
    """What one video is made of: its place in the tree, its recording and its MNIST image."""

    split: str
    digit: int
    number: int  # position within (split, digit)
    recording: Recording
    mnist_index: int

    @property
    def path(self) -> str:
        """Relative POSIX path under the set's root."""
        return f"{self.split}/{self.digit}/{self.digit}_{self.number:04d}.mp4"

    def rng(self, seed: int) -> np.random.Generator:
        """The video's own stream: independent of workers, order and the other counts."""
        return np.random.default_rng([seed, SPLITS.index(self.split), self.digit, self.number])


def choose_sources(
    recordings: Sequence[Recording], mnist_labels: np.ndarray, params: DigitsParams
) -> list[Source]:
    """Sources of every video, split by split and digit, in path order.

    Per (split, digit), recordings (of the split's FSDD indices, no longer than the clip) and images
    (of the split's MNIST half) are taken in a seeded random order; asking for more videos than a pool
    holds cycles through it again, never into the other split.
    """
    counts = {"train": params.per_digit_train, "test": params.per_digit_test}
    sources = []
    for split_id, split in enumerate(SPLITS):
        half = MNIST_HALVES[split]
        for digit in range(10):
            recs = [
                r
                for r in recordings
                if r.digit == digit
                and r.index in FSDD_INDICES[split]
                and resampled_length(r.frames, r.sample_rate, params.sample_rate)
                <= round(params.seconds * params.sample_rate)
            ]
            recs.sort(key=lambda r: (r.speaker, r.index))
            images = half.start + np.flatnonzero(mnist_labels[half.start : half.stop] == digit)
            if not recs or not len(images):
                what = "FSDD recordings" if not recs else "MNIST images"
                raise InputError(
                    f"no {what} of digit {digit} for the {split} split (clip {params.seconds} s)"
                )
            rng = np.random.default_rng([params.seed, split_id, digit, 1_000_003])
            rec_order, img_order = rng.permutation(len(recs)), rng.permutation(len(images))
            for n in range(counts[split]):
                rec = recs[int(rec_order[n % len(recs)])]
                img = int(images[img_order[n % len(images)]])
                sources.append(Source(split, digit, n, rec, img))
    return sources


def source_nuisance(source: Source, params: DigitsParams) -> Nuisance:
    """The nuisance `render_digit_video` draws for `source` (the same rng, the same first draws)."""
    samples = resampled_length(source.recording.frames, source.recording.sample_rate, params.sample_rate)
    return draw_nuisance(
        source.rng(params.seed),
        size=params.size,
        seconds=params.seconds,
        audio_samples=samples,
        sample_rate=params.sample_rate,
    )


def describe(
    params: DigitsParams, sources: Sequence[Source], fsdd_dir: Path, mnist_dir: Path, complete: bool = True
) -> dict:
    """The `digits.json` document: params, split rules and every video's sources and nuisance."""
    rec_root = _recordings_dir(fsdd_dir).parent
    files = []
    for s in sources:
        rec = s.recording
        files.append(
            {
                "path": s.path,
                "split": s.split,
                "digit": s.digit,
                "recording": Path(os.path.relpath(rec.path, rec_root)).as_posix(),
                "speaker": rec.speaker,
                "recording_index": rec.index,
                "mnist_index": s.mnist_index,
                "nuisance": asdict(source_nuisance(s, params)),
            }
        )
    return {
        "generator": "xdctools digits",
        "version": DIGITS_VERSION,
        "complete": complete,  # false while the files are being written
        "params": {**asdict(params), "size": list(params.size)},
        "data": {"fsdd": str(Path(fsdd_dir).resolve()), "mnist": str(Path(mnist_dir).resolve())},
        "splits": {
            split: {
                "fsdd_indices": [FSDD_INDICES[split].start, FSDD_INDICES[split].stop - 1],
                "mnist_t10k_indices": [MNIST_HALVES[split].start, MNIST_HALVES[split].stop - 1],
            }
            for split in SPLITS
        },
        "classes": [str(d) for d in range(10)],
        "files": files,
    }


def manifest_text(sources: Sequence[Source]) -> str:
    """manifest.csv for `xdctools shard`: both splits as sets "train" and "test" of one output."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["path", "label", "set"])
    for s in sources:
        writer.writerow([s.path, str(s.digit), s.split])
    return buf.getvalue()


@dataclass(frozen=True)
class DigitsResult:
    """Where the set is and what this call did."""

    root: Path
    files: list[Path]  # every video, train then test, each by digit then number
    written: int  # videos encoded by this call (the others were already there)


def _make_one(args: tuple[Path, np.ndarray, str, Source, DigitsParams]) -> Path:
    path, image, rec_path, source, p = args
    audio = read_recording(rec_path, p.sample_rate)
    frames, audio, _ = render_digit_video(
        image, audio, source.rng(p.seed), seconds=p.seconds, fps=p.fps, size=p.size, sample_rate=p.sample_rate
    )
    encode_mp4(path, frames, audio, fps=p.fps, sample_rate=p.sample_rate)
    return path


def make_digits(
    root: str | os.PathLike,
    params: DigitsParams = DigitsParams(),
    *,
    fsdd_dir: str | os.PathLike,
    mnist_dir: str | os.PathLike,
    workers: int = 1,
    progress: Callable[[Path], None] | None = None,
) -> DigitsResult:
    """Write the set under `root`; rerunning with the same params and data finishes an interrupted run.

    `progress` is called once per finished video (also for ones already present).
    """
    root, fsdd_dir, mnist_dir = Path(root), Path(fsdd_dir), Path(mnist_dir)
    try:
        params.validate()
    except ValueError as exc:
        raise InputError(f"{root}: {exc}") from exc
    recordings = list_fsdd(fsdd_dir)
    images, labels = load_mnist(mnist_dir)
    sources = choose_sources(recordings, labels, params)
    doc = describe(params, sources, fsdd_dir, mnist_dir)
    meta = root / "digits.json"
    check_output_root(
        root,
        meta,
        doc,
        keys=("version", "params", "files"),
        other="a digits set made with other parameters or data",
    )
    root.mkdir(parents=True, exist_ok=True)
    # Written first (complete: false), so a rerun recognises an interrupted set as its own.
    write_text_atomic(meta, json.dumps({**doc, "complete": False}, indent=1) + "\n")

    jobs = [(root / s.path, images[s.mnist_index], str(s.recording.path), s, params) for s in sources]
    written = make_missing(jobs, _make_one, workers=workers, progress=progress, chunksize=4)
    write_text_atomic(root / "manifest.csv", manifest_text(sources))
    write_text_atomic(meta, json.dumps(doc, indent=1) + "\n")
    return DigitsResult(root=root, files=[job[0] for job in jobs], written=written)
