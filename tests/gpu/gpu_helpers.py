"""What the GPU checks compute on the CPU: tolerances, reference decoding, label agreement, figures.

Everything here runs without a GPU and is tested in `test_gpu_check_cpu.py`; the GPU tests beside it
only feed it what the GPU produced.

Decoding tolerance (`decode_close`, in 8-bit levels). VP9 and H.264 decoding is bit-exact by the codecs'
specifications, so a correct GPU decoder returns the same Y, U and V planes as FFmpeg's. What may differ
between DALI's `cpu` and `mixed` backends is the conversion to RGB: how the 4:2:0 chroma planes are
upsampled (nearest or bilinear, sited where) and the fixed-point rounding of the matrix. Chroma
upsampling cannot change luma: Y' = 0.299 R + 0.587 G + 0.114 B of a BT.601 conversion gives back the
stored Y whatever the chroma, so luma tells "same frames" apart from "same colours". Measured on the CPU
(test_gpu_check_cpu.py re-checks it on every run), 8-frame clips of the check's shard sets (synthetic:
saturated colours, sharp edges; real Kinetics clips; VP9 and H.264), against DALI's CPU decoder, which
`yuv_to_rgb` (BT.601, limited range, bilinear centre-sited chroma) reproduces within 1 level:
  - legitimate: nearest chroma, or FFmpeg's own rgb24 conversion (its fixed-point range expansion shifts
    luma by ~1-2 levels): luma mean <= 1.8, luma 99.9th percentile <= 10, RGB mean <= 2.0 (single RGB
    pixels up to ~55 on sharp colour edges);
  - a frame off by one: luma 99.9th percentile 45-225; full instead of limited range: luma mean 4.7-12.6,
    RGB mean 5.5-12.9; the BT.709 matrix instead of BT.601: RGB mean 0.6-5.4 (large on saturated
    colours, below the legitimate differences on muted ones, where it is harmless).
So the decode is equal when luma p99.9 <= 15 (same frames), luma mean <= 2.5 and RGB mean <= 3.0 (same
colours, to within what chroma upsampling changes). Reported as well, never bounded: RGB p99 and max.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

LUMA_P999_MAX = 15.0  # same frames
LUMA_MEAN_MAX = 2.5  # same brightness
RGB_MEAN_MAX = 3.0  # same colours
LUMA_WEIGHTS = (0.299, 0.587, 0.114)  # BT.601
# Colour matrices (Kr, Kb) and the variants `best_conversion` tries.
MATRICES = {"bt601": (0.299, 0.114), "bt709": (0.2126, 0.0722)}
CHROMA = ("bilinear", "nearest")
FIGURES_ENV = "XDC_GPU_CHECK_FIGURES"  # the stage runner points it at the stage's figures file
SHARDS_ENV = "XDC_GPU_SHARDS"  # a folder built by `scripts/gpu_check.py --build-shards` (shards.json)
INPUTS_ENV = "XDC_GPU_INPUTS"  # "loader" (DALI on the check's shards) or "synthetic"; see input_mode
IMAGE_ENV = "XDC_GPU_CHECK_IMAGE"  # set by the stage runner in image mode (the lent GPU: no DALI, ...)
LABEL_NMI_MIN = 0.99
ROOT = Path(__file__).resolve().parents[2]


# --- figures: written as they are measured, so a stage cut off still leaves them -----------------


def record(name: str, **values: Any) -> dict[str, Any]:
    """Append {"name": name, **values} as one JSON line to $XDC_GPU_CHECK_FIGURES (when set); return it."""
    entry = {"name": name, **{k: _plain(v) for k, v in values.items()}}
    path = os.environ.get(FIGURES_ENV)
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")
    return entry


def _plain(value: Any) -> Any:
    if isinstance(value, (np.floating, float)):
        return round(float(value), 4)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def run_group(argv: Sequence[str], timeout: float, **kwargs: Any):
    """subprocess.run in a process group of its own, the whole group killed at `timeout` (torchrun's
    workers too: killing torchrun alone orphans them). Returns the CompletedProcess; raises
    subprocess.TimeoutExpired after the kill."""
    import signal
    import subprocess

    proc = subprocess.Popen(
        list(argv),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        **kwargs,
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, "")


# --- what this machine lacks: skips with the reason ----------------------------------------------


def _image() -> bool:
    return bool(os.environ.get(IMAGE_ENV))


def missing_reason(what: str) -> str | None:
    """Why `what` ("dali", "faiss-gpu" or "shard-tools") cannot be used here, or None when it can.

    The reasons of the stage runner (scripts/gpu_check.py `unmet`), shorter, for `pytest tests/gpu` run
    without it; in image mode the runner does not even start the stages that need these.
    """
    import importlib
    import importlib.util
    import shutil

    if what == "dali":
        try:
            importlib.import_module("nvidia.dali")
        except Exception as e:
            why = f"nvidia-dali not importable ({type(e).__name__}: {e})"
            if _image():
                return f"{why}: DALI's wheel (788 MB installed) cannot be carried to this machine"
            return f"{why}: install xdctools[gpu] (nvidia-dali-cuda120)"
        return None
    if what == "faiss-gpu":
        try:
            faiss = importlib.import_module("faiss")
        except Exception as e:
            why = f"faiss not importable ({type(e).__name__}: {e})"
        else:
            if faiss.get_num_gpus() >= 1:
                return None
            if hasattr(faiss, "StandardGpuResources"):
                why = f"faiss {faiss.__version__} sees no GPU"
            else:
                why = f"faiss {faiss.__version__} is a CPU build (faiss-cpu)"
        if _image():
            return (
                f"{why}: no faiss GPU build for this CUDA 13 image can be carried (faiss-gpu-cu12 is CUDA 12)"
            )
        return f"{why}: install xdctools[gpu] (faiss-gpu-cu12), not faiss-cpu"
    if what == "shard-tools":
        modules = {"av": "PyAV", "librosa": "librosa", "webdataset": "webdataset", "ffmpeg": "ffmpeg-python"}
        lacking = [name for module, name in modules.items() if importlib.util.find_spec(module) is None]
        lacking += [f"the {p} program" for p in ("ffmpeg", "ffprobe") if shutil.which(p) is None]
        return f"building shards needs {', '.join(lacking)}, missing here" if lacking else None
    raise ValueError(f"unknown requirement {what!r}")


def require(*what: str) -> None:
    """pytest.skip, naming every reason, unless all of `what` can be used here."""
    import pytest

    reasons = [why for w in what if (why := missing_reason(w))]
    if reasons:
        pytest.skip("; ".join(reasons))


def input_mode() -> str:
    """Where the step and DDP tests get their clips: $XDC_GPU_INPUTS ("loader": one batch of the GPU
    loader on the check's shards; "synthetic": `synthetic_batch`), else the loader where DALI imports."""
    mode = os.environ.get(INPUTS_ENV) or ("loader" if missing_reason("dali") is None else "synthetic")
    if mode not in ("loader", "synthetic"):
        raise ValueError(f"${INPUTS_ENV}={mode!r}: 'loader' or 'synthetic'")
    return mode


def synthetic_batch(batch: int, *, frames: int = 8, crop: int = 112, seed: int = 0) -> dict[str, Any]:
    """A training batch of the GPU loader's shapes, dtypes and scale, made without DALI (on the CPU).

    video float32 (B, 3, L, crop, crop) and audio float32 (B, 1, N_MELS, WINDOW_FRAMES), both like the
    loader's normalised pixels and standardised log-mel (mean ~0, std ~1) and, like them, smooth:
    coarse random fields (every 4 frames, 16 pixels; 4 mel bins, 4 mel frames) interpolated up, plus
    10 % noise. The integer columns are those of a train batch. The same seed gives the same batch.
    """
    import torch
    import torch.nn.functional as F

    from xdctools.shard import format as fmt

    gen = torch.Generator().manual_seed(seed)
    coarse = torch.randn(batch, 3, max(frames // 4, 2), max(crop // 16, 2), max(crop // 16, 2), generator=gen)
    video = F.interpolate(coarse, size=(frames, crop, crop), mode="trilinear", align_corners=False)
    video = video / video.std() + 0.1 * torch.randn(video.shape, generator=gen)
    coarse = torch.randn(batch, 1, fmt.N_MELS // 4, fmt.WINDOW_FRAMES // 4, generator=gen)
    audio = F.interpolate(coarse, size=(fmt.N_MELS, fmt.WINDOW_FRAMES), mode="bilinear", align_corners=False)
    audio = audio / audio.std() + 0.1 * torch.randn(audio.shape, generator=gen)
    rows = torch.arange(batch, dtype=torch.int64)
    return {
        "video": video.contiguous(),
        "audio": audio.contiguous(),
        "index": rows,
        "segment": torch.zeros(batch, dtype=torch.int64),
        "frame": torch.zeros(batch, dtype=torch.int64),
        "label": torch.full((batch,), -1, dtype=torch.int64),
    }


def torchrun() -> list[str]:
    """The torchrun of this Python: the script beside it, or `python -m torch.distributed.run`."""
    import sys

    script = Path(sys.executable).with_name("torchrun")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "torch.distributed.run"]


def child_env(*paths: str | os.PathLike, **extra: str) -> dict[str, str]:
    """os.environ (and `extra`) for a child Python that imports the repository and `paths`: they are
    prepended to PYTHONPATH, never replace it (image mode puts the carried wheels' folder there)."""
    entries = [*map(str, paths), str(ROOT), os.environ.get("PYTHONPATH", "")]
    return {**os.environ, **extra, "PYTHONPATH": os.pathsep.join(p for p in entries if p)}


# --- pixels ----------------------------------------------------------------------------------


def pixel_difference(a: np.ndarray, b: np.ndarray, channel_axis: int = -1) -> dict[str, float]:
    """Two same-shape RGB images or clips in 8-bit levels (RGB along `channel_axis`): mean, p99 and max of
    |diff| over every value, and mean and 99.9th percentile of |diff| of their BT.601 luma."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} vs {b.shape}")
    d = np.abs(a - b)
    luma = np.abs(np.tensordot(np.moveaxis(a - b, channel_axis, -1), LUMA_WEIGHTS, axes=1))
    return {
        "mean": float(d.mean()),
        "p99": float(np.percentile(d, 99)),
        "max": float(d.max()),
        "luma_mean": float(luma.mean()),
        "luma_p999": float(np.percentile(luma, 99.9)),
    }


def decode_close(diff: Mapping[str, float]) -> bool:
    """Whether a `pixel_difference` is within the decoding tolerance (module docstring)."""
    return (
        diff["luma_p999"] <= LUMA_P999_MAX
        and diff["luma_mean"] <= LUMA_MEAN_MAX
        and diff["mean"] <= RGB_MEAN_MAX
    )


def describe(diff: Mapping[str, float]) -> str:
    return (
        f"luma p99.9 {diff['luma_p999']:.1f} (<= {LUMA_P999_MAX}), luma mean {diff['luma_mean']:.2f} "
        f"(<= {LUMA_MEAN_MAX}), RGB mean {diff['mean']:.2f} (<= {RGB_MEAN_MAX}); RGB p99 {diff['p99']:.0f}, "
        f"max {diff['max']:.0f} levels"
    )


def levels(video: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """A loader's normalised (..., 3, L, H, W) video back to 8-bit levels (float), channel axis -4."""
    shape = (3, 1, 1, 1)
    return (np.asarray(video, np.float64) * np.reshape(std, shape) + np.reshape(mean, shape)) * 255.0


# --- reference decoding: FFmpeg's planes, DALI's CPU conversion -------------------------------


def yuv420_frames(encoded: bytes, frames: Iterable[int]) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(Y, U, V) uint8 planes of the wanted frames (presentation order) of an encoded segment, via PyAV.

    A frame past the end repeats the last one (DALI's pad_mode="edge").
    """
    import av

    wanted = sorted(set(frames))
    got: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    last = None
    with av.open(io.BytesIO(encoded)) as container:
        for n, frame in enumerate(container.decode(video=0)):
            if frame.format.name != "yuv420p":
                frame = frame.reformat(format="yuv420p")
            h, w = frame.height, frame.width
            flat = frame.to_ndarray(format="yuv420p")  # (H * 3/2, W): Y, then U and V one after the other
            u = flat[h : h + h // 4].reshape(h // 2, w // 2)
            v = flat[h + h // 4 : h + h // 2].reshape(h // 2, w // 2)
            last = (flat[:h].copy(), u.copy(), v.copy())
            if n in wanted:
                got[n] = last
            if n >= wanted[-1]:
                break
    if last is None:
        raise ValueError("no video frame decoded")
    return [got.get(n, last) for n in frames]


def _upsample(plane: np.ndarray, height: int, width: int, chroma: str) -> np.ndarray:
    """A 4:2:0 chroma plane at full size: nearest (each sample twice), or bilinear with centre siting."""
    c = plane.astype(np.float64)
    if chroma == "nearest":
        return np.repeat(np.repeat(c, 2, axis=0), 2, axis=1)[:height, :width]
    if chroma != "bilinear":
        raise ValueError(f"chroma {chroma!r}")
    rows, cols = c.shape

    def taps(size: int, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        pos = (np.arange(size) + 0.5) / 2 - 0.5  # full-size pixel centres in chroma coordinates
        lo = np.floor(pos)
        return (
            np.clip(lo, 0, n - 1).astype(int),
            np.clip(lo + 1, 0, n - 1).astype(int),
            np.clip(pos - lo, 0, 1),
        )

    y0, y1, fy = taps(height, rows)
    x0, x1, fx = taps(width, cols)
    top = c[y0][:, x0] * (1 - fx) + c[y0][:, x1] * fx
    bottom = c[y1][:, x0] * (1 - fx) + c[y1][:, x1] * fx
    return top * (1 - fy)[:, None] + bottom * fy[:, None]


def yuv_to_rgb(
    y: np.ndarray,
    u: np.ndarray,
    v: np.ndarray,
    *,
    matrix: str = "bt601",
    chroma: str = "bilinear",
    full_range: bool = False,
) -> np.ndarray:
    """uint8 (H, W, 3) RGB of 4:2:0 planes. The defaults reproduce DALI's CPU video decoder (measured)."""
    kr, kb = MATRICES[matrix]
    kg = 1.0 - kr - kb
    h, w = y.shape
    luma = y.astype(np.float64)
    cb = _upsample(u, h, w, chroma) - 128.0
    cr = _upsample(v, h, w, chroma) - 128.0
    if not full_range:
        luma, cb, cr = (luma - 16.0) * 255.0 / 219.0, cb * 255.0 / 224.0, cr * 255.0 / 224.0
    r = luma + 2.0 * (1.0 - kr) * cr
    b = luma + 2.0 * (1.0 - kb) * cb
    g = (luma - kr * r - kb * b) / kg
    return np.clip(np.rint(np.stack([r, g, b], axis=-1)), 0, 255).astype(np.uint8)


def reference_clip(encoded: bytes, frames: Sequence[int], **conversion: Any) -> np.ndarray:
    """uint8 (L, H, W, 3): the frames as DALI's CPU decoder gives them, from FFmpeg's planes."""
    return np.stack([yuv_to_rgb(*planes, **conversion) for planes in yuv420_frames(encoded, frames)])


def dali_decode(
    videos: Sequence[bytes], frame_lists: Sequence[Sequence[int]], device: str
) -> list[np.ndarray]:
    """uint8 (L, H, W, 3) frames of each encoded segment by DALI's fn.decoders.video on `device` ("cpu" or
    "mixed"), the wanted frame numbers per segment as the training loader asks for them (pad_mode edge)."""
    from nvidia.dali import fn, types
    from nvidia.dali.pipeline import Pipeline

    gpu = device == "mixed"
    pipe = Pipeline(batch_size=len(videos), num_threads=4, device_id=0 if gpu else None, seed=0)
    with pipe:
        encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
        frames = fn.external_source(name="frames", dtype=types.INT32, ndim=1)
        pipe.set_outputs(fn.decoders.video(encoded, device=device, frames=frames, pad_mode="edge"))
    pipe.build()
    pipe.feed_input("encoded", [np.frombuffer(v, dtype=np.uint8) for v in videos])
    pipe.feed_input("frames", [np.asarray(f, dtype=np.int32) for f in frame_lists])
    (out,) = pipe.run()
    if gpu:
        out = out.as_cpu()
    return [np.array(out[i]) for i in range(len(videos))]


def best_conversion(rgb: np.ndarray, encoded: bytes, frames: Sequence[int]) -> tuple[str, dict[str, float]]:
    """Which standard YUV->RGB conversion of FFmpeg's planes `rgb` (L, H, W, 3) matches best, and how well.

    A diagnosis for a failed comparison: a luma match to some variant means the decoder returned the right
    frames and only converts colours differently; no luma match to any means wrong (or corrupt) frames.
    """
    planes = yuv420_frames(encoded, frames)
    best: tuple[str, dict[str, float]] | None = None
    for matrix in MATRICES:
        for chroma in CHROMA:
            for full in (False, True):
                ref = np.stack(
                    [yuv_to_rgb(*p, matrix=matrix, chroma=chroma, full_range=full) for p in planes]
                )
                diff = pixel_difference(rgb, ref)
                if best is None or (diff["luma_p999"], diff["mean"]) < (
                    best[1]["luma_p999"],
                    best[1]["mean"],
                ):
                    best = (f"{matrix} {chroma} {'full' if full else 'limited'}", diff)
    assert best is not None
    return best


# --- shards ----------------------------------------------------------------------------------


def load_manifest(root: str | os.PathLike) -> dict[str, Any]:
    """The shards.json of a folder made by `scripts/gpu_check.py --build-shards`."""
    return json.loads((Path(root) / "shards.json").read_text())


def shard_set(manifest: Mapping[str, Any], name: str) -> Path:
    """The path of one set of the manifest, or a pytest skip naming why it was not built."""
    import pytest

    if name in manifest["sets"]:
        return Path(manifest["sets"][name]["path"])
    pytest.skip(f"shard set {name} was not built: {manifest['missing'].get(name, 'not a set of the check')}")


def segments(shard_root: str | os.PathLike, set_name: str = "train", limit: int | None = None) -> list[dict]:
    """Each sample's key, encoded video bytes, video extension and decoded info, in stored order."""
    from trainer.data import VIDEO_EXTS, find_shards
    from xdctools.shard import format as fmt
    from xdctools.shard.read import parse_index

    shards = find_shards(shard_root, set_name)
    out = []
    for tar, idx in zip(shards.tars, shards.indexes, strict=True):
        raw = tar.read_bytes()
        for key, members in parse_index(idx.read_text()):
            ext = next(e for e in VIDEO_EXTS if e in members)
            offset, size = members[ext]
            info_at, info_size = members[fmt.INFO_EXT]
            info = fmt.decode_info(raw[info_at : info_at + info_size])
            out.append({"key": key, "video": raw[offset : offset + size], "ext": ext, "info": info})
            if limit is not None and len(out) >= limit:
                return out
    return out


def clip_frames(num_frames: int, length: int = 8) -> list[list[int]]:
    """Frame lists the decode checks ask for: the segment's first clip and one further in (both < n)."""
    first = list(range(min(length, num_frames)))
    later_start = max(0, min(num_frames - length, num_frames // 2))
    later = list(range(later_start, min(later_start + length, num_frames)))
    return [first, later] if later_start > 0 else [first]


# --- clustering ------------------------------------------------------------------------------


def separated_mixture(
    n: int, d: int, k: int, seed: int = 0, spread: float = 0.05
) -> tuple[np.ndarray, np.ndarray]:
    """(x float32 (n, d), true labels): k far-apart centres (unit-norm scaled by 10) plus small noise.

    Any decent k-means finds the true partition, so GPU and CPU k-means with one seed must agree.
    """
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((k, d)).astype(np.float32)
    centres *= 10.0 / np.linalg.norm(centres, axis=1, keepdims=True)
    labels = np.arange(n) % k
    rng.shuffle(labels)
    x = centres[labels] + spread * rng.standard_normal((n, d)).astype(np.float32)
    return x.astype(np.float32), labels


def labels_nmi(a: np.ndarray, b: np.ndarray) -> float:
    """NMI of two labellings of the same rows (cluster ids may be permuted); rows with -1 left out."""
    from xdctools.cluster.report import cluster_metrics

    return cluster_metrics(np.asarray(a), np.asarray(b))["nmi"]


def assert_labels_agree(a: np.ndarray, b: np.ndarray, what: str, min_nmi: float = LABEL_NMI_MIN) -> float:
    nmi = labels_nmi(a, b)
    assert nmi >= min_nmi, f"{what}: NMI {nmi:.4f} < {min_nmi}"
    return nmi


def assignment_agreement(
    labels_a: np.ndarray,
    labels_b: np.ndarray,
    dist_a: np.ndarray,
    dist_b: np.ndarray,
    *,
    atol: float,
    rtol: float = 1e-4,
) -> dict[str, float]:
    """How two nearest-centroid assignments of the same rows agree.

    equal: the fraction of rows with the same label; distances_close: the fraction whose distances agree
    within atol + rtol * |d| (float32 distances are ||x||^2 + ||c||^2 - 2 x.c, so their error scales with
    ||x||^2: pass atol ~ 1e-5 * mean ||x||^2); differing_are_ties: the fraction of rows with different
    labels whose two distances agree all the same (a tie broken differently, not a wrong answer).
    """
    labels_a, labels_b = np.asarray(labels_a), np.asarray(labels_b)
    dist_a, dist_b = np.asarray(dist_a, np.float64), np.asarray(dist_b, np.float64)
    gap = np.abs(dist_a - dist_b)
    close = gap <= atol + rtol * np.abs(dist_a)
    differ = labels_a != labels_b
    return {
        "equal": float((~differ).mean()),
        "distances_close": float(close.mean()),
        "differing_rows": int(differ.sum()),
        "differing_are_ties": float(close[differ].mean()) if differ.any() else 1.0,
        "max_distance_gap": float(gap.max()) if gap.size else 0.0,
    }


# --- audio-visual alignment (the check of tests/test_data.py, on any device's rows) ---------------


def flash_and_click(
    rows: Mapping[str, Any],
    *,
    stride: int,
    flash_first: int,
    flash_frames: int,
    flash_time: float,
    fps: float,
    length: int = 8,
) -> int:
    """Every clip: white frames exactly where the flash is, the click where the mel mapping puts it.

    Returns the number of clips that show the flash. Same rule as tests/test_data.py::_flash_and_click
    (copied, not imported, so that a change there cannot break collection here).
    """
    from xdctools.shard import format as fmt

    span = length * stride
    with_flash = 0
    for video, audio, frame in zip(rows["video"], rows["audio"], rows["frame"].tolist(), strict=True):
        numbers = frame + stride * np.arange(length)
        bright = np.asarray(video.float().mean(dim=(0, 2, 3)).cpu()) > 0.5  # white ~+2, dark ~-1.6
        want = [flash_first <= f < flash_first + flash_frames for f in numbers]
        assert bright.tolist() == want, f"clip at frame {frame}: bright {bright.tolist()} != flash {want}"
        if not bright.any():
            continue
        with_flash += 1
        start = round((frame + span / 2) / fps * fmt.MEL_FPS) - fmt.MEL_PAD_FRAMES
        expected = round(flash_time * fmt.MEL_FPS) - start
        loudness = np.asarray(audio[0].float().mean(dim=0).cpu())
        assert 0 <= expected < fmt.WINDOW_FRAMES
        assert abs(int(np.argmax(loudness)) - expected) <= 2, (
            f"click at {np.argmax(loudness)}, not {expected}"
        )
        assert loudness.max() > loudness.min() + 1.0  # a click, not silence
    return with_flash


# --- one training step, two ways -------------------------------------------------------------


def similarity(a: Mapping[str, Any], b: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """Cosine and norm ratio (b over a) of two sets of tensors (e.g. gradients by parameter name), all
    names under `prefix` concatenated into one vector each, in float64 on the CPU."""
    import torch

    keys = sorted(k for k in a if k.startswith(prefix))
    if not keys or any(k not in b for k in keys):
        raise ValueError(f"no common tensors under {prefix!r}, or names differ")
    va = torch.cat([a[k].detach().double().flatten().cpu() for k in keys])
    vb = torch.cat([b[k].detach().double().flatten().cpu() for k in keys])
    na, nb = float(va.norm()), float(vb.norm())
    return {
        "cosine": float(va @ vb) / max(na * nb, 1e-300),
        "norm_ratio": nb / max(na, 1e-300),
        "tensors": len(keys),
    }
