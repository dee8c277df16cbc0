"""xdctools digits: real MP4s whose audio is the FSDD recording and whose frames show the MNIST digit,
splits that never share a source, determinism, resume, clear errors, and the shard pipeline on the tree."""

from __future__ import annotations

import dataclasses
import gzip
import json
import re
import shutil
import tarfile
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from media_helpers import decode

from xdctools.commands.digits import digits
from xdctools.digits import (
    FSDD_INDICES,
    MNIST_HALVES,
    DigitsParams,
    Nuisance,
    choose_sources,
    digit_positions,
    draw_nuisance,
    list_fsdd,
    load_mnist,
    make_digits,
    read_recording,
    render_digit_video,
    scale_image,
)
from xdctools.errors import InputError
from xdctools.shard import format as fmt
from xdctools.shard.params import ShardParams
from xdctools.shard.plan import build_plan
from xdctools.shard.run import run_shard

# Tiny: one train and one test video per digit, short and small.
PARAMS = DigitsParams(per_digit_train=1, per_digit_test=1, seconds=1.5, fps=25.0, size=(64, 64), seed=3)


@pytest.fixture(scope="module")
def data(shared_dir: Path) -> tuple[Path, Path]:
    return shared_dir / "data" / "fsdd", shared_dir / "data" / "mnist"


@pytest.fixture(scope="module")
def mnist(data) -> tuple[np.ndarray, np.ndarray]:
    return load_mnist(data[1])


@pytest.fixture(scope="module")
def recordings(data):
    return list_fsdd(data[0])


@pytest.fixture(scope="module")
def tree(data, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("digits") / "videos"
    make_digits(root, PARAMS, fsdd_dir=data[0], mnist_dir=data[1], workers=2)
    return root


@pytest.fixture(scope="module")
def doc(tree: Path) -> dict:
    return json.loads((tree / "digits.json").read_text())


def best_lag(signal: np.ndarray, template: np.ndarray) -> tuple[int, float]:
    """Start in `signal` where `template` fits best, and the normalised correlation there (FFT)."""
    from scipy.signal import correlate

    n = len(template)
    t = template.astype(np.float64) - template.mean()
    t /= np.linalg.norm(t)
    x = signal.astype(np.float64)
    dot = correlate(x, t, mode="valid", method="fft")  # t has zero mean: window means drop out
    c1, c2 = np.concatenate([[0], np.cumsum(x)]), np.concatenate([[0], np.cumsum(x * x)])
    sums, squares = c1[n:] - c1[:-n], c2[n:] - c2[:-n]
    norms = np.sqrt(np.maximum(squares - sums * sums / n, 1e-12))
    corr = dot / norms
    return int(np.argmax(corr)), float(corr.max())


def best_place(grey: np.ndarray, template: np.ndarray) -> tuple[tuple[int, int], float]:
    """(x, y) top-left where `template` matches `grey` best (normalised correlation), and that score."""
    s = template.shape[0]
    windows = np.lib.stride_tricks.sliding_window_view(grey, (s, s)).reshape(-1, s * s)
    t = template.reshape(-1) - template.mean()
    t /= np.linalg.norm(t)
    centred = windows - windows.mean(axis=1, keepdims=True)
    corr = centred @ t / np.maximum(np.linalg.norm(centred, axis=1), 1e-9)
    y, x = np.unravel_index(int(np.argmax(corr)), (grey.shape[0] - s + 1, grey.shape[1] - s + 1))
    return (int(x), int(y)), float(corr.max())


# --- the tree ---------------------------------------------------------------------------------


def test_tree_counts_and_description(tree: Path, doc: dict):
    for split in ("train", "test"):
        assert sorted(p.name for p in (tree / split).iterdir()) == [str(d) for d in range(10)]
        for d in range(10):
            assert len(list((tree / split / str(d)).glob("*.mp4"))) == 1
    assert doc["complete"] is True and len(doc["files"]) == 20
    assert {f["path"] for f in doc["files"]} == {p.relative_to(tree).as_posix() for p in tree.rglob("*.mp4")}
    assert not list(tree.rglob(".*"))  # no temp files left
    manifest = (tree / "manifest.csv").read_text().splitlines()
    assert manifest[0] == "path,label,set" and len(manifest) == 21
    frames, audio, rate = decode(tree / "train" / "7" / "7_0000.mp4")
    assert frames.shape == (round(PARAMS.seconds * PARAMS.fps), 64, 64, 3) and rate == 16_000
    assert abs(len(audio) - PARAMS.seconds * rate) < 2048


def test_audio_is_the_fsdd_recording_of_the_same_digit(tree: Path, doc: dict, data, recordings):
    fsdd = data[0]
    for entry in doc["files"][::7]:
        rec = entry["recording"]
        assert Path(rec).name.startswith(f"{entry['digit']}_{entry['speaker']}_{entry['recording_index']}.")
        _, audio, _ = decode(tree / entry["path"])
        source = read_recording(fsdd / rec)
        lag, corr = best_lag(audio, source)
        assert corr > 0.9, entry
        assert abs(lag / 16_000 - entry["nuisance"]["audio_offset_s"]) < 0.005
        # Another speaker saying the same digit does not match: the check tells recordings apart.
        other = next(r for r in recordings if r.digit == entry["digit"] and r.speaker != entry["speaker"])
        other_audio = read_recording(other.path)
        if len(other_audio) <= len(audio):
            assert best_lag(audio, other_audio)[1] < 0.6
        # The speech lies inside the clip: nearly all the energy is where the recording was placed.
        start = round(entry["nuisance"]["audio_offset_s"] * 16_000)
        inside = np.sum(audio[start : start + len(source)] ** 2)
        assert inside / np.sum(audio**2) > 0.9


def test_frames_show_the_mnist_digit_where_described(tree: Path, doc: dict, mnist):
    images, labels = mnist
    for entry in doc["files"][::3]:
        assert labels[entry["mnist_index"]] == entry["digit"]
        frames, _, _ = decode(tree / entry["path"])
        nz = Nuisance(**{k: tuple(v) if isinstance(v, list) else v for k, v in entry["nuisance"].items()})
        xs, ys = digit_positions(nz, len(frames), PARAMS.fps, PARAMS.size)
        template = scale_image(images[entry["mnist_index"]], nz.digit_px)
        for i in (0, len(frames) // 2, len(frames) - 1):
            grey = frames[i].astype(np.float64).mean(axis=2)
            (x, y), corr = best_place(grey, template)
            assert corr > 0.75 and abs(x - xs[i]) <= 1 and abs(y - ys[i]) <= 1, (entry["path"], i, corr)
            # The digit is the brightest thing there: its strokes outshine the background around it.
            s = nz.digit_px
            box = grey[ys[i] : ys[i] + s, xs[i] : xs[i] + s]
            assert box[template > 0.8].mean() > box[template < 0.05].mean() + 40


# --- splits and determinism -------------------------------------------------------------------


def test_no_recording_or_image_is_in_both_splits(recordings, mnist):
    _, labels = mnist
    # More videos than FSDD's test pool holds (30 per digit): the pool cycles, never borrows from train.
    params = DigitsParams(per_digit_train=120, per_digit_test=40, seed=1)
    sources = choose_sources(recordings, labels, params)
    by_split = {s: [x for x in sources if x.split == s] for s in ("train", "test")}
    assert len(by_split["train"]) == 1200 and len(by_split["test"]) == 400
    recs = {s: {x.recording.path for x in v} for s, v in by_split.items()}
    imgs = {s: {x.mnist_index for x in v} for s, v in by_split.items()}
    assert not recs["train"] & recs["test"] and not imgs["train"] & imgs["test"]
    for split, group in by_split.items():
        for x in group:
            assert x.recording.digit == x.digit == labels[x.mnist_index]
            assert x.recording.index in FSDD_INDICES[split] and x.mnist_index in MNIST_HALVES[split]
    assert len(recs["test"]) == 300  # every test recording used; speakers drawn at random
    assert len({x.recording.speaker for x in by_split["train"]}) == 6


def test_sources_follow_the_seed(recordings, mnist):
    _, labels = mnist
    a = choose_sources(recordings, labels, DigitsParams(seed=5))
    assert a == choose_sources(recordings, labels, DigitsParams(seed=5))
    assert a != choose_sources(recordings, labels, DigitsParams(seed=6))
    # More videos per digit keep the first ones: a set can be grown without changing what it holds.
    fewer = choose_sources(recordings, labels, DigitsParams(seed=5, per_digit_train=40))
    assert [x for x in a if x.number < 40 or x.split == "test"] == fewer


def test_render_is_pure_and_seeded(mnist):
    images, _ = mnist
    audio = np.sin(np.arange(8000) / 5).astype(np.float32)
    kw = dict(seconds=1.0, fps=10.0, size=(64, 48))
    a = render_digit_video(images[0], audio, np.random.default_rng(1), **kw)
    b = render_digit_video(images[0], audio, np.random.default_rng(1), **kw)
    c = render_digit_video(images[0], audio, np.random.default_rng(2), **kw)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]
    assert not np.array_equal(a[0], c[0])
    assert a[0].shape == (10, 48, 64, 3) and a[0].dtype == np.uint8
    assert a[1].shape == (16_000,) and a[1].dtype == np.float32 and np.abs(a[1]).max() <= 1
    with pytest.raises(ValueError, match="longer than the clip"):
        render_digit_video(images[0], np.zeros(20_000, np.float32), np.random.default_rng(1), **kw)


def test_every_clip_window_of_a_default_video_hears_the_digit():
    """With the default 2 s videos, the audio window of any 8-frame clip overlaps the recording."""
    rate, fps, seconds = 16_000, 25, DigitsParams().seconds
    frames = round(seconds * fps)
    mel = fmt.segment_mel_frames(frames, Fraction(fps))
    windows = []  # (start, stop) seconds of every clip position's window, as the loaders cut it
    for clip in range(frames - 8 + 1):
        col = fmt.clip_mel_start(clip, 8, fps, segment_start=0, video_frames=frames, mel_frames=mel)
        first = (col - fmt.MEL_PAD_FRAMES) / fmt.MEL_FPS
        windows.append((first, first + fmt.WINDOW_SECONDS))
    for seed in range(200):
        rng = np.random.default_rng(seed)
        length = int(rng.integers(int(0.25 * rate), int(1.2 * rate)))
        nz = draw_nuisance(rng, size=(128, 128), seconds=seconds, audio_samples=length, sample_rate=rate)
        start, stop = nz.audio_offset_s, nz.audio_offset_s + length / rate
        assert start >= 0 and stop <= seconds + 1e-9
        for w0, w1 in windows:
            overlap = min(stop, w1) - max(start, w0)
            assert overlap >= min(0.2, length / rate / 2), (seed, w0, start, stop)


def test_rerun_finishes_an_interrupted_set_with_identical_files(tree: Path, data, tmp_path: Path):
    copy = tmp_path / "videos"
    shutil.copytree(tree, copy)
    gone = [copy / "train" / "2" / "2_0000.mp4", copy / "test" / "9" / "9_0000.mp4"]
    for path in gone:
        path.unlink()
    (copy / "manifest.csv").unlink()
    result = make_digits(copy, PARAMS, fsdd_dir=data[0], mnist_dir=data[1], workers=1)
    assert result.written == 2 and len(result.files) == 20
    for path in gone:  # the same seed gives the same bytes, in one process as in two workers
        assert path.read_bytes() == (tree / path.relative_to(copy)).read_bytes()
    assert (copy / "manifest.csv").read_text() == (tree / "manifest.csv").read_text()
    assert make_digits(copy, PARAMS, fsdd_dir=data[0], mnist_dir=data[1]).written == 0


def test_other_parameters_or_a_foreign_folder_are_refused(tree: Path, data, tmp_path: Path):
    with pytest.raises(InputError, match="other parameters"):
        make_digits(tree, DigitsParams(**{**PARAMS.__dict__, "seed": 4}), fsdd_dir=data[0], mnist_dir=data[1])
    (tmp_path / "stuff.txt").write_text("x")
    with pytest.raises(InputError, match="not empty"):
        make_digits(tmp_path, PARAMS, fsdd_dir=data[0], mnist_dir=data[1])


def test_command_on_a_finished_set_writes_nothing(tree: Path, data):
    args = ["--per-digit-train", "1", "--per-digit-test", "1", "--seconds", "1.5", "--size", "64x64"]
    args += ["--seed", "3", "--fsdd", str(data[0]), "--mnist", str(data[1])]
    result = CliRunner().invoke(digits, [str(tree), *args])
    assert result.exit_code == 0, result.output
    assert "20 videos" in result.output and "0 written, 20 already there" in result.output


# --- errors -----------------------------------------------------------------------------------


def test_missing_data_folders_name_the_path(data, tmp_path: Path):
    fsdd, mnist = data
    with pytest.raises(InputError, match=re.escape(str(tmp_path / "no-fsdd"))):
        make_digits(tmp_path / "out", PARAMS, fsdd_dir=tmp_path / "no-fsdd", mnist_dir=mnist)
    with pytest.raises(InputError, match=re.escape(str(tmp_path / "no-mnist"))):
        make_digits(tmp_path / "out", PARAMS, fsdd_dir=fsdd, mnist_dir=tmp_path / "no-mnist")
    result = CliRunner().invoke(
        digits, [str(tmp_path / "out"), "--fsdd", str(tmp_path / "nope"), "--mnist", str(mnist)]
    )
    assert result.exit_code == 3 and str(tmp_path / "nope") in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()  # nothing written before the inputs are known good


def test_broken_fsdd_folders_are_input_errors(tmp_path: Path):
    (tmp_path / "recordings").mkdir()
    with pytest.raises(InputError, match="no FSDD recordings"):
        list_fsdd(tmp_path)
    (tmp_path / "recordings" / "3_theo_7.wav").write_bytes(b"RIFF....WAVE")
    with pytest.raises(InputError, match=re.escape("3_theo_7.wav: unreadable wav")):
        list_fsdd(tmp_path)


def test_broken_mnist_files_are_input_errors(tmp_path: Path):
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(b"not gzip")
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(b"\0\0\x08\x01\0\0\0\1\5"))
    with pytest.raises(InputError, match=re.escape("t10k-images-idx3-ubyte.gz: cannot read")):
        load_mnist(tmp_path)
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(b"\0\0\x08\x01\0\0\0\1\5"))
    with pytest.raises(InputError, match="bad magic number"):
        load_mnist(tmp_path)
    (tmp_path / "t10k-images-idx3-ubyte.gz").unlink()
    with pytest.raises(InputError, match=re.escape("t10k-images-idx3-ubyte.gz not found")):
        load_mnist(tmp_path)


# --- the pipeline: digits -> shard ------------------------------------------------------------


def shard_labels(out: Path) -> dict[str, tuple[str, int, str]]:
    """Source name -> (label, class index, .cls member) of every sample in every tar under `out`."""
    found = {}
    for tar_path in sorted(out.glob("*/*.tar")):
        with tarfile.open(tar_path) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        for name, blob in members.items():
            if name.endswith(".json"):
                meta = json.loads(blob)
                cls = members[name[: -len("json")] + "cls"].decode()
                found[f"{tar_path.parent.name}:{meta['source']['name']}"] = (
                    meta["label"],
                    meta["class_index"],
                    cls,
                )
    return found


def test_shard_the_manifest_into_train_and_test_sets(tree: Path, tmp_path: Path):
    plan = build_plan(tree / "manifest.csv")
    assert plan.classes == [str(d) for d in range(10)] and sorted(plan.sets) == ["test", "train"]
    assert {s: len(jobs) for s, jobs in plan.sets.items()} == {"test": 10, "train": 10}
    # Digits 0 and 5 of each set keep the test fast; the jobs are the planner's own.
    sets = {
        s: [dataclasses.replace(j, index=i) for i, j in enumerate(jobs[::5])] for s, jobs in plan.sets.items()
    }
    plan = dataclasses.replace(plan, sets=sets)
    summary = run_shard(plan, ShardParams(short_side=64, audio_required=True), tmp_path / "shards", workers=1)
    assert summary.complete and summary.ok == 4
    labels = shard_labels(tmp_path / "shards")
    assert sorted(labels) == [f"{s}:{s}/{d}/{d}_0000.mp4" for s in ("test", "train") for d in (0, 5)]
    for key, (label, index, cls) in labels.items():
        set_name, name = key.split(":")
        split, digit = name.split("/")[:2]
        assert set_name == split and label == digit and index == int(digit) and cls == digit


def test_each_split_is_a_class_tree_for_the_planner(tree: Path):
    for split in ("train", "test"):
        plan = build_plan(tree / split, set_name=split)
        assert plan.kind == "class-tree" and list(plan.sets) == [split]
        assert plan.classes == [str(d) for d in range(10)]
        assert all(job.class_index == int(job.label) == int(job.name[0]) for job in plan.sets[split])
