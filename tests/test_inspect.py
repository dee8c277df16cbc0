"""xdctools inspect on real shards (synth videos and a generated wav through build_plan + run_shard)."""

from __future__ import annotations

import shutil
import wave
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
from click.testing import CliRunner

from xdctools.commands.inspect import inspect_cmd
from xdctools.errors import DataError
from xdctools.inspect import dataset_summary, load_dataset, read_sample, sample_timing
from xdctools.shard import format as fmt
from xdctools.shard.params import ShardParams
from xdctools.shard.plan import build_plan
from xdctools.shard.run import run_shard
from xdctools.synth import SynthParams, synthesize


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """2 classes x 1 video of 3 s at 25 fps -> 2 segments each (64 + 11 frames), one tar per video."""
    base = tmp_path_factory.mktemp("inspect")
    synthesize(base / "synth", SynthParams(classes=2, per_class=1, seconds=3.0, seed=5))
    summary = run_shard(build_plan(base / "synth"), ShardParams(short_side=64), base / "shards", shard_size=1)
    assert summary.complete and summary.ok == 2
    return base / "shards"


@pytest.fixture(scope="module")
def audio_shards(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("inspect-audio")
    (base / "clips").mkdir()
    t = np.arange(int(1.5 * 16_000)) / 16_000
    pcm = (0.4 * np.sin(2 * np.pi * 440 * t) * 32767).astype("<i2")
    with wave.open(str(base / "clips" / "tone.wav"), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16_000)
        w.writeframes(pcm.tobytes())
    summary = run_shard(build_plan(base / "clips"), ShardParams(), base / "shards")
    assert summary.complete and summary.ok == 1
    return base / "shards"


def _png_ok(path: Path) -> np.ndarray:
    img = matplotlib.image.imread(path)
    h, w = img.shape[:2]
    assert 300 <= w <= 3000 and 200 <= h <= 3000, img.shape
    rgb = img[..., :3]
    assert rgb.std() > 0.05  # not blank
    assert len(np.unique((rgb.reshape(-1, 3) * 255).astype(np.uint8), axis=0)) > 200
    return img


def test_summary_lists_kind_classes_sets_and_parameters(shards: Path):
    result = CliRunner().invoke(inspect_cmd, [str(shards)])
    assert result.exit_code == 0, result.output
    out = result.output
    assert "kind: class-tree" in out
    assert "classes: 2 (c00-circle-300hz, c01-square-3000hz)" in out
    train = next(line.split() for line in out.splitlines() if line.startswith("train "))
    assert train[:6] == ["train", "2", "2", "0", "4", "2"]  # videos, ok, failed, samples, shards
    assert "failures by reason: none" in out
    assert "short_side=64" in out and "codec=vp9" in out and "40 bands" in out
    assert "order: by name (class order" in out  # sharded from a plan without a shuffle seed
    assert "key:" not in out  # no sample unless asked


def test_png_of_the_first_sample(shards: Path, tmp_path: Path):
    out = tmp_path / "first.png"
    result = CliRunner().invoke(inspect_cmd, [str(shards), "--png", str(out)])
    assert result.exit_code == 0, result.output
    first = read_sample(shards)
    assert f"key: {first.key}" in result.output and "label: c00-circle-300hz (0)" in result.output
    assert first.key.endswith("_s000") and first.info["start_frame"] == 0
    img = _png_ok(out)
    assert img.shape[0] > img.shape[1] * 0.5  # frame grid above the mel
    assert not list(tmp_path.glob(".*"))


def test_png_of_a_chosen_short_segment(shards: Path, tmp_path: Path):
    dataset = load_dataset(shards)
    last_tar = shards / dataset["files"][-1]["tar"]
    key = fmt.make_key(1, "c01-square-3000hz/c01_0000.mp4", 1)
    sample = read_sample(shards, key)
    assert sample.shard == last_tar and sample.info["start_frame"] == 64 and sample.info["num_frames"] == 11
    out = tmp_path / "seg.png"
    result = CliRunner().invoke(inspect_cmd, [str(shards), "--key", key, "--png", str(out), "--frames", "4"])
    assert result.exit_code == 0, result.output
    assert "label: c01-square-3000hz (1)" in result.output
    _png_ok(out)
    # The mel time axis: column 0 of the stored mel sits MEL_PAD_SECONDS before the segment start.
    timing = sample_timing(sample.info)
    assert timing.start == pytest.approx(64 / 25) and timing.end == pytest.approx(75 / 25)
    assert timing.mel_start == pytest.approx(timing.start - fmt.MEL_PAD_SECONDS, abs=0.5 / fmt.MEL_FPS)


def test_index_and_scan_read_the_same_sample(shards: Path, tmp_path: Path):
    copy = tmp_path / "noidx"
    shutil.copytree(shards, copy)
    for idx in copy.glob("*/*.idx"):
        idx.unlink()
    key = fmt.make_key(0, "c00-circle-300hz/c00_0000.mp4", 1)
    indexed, scanned = read_sample(shards, key), read_sample(copy, key)
    assert indexed.members == scanned.members
    assert set(indexed.members) == {"cls", "info.npy", "json", "mel.npy", "webm"}


def test_audio_only_sample(audio_shards: Path, tmp_path: Path):
    out = tmp_path / "audio.png"
    result = CliRunner().invoke(inspect_cmd, [str(audio_shards), "--png", str(out)])
    assert result.exit_code == 0, result.output
    assert "kind: audio" in result.output
    _png_ok(out)
    sample = read_sample(audio_shards)
    assert "webm" not in sample.members
    timing = sample_timing(sample.info)
    assert timing.fps is None and timing.end == pytest.approx(1.5, abs=0.03)


def test_missing_dataset_and_unknown_key_are_one_line_errors(shards: Path, tmp_path: Path):
    result = CliRunner().invoke(inspect_cmd, [str(tmp_path)])
    assert result.exit_code == DataError.exit_code
    assert str(tmp_path / "dataset.json") in result.output and len(result.output.strip().splitlines()) == 1

    result = CliRunner().invoke(inspect_cmd, [str(shards), "--key", "v99999999_nope_s000"])
    assert result.exit_code == DataError.exit_code
    assert "v99999999_nope_s000" in result.output and str(shards) in result.output
    assert len(result.output.strip().splitlines()) == 1

    assert "kind: ?" in dataset_summary({})  # an empty document still summarises
