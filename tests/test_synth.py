"""xdctools synth: real MP4 files with the stated streams, deterministic, classes that differ as designed."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from matplotlib.colors import rgb_to_hsv
from media_helpers import decode

from xdctools.commands.synth import synth
from xdctools.synth import (
    SynthParams,
    class_specs,
    render_flash_click,
    render_video,
    synthesize,
    write_flash_click,
)

CLASSES, PER_CLASS, SECONDS, FPS, SIZE = 3, 2, 2.0, 25, (160, 120)


def ffprobe(path: Path) -> dict:
    out = subprocess.run(
        ["ffprobe", "-v", "error", "-show_streams", "-show_format", "-of", "json", str(path)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return json.loads(out)


@pytest.fixture(scope="module")
def collection(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth") / "collection"
    args = [str(root), "--classes", str(CLASSES), "--per-class", str(PER_CLASS), "--seconds", str(SECONDS)]
    result = CliRunner().invoke(synth, [*args, "--fps", str(FPS), "--size", "160x120", "--seed", "7"])
    assert result.exit_code == 0, result.output
    return root


def test_writes_the_requested_class_tree(collection: Path):
    specs = class_specs(CLASSES)
    folders = sorted(p.name for p in collection.iterdir() if p.is_dir())
    assert folders == [s.name for s in specs]
    for s in specs:
        assert len(list((collection / s.name).glob("*.mp4"))) == PER_CLASS
    assert not [p for p in collection.rglob(".*")]  # no temporary files left behind
    doc = json.loads((collection / "synth.json").read_text())
    assert doc["complete"] is True
    assert doc["params"]["classes"] == CLASSES and doc["params"]["seed"] == 7
    assert [c["name"] for c in doc["classes"]] == folders
    assert sorted(f["path"] for f in doc["files"]) == sorted(
        p.relative_to(collection).as_posix() for p in collection.rglob("*.mp4")
    )


def test_files_have_the_stated_streams(collection: Path):
    for path in sorted(collection.rglob("*.mp4"))[::PER_CLASS]:
        probe = ffprobe(path)
        video = [s for s in probe["streams"] if s["codec_type"] == "video"]
        audio = [s for s in probe["streams"] if s["codec_type"] == "audio"]
        assert len(video) == 1 and len(audio) == 1, path
        v, a = video[0], audio[0]
        assert (v["codec_name"], v["width"], v["height"], v["pix_fmt"]) == ("h264", *SIZE, "yuv420p")
        assert v["avg_frame_rate"] == f"{FPS}/1" and int(v["nb_frames"]) == SECONDS * FPS
        assert (a["codec_name"], int(a["sample_rate"]), a["channels"]) == ("aac", 16_000, 1)
        assert abs(float(v["duration"]) - SECONDS) < 1 / FPS
        assert abs(float(a["duration"]) - SECONDS) < 1 / FPS


def test_same_seed_same_files_other_seed_other_files(collection: Path, tmp_path: Path):
    params = SynthParams(classes=CLASSES, per_class=PER_CLASS, seconds=SECONDS, fps=FPS, size=SIZE, seed=7)
    again = synthesize(tmp_path / "again", params, workers=2)
    for path in again.files:
        original = collection / path.relative_to(again.root)
        assert path.read_bytes() == original.read_bytes(), path
    fa, aa, _ = decode(again.files[0])
    fo, ao, _ = decode(collection / again.files[0].relative_to(again.root))
    assert np.array_equal(fa, fo) and np.array_equal(aa, ao)

    other = synthesize(tmp_path / "other", SynthParams(classes=1, per_class=1, seconds=SECONDS, seed=8))
    fx, ax, _ = decode(other.files[0])
    assert fx.shape == fa.shape and np.abs(fx.astype(int) - fa).mean() > 5
    assert not np.allclose(ax[: len(aa)], aa[: len(ax)], atol=1e-2)


def _class_pixels(frame: np.ndarray, hue: float, tol: float) -> np.ndarray:
    """Mask of saturated, bright pixels whose hue is within `tol` of `hue` (circular)."""
    hsv = rgb_to_hsv(frame[::2, ::2] / 255.0)
    d = np.abs(hsv[..., 0] - hue)
    return (np.minimum(d, 1 - d) < tol) & (hsv[..., 1] > 0.5) & (hsv[..., 2] > 0.35)


def test_classes_differ_in_both_modalities(collection: Path):
    specs = class_specs(CLASSES)
    tones = np.array([s.tone_hz for s in specs])
    for s in specs:
        for path in sorted((collection / s.name).glob("*.mp4")):
            frames, audio, rate = decode(path)
            # Audio: the class tone is the strongest component and no other class's tone is nearer.
            spectrum = np.abs(np.fft.rfft(audio * np.hanning(len(audio))))
            peak = np.fft.rfftfreq(len(audio), 1 / rate)[np.argmax(spectrum)]
            assert abs(peak / s.tone_hz - 1) < s.max_detune + 0.01, (path, peak)
            assert np.argmin(np.abs(np.log(tones / peak))) == s.index
            # Video: the class hue covers a shape-sized area in every sampled frame, other hues do not.
            for frame in frames[:: FPS // 2]:
                own = _class_pixels(frame, s.hue, s.hue_jitter + 0.03).sum()
                assert own > 40, (path, own)  # radius >= 14 px -> >= 150 px at half resolution
                for o in specs:
                    if o.index != s.index:
                        assert _class_pixels(frame, o.hue, o.hue_jitter).sum() < own / 2
    # Motion: class 0 moves horizontally, class 1 vertically.
    assert (specs[0].motion, specs[1].motion) == ("horizontal", "vertical")
    for s, axis in ((specs[0], 1), (specs[1], 0)):
        frames, _, _ = decode(sorted((collection / s.name).glob("*.mp4"))[0])
        centres = []
        for frame in frames[::5]:
            ys, xs = np.nonzero(_class_pixels(frame, s.hue, s.hue_jitter + 0.03))
            centres.append((ys.mean(), xs.mean()))
        spread = np.ptp(np.array(centres), axis=0)
        assert spread[axis] > 10 and spread[1 - axis] < 3, (s.motion, spread)


def test_render_video_is_pure_and_shaped():
    spec = class_specs(6)[4]
    f1, a1 = render_video(
        spec, np.random.default_rng(3), seconds=1.0, fps=10, size=(64, 48), sample_rate=8000
    )
    f2, a2 = render_video(
        spec, np.random.default_rng(3), seconds=1.0, fps=10, size=(64, 48), sample_rate=8000
    )
    assert f1.shape == (10, 48, 64, 3) and f1.dtype == np.uint8
    assert a1.shape == (8000,) and a1.dtype == np.float32 and np.abs(a1).max() <= 1
    assert np.array_equal(f1, f2) and np.array_equal(a1, a2)


def test_rerun_finishes_an_interrupted_collection(tmp_path: Path):
    params = SynthParams(classes=1, per_class=2, seconds=1.0, seed=1)
    first = synthesize(tmp_path / "c", params)
    kept = first.files[0].stat().st_mtime_ns
    data = first.files[1].read_bytes()
    first.files[1].unlink()
    second = synthesize(tmp_path / "c", params)
    assert second.written == 1
    assert first.files[0].stat().st_mtime_ns == kept and first.files[1].read_bytes() == data


def test_refuses_a_foreign_or_different_folder(tmp_path: Path):
    (tmp_path / "mine.txt").write_text("keep me")
    result = CliRunner().invoke(synth, [str(tmp_path), "--classes", "1", "--per-class", "1"])
    assert result.exit_code == 3 and str(tmp_path) in result.output and "not empty" in result.output
    assert (tmp_path / "mine.txt").read_text() == "keep me"

    synthesize(tmp_path / "s", SynthParams(classes=1, per_class=1, seconds=1.0))
    result = CliRunner().invoke(synth, [str(tmp_path / "s"), "--classes", "2", "--seconds", "1"])
    assert result.exit_code == 3 and "other parameters" in result.output

    result = CliRunner().invoke(synth, [str(tmp_path / "t"), "--size", "161x120"])
    assert result.exit_code == 2 and "even" in result.output


def test_flash_and_click_at_the_given_time(tmp_path: Path):
    flash_time, fps = 1.24, 25
    path = write_flash_click(tmp_path / "flash.mp4", flash_time, seconds=3.0, fps=fps)
    frames, audio, rate = decode(path)
    brightness = frames.reshape(len(frames), -1).mean(axis=1)
    assert brightness.max() > 200 and np.median(brightness) < 40
    first_bright = int(np.argmax(brightness > brightness.max() / 2))
    assert first_bright == round(flash_time * fps)
    assert abs(first_bright / fps - flash_time) < 1 / fps
    loudest = int(np.argmax(np.abs(audio))) / rate
    assert abs(loudest - flash_time) < 1 / fps, loudest
    quiet = np.abs(np.r_[audio[: int((flash_time - 0.1) * rate)], audio[int((flash_time + 0.1) * rate) :]])
    assert quiet.max() < 0.02  # silence apart from the click

    with pytest.raises(ValueError, match="outside"):
        render_flash_click(5.0, seconds=3.0)
