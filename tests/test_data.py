"""DALI loaders (trainer.data) and their arithmetic (trainer.sampling), on shards made by `xdctools shard`."""

from __future__ import annotations

import io
import itertools
import re
import shutil
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch

from trainer import sampling
from trainer.data import (
    KINETICS_MEAN,
    KINETICS_STD,
    MEL_MEAN,
    MEL_STD,
    ClipSpec,
    Runtime,
    check_shards,
    eval_loader,
    extract_loader,
    find_shards,
    train_loader,
    warn_if_name_ordered,
)
from trainer.extract import read_catalog
from xdctools.atomic import write_bytes_atomic
from xdctools.errors import ConfigError, DataError
from xdctools.shard import format as fmt
from xdctools.shard.params import ShardParams
from xdctools.shard.plan import build_plan
from xdctools.shard.read import parse_index
from xdctools.shard.run import run_shard
from xdctools.synth import SynthParams, encode_mp4, synthesize, write_flash_click

FLASH_TIME = 2.5  # seconds, in a 5 s video at 25 fps: frames 62, 63, 64 are white
FLASH_FPS = 25
FLASH_FIRST, FLASH_FRAMES = round(FLASH_TIME * FLASH_FPS), 3
SMALL = ClipSpec(crop=112)  # the CPU recipe: 112 crops of frames stored with short side 128


def _shard(media: Path, out: Path, **params) -> Path:
    plan = build_plan(media)
    run_shard(plan, ShardParams(short_side=128, **params), out, shard_size=2, workers=2)
    return out


@pytest.fixture(scope="module")
def kinetics(media_dir: Path, tmp_path_factory) -> Path:
    """The 5 real Kinetics-layout clips (~10 s, 30 fps, one without audio): 27 segments in 3 tars."""
    return _shard(media_dir / "kinetics", tmp_path_factory.mktemp("kinetics"))


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    """6 synthetic 4 s videos at 25 fps (2 segments each: 64 + 36 frames) in 3 tars."""
    root = tmp_path_factory.mktemp("synth")
    synthesize(root / "videos", SynthParams(classes=2, per_class=3, seconds=4.0))
    return _shard(root / "videos", root / "shards")


@pytest.fixture(scope="module")
def flash(tmp_path_factory) -> Path:
    """One 5 s video, dark and silent except a white flash and a click at FLASH_TIME."""
    root = tmp_path_factory.mktemp("flash")
    write_flash_click(root / "videos" / "flash" / "flash.mp4", FLASH_TIME, seconds=5.0, fps=FLASH_FPS)
    return _shard(root / "videos", root / "shards")


@pytest.fixture(scope="module")
def ramp(tmp_path_factory) -> Path:
    """One 2 s silent video, dark on the left and bright on the right: a mirrored clip is visible."""
    root = tmp_path_factory.mktemp("ramp")
    frames = np.broadcast_to(np.linspace(0, 255, 128, dtype=np.uint8)[None, None, :, None], (50, 128, 128, 3))
    encode_mp4(root / "videos" / "ramp" / "ramp.mp4", frames, np.zeros(32_000), fps=25, sample_rate=16_000)
    return _shard(root / "videos", root / "shards")


def _infos(shards) -> dict[str, dict[str, int]]:
    """key -> decoded info member, read straight from the tars through their indexes."""
    return {key: fmt.decode_info(data) for key, data in _members(shards, fmt.INFO_EXT).items()}


def _members(shards, ext: str) -> dict[str, bytes]:
    out = {}
    for tar, idx in zip(shards.tars, shards.indexes, strict=True):
        raw = tar.read_bytes()
        for key, members in parse_index(idx.read_text()):
            offset, size = members[ext]
            out[key] = raw[offset : offset + size]
    return out


def _rows(loader) -> dict[str, torch.Tensor]:
    batches = list(loader)
    return {name: torch.cat([b[name] for b in batches]) for name in batches[0]}


# --- sampling: pure arithmetic -----------------------------------------------------------------


@pytest.mark.parametrize("frames", [1, 7, 8, 9, 63, 64, 65, 71, 72, 100, 128, 300, 301, 1000])
def test_every_clip_in_exactly_one_segment(frames: int) -> None:
    for span, num_clips in itertools.product([8, 16, 32], [1, 3, 10]):
        _check_clip_plan(frames, span, num_clips)


def _check_clip_plan(frames: int, span: int, num_clips: int) -> None:
    segments = [(s, min(64, frames - s)) for s in range(0, frames, 64)]
    plan = sampling.video_clips(frames, segments, num_clips, span)
    ids = [c.first + i for c in plan for i in range(c.count)]
    assert ids == list(range(num_clips))
    wanted = sampling.uniform_clip_starts(frames, num_clips, span)
    for (s0, n), clips in zip(segments, plan, strict=True):
        assert len(clips.starts) == clips.count
        assert np.all(clips.starts >= 0) and np.all(clips.starts <= max(n - span, 0))
        got = s0 + clips.starts
        shift = np.abs(got - wanted[clips.first : clips.first + clips.count])
        # a clip is moved only to fit inside its segment: at most half a clip, plus a short tail
        assert np.all(shift <= span // 2 + (frames % 64 if frames % 64 < span else 0))


def test_uniform_clip_starts_cover_the_whole_video() -> None:
    starts = sampling.uniform_clip_starts(300, 10, 8)
    assert starts[0] == 0 and starts[-1] == 292
    assert np.all(np.diff(starts) >= 32) and np.all(np.diff(starts) <= 33)
    assert sampling.uniform_clip_starts(5, 10, 8).tolist() == [0] * 10
    assert sampling.uniform_clip_starts(64, 1, 8).tolist() == [28]


def test_round_half_even_matches_python_round() -> None:
    for num in range(-50, 200):
        for den in (1, 2, 3, 4, 6, 48, 60, 2002):
            assert sampling.round_half_even(num, den) == round(Fraction(num, den))


def test_epoch_arithmetic() -> None:
    assert sampling.batches_per_epoch(1_000_000, 32, 8) == 3906
    assert sampling.batches_per_epoch(27, 4, 2) == 3
    with pytest.raises(ConfigError, match="smaller than one global batch"):
        sampling.batches_per_epoch(7, 4, 2)
    for n in (0, 1, 13, 27):
        ranges = [sampling.rank_range(n, r, 3) for r in range(3)]
        assert ranges[0][0] == 0 and ranges[-1][1] == n
        assert all(a[1] == b[0] for a, b in itertools.pairwise(ranges))
    with pytest.raises(ConfigError):
        sampling.rank_range(10, 2, 2)


def test_mean_per_video_groups_rows() -> None:
    rng = np.random.default_rng(0)
    video = np.array([5, 2, 5, 9, 2, 5])
    values = rng.normal(size=(6, 4)).astype(np.float32)
    ids, means = sampling.mean_per_video(values, video)
    assert ids.tolist() == [2, 5, 9]
    assert means.dtype == np.float32
    np.testing.assert_allclose(means[1], values[[0, 2, 5]].mean(0), rtol=1e-6)
    np.testing.assert_allclose(means[2], values[3])


# --- shards: up-front checks -------------------------------------------------------------------


def test_find_shards_lists_the_set(kinetics: Path) -> None:
    shards = find_shards(kinetics, "train")
    assert [t.name for t in shards.tars] == [f"train-{u:06d}-00.tar" for u in range(3)]
    assert len(shards) == sum(shards.sizes) == 27
    assert shards.video_ext == "webm" and shards.short_side == 128
    assert shards.name_ordered  # sharded from build_plan without a shuffle seed
    with pytest.warns(UserWarning, match=r"kinetics.*/train: videos are stored in name \(class\) order"):
        warn_if_name_ordered(shards)
    with pytest.raises(DataError, match="no set 'test'"):
        find_shards(kinetics, "test")


def test_broken_shards_are_named(synth: Path, tmp_path: Path) -> None:
    copy = tmp_path / "shards"
    shutil.copytree(synth, copy)
    tars = sorted((copy / "train").glob("*.tar"))
    check_shards(tars)

    def fails(message: str, tars: list[Path]) -> None:
        with pytest.raises(DataError, match=re.escape(message)):
            check_shards(tars)

    tars[2].unlink()
    with pytest.raises(DataError, match=re.escape(f"{tars[2]}: shard missing")):
        find_shards(copy, "train")  # dataset.json lists it: a gap is an error, not a smaller set

    idx = tars[1].with_suffix(".idx")
    lines = idx.read_text().splitlines()
    parts = lines[2].split()
    at = parts.index(fmt.MEL_EXT)
    key = parts[at + 3].split(".")[0]
    idx.write_text("\n".join([*lines[:2], " ".join(parts[:at] + parts[at + 4 :]), *lines[3:]]) + "\n")
    fails(f"{tars[1]}: sample {key} lacks its mel.npy member", tars[:2])
    idx.unlink()
    fails(f"{idx}: index of shard {tars[1].name} missing", tars[:2])

    # a member whose bytes are garbage passes the index checks, then fails by name when decoded
    key, members = parse_index(tars[0].with_suffix(".idx").read_text())[1]
    offset, size = members["webm"]
    raw = bytearray(tars[0].read_bytes())
    raw[offset : offset + size] = bytes(size)
    tars[0].write_bytes(bytes(raw))
    loader = extract_loader(check_shards(tars[:1]), batch_size=2, clip=SMALL)
    with pytest.raises(DataError, match=re.escape(f"{tars[0]}: member {key}.webm cannot be read")):
        list(loader)

    # DALI's reader may still map the old file: give the broken versions new inodes, never truncate it
    del loader
    write_bytes_atomic(tars[0], tars[0].read_bytes()[:5000])
    fails(f"{tars[0]}: truncated shard", tars[:1])
    write_bytes_atomic(tars[0], b"\0" * 200_000)
    fails(f"{tars[0]}: not a tar archive", tars[:1])


def test_a_broken_npy_member_is_named_though_dali_does_not_say_which(synth: Path, tmp_path: Path) -> None:
    copy = tmp_path / "shards"
    shutil.copytree(synth, copy)
    tar = sorted((copy / "train").glob("*.tar"))[0]
    key, members = parse_index(tar.with_suffix(".idx").read_text())[0]
    raw = bytearray(tar.read_bytes())
    offset, _ = members[fmt.MEL_EXT]
    raw[offset : offset + 64] = bytes(64)  # the header of a mel: DALI's numpy decoder names no sample
    write_bytes_atomic(tar, bytes(raw))
    loader = train_loader(check_shards([tar]), batch_size=2, epoch_size=2, clip=SMALL, run=Runtime())
    with pytest.raises(DataError, match=re.escape(f"{tar}: member {key}.mel.npy cannot be read: not an npy")):
        list(loader)
    del loader
    offset, size = members[fmt.INFO_EXT]
    raw[offset : offset + size] = bytes(size)  # the catalog's own read of the info members
    write_bytes_atomic(tar, bytes(raw))
    with pytest.raises(DataError, match=re.escape(f"{tar}: member {key}.info.npy cannot be read")):
        read_catalog(check_shards([tar]))


def test_h264_shards_need_the_gpu(tmp_path: Path) -> None:
    write_flash_click(tmp_path / "videos" / "flash" / "one.mp4", 1.0, seconds=2.0)
    shards = find_shards(_shard(tmp_path / "videos", tmp_path / "shards", codec="h264"), "train")
    assert shards.video_ext == "mp4"
    with pytest.raises(ConfigError, match=r"H\.264 shards need device 'gpu'"):
        train_loader(shards, batch_size=2, epoch_size=4, clip=SMALL)
    with pytest.raises(ConfigError, match="larger than the stored short side 128"):
        train_loader(shards, batch_size=2, epoch_size=4, clip=ClipSpec(crop=224), run=Runtime(device="gpu"))


# --- training loader ---------------------------------------------------------------------------


def test_train_batches_shapes_and_ranges(kinetics: Path) -> None:
    shards = find_shards(kinetics, "train")
    loader = train_loader(shards, batch_size=4, epoch_size=12, clip=SMALL, spec_augment=True)
    batches = list(loader)
    assert len(batches) == len(loader) == 3
    b = batches[0]
    assert b["video"].shape == (4, 3, 8, 112, 112) and b["video"].dtype == torch.float32
    assert b["audio"].shape == (4, 1, fmt.N_MELS, fmt.WINDOW_FRAMES) and b["audio"].dtype == torch.float32
    lo = (0 - np.array(KINETICS_MEAN)) / np.array(KINETICS_STD)
    hi = (1 - np.array(KINETICS_MEAN)) / np.array(KINETICS_STD)
    for c in range(3):
        assert lo[c] - 1e-4 <= b["video"][:, c].min() and b["video"][:, c].max() <= hi[c] + 1e-4
    assert b["video"].std() > 0.1  # real pictures, not padding
    audio = torch.cat([x["audio"] for x in batches])
    assert torch.isfinite(audio).all() and audio.min() >= (fmt.TOP_DB_FLOOR - MEL_MEAN) / MEL_STD - 1e-6
    masked_bands = (audio == 0).all(dim=-1).any(dim=-1).flatten()  # SpecAugment's frequency band
    assert masked_bands.any()
    infos = _infos(shards).values()
    videos = {i["video"]: i for i in infos}
    rows = {name: torch.cat([x[name] for x in batches]) for name in ("index", "segment", "label", "frame")}
    for v, s, label, frame in zip(
        *(rows[n].tolist() for n in ("index", "segment", "label", "frame")), strict=True
    ):
        seg = next(i for i in infos if i["video"] == v and i["segment"] == s)
        assert label == videos[v]["label"] and label in (0, 1, 2)
        assert seg["start_frame"] <= frame <= seg["start_frame"] + max(seg["num_frames"] - 8, 0)


def test_train_is_deterministic_under_a_seed(synth: Path) -> None:
    shards = find_shards(synth, "train")
    clip = ClipSpec(crop=96, short_side=112, stride=2)  # also exercises the resize and the stride

    def first_two(seed: int) -> list[dict[str, torch.Tensor]]:
        loader = train_loader(shards, batch_size=4, epoch_size=8, clip=clip, run=Runtime(seed=seed))
        return list(loader)

    a, b, c = first_two(3), first_two(3), first_two(4)
    assert a[0]["video"].shape == (4, 3, 8, 96, 96)
    for x, y in zip(a, b, strict=True):
        assert all(torch.equal(x[k], y[k]) for k in x)
    assert not all(torch.equal(x["video"], y["video"]) for x, y in zip(a, c, strict=True))


def test_equal_batches_on_every_rank(kinetics: Path) -> None:
    shards = find_shards(kinetics, "train")  # 27 segments: ranks read 13 and 14
    counts, firsts = [], []
    for rank in range(2):
        run = Runtime(rank=rank, world_size=2)
        loader = train_loader(
            shards, batch_size=3, epoch_size=20, clip=ClipSpec(crop=64, short_side=64), run=run
        )
        epochs = [list(loader) for _ in range(2)]
        counts.append([len(e) for e in epochs])
        # the first 9 clips come from this rank's part of the shards: the ranks' parts are disjoint
        firsts.append(
            {
                (v, s)
                for b in epochs[0]
                for v, s in zip(b["index"].tolist(), b["segment"].tolist(), strict=True)
            }
        )
        assert all(b["video"].shape[0] == 3 for e in epochs for b in e)
        assert len(loader) == 3
    assert counts == [[3, 3], [3, 3]]
    assert len(firsts[0]) == len(firsts[1]) == 9 and not firsts[0] & firsts[1]


# --- extraction loader -------------------------------------------------------------------------


def test_extraction_over_two_ranks_covers_every_segment_once(kinetics: Path) -> None:
    shards = find_shards(kinetics, "train")
    infos = _infos(shards)
    all_rows = []
    for rank in range(2):
        loader = extract_loader(shards, batch_size=4, clip=SMALL, run=Runtime(rank=rank, world_size=2))
        rows = _rows(loader)
        got = list(zip(rows["index"].tolist(), rows["segment"].tolist(), strict=True))
        want = [(infos[k]["video"], infos[k]["segment"]) for k in loader.keys]
        assert got == want  # this rank's samples once each, in shard order, padding dropped
        assert len(loader) == -(-len(want) // 4)
        all_rows += got
        assert rows["video"].shape[1:] == (3, 8, 112, 112)
        # the centred clip of each segment
        starts = [
            infos[k]["start_frame"] + sampling.centre_clip_start(infos[k]["num_frames"], 8)
            for k in loader.keys
        ]
        assert rows["frame"].tolist() == starts
    assert sorted(all_rows) == sorted((i["video"], i["segment"]) for i in infos.values())
    assert len(set(all_rows)) == len(all_rows) == 27

    # no augmentation: a second pass gives the same tensors; per-video pooling by the video index
    again = _rows(extract_loader(shards, batch_size=4, clip=SMALL, run=Runtime(rank=1, world_size=2)))
    assert torch.equal(again["video"], rows["video"]) and torch.equal(again["audio"], rows["audio"])
    feats = rows["video"].mean(dim=(2, 3, 4)).numpy()
    ids, pooled = sampling.mean_per_video(feats, rows["index"].numpy())
    for v, p in zip(ids, pooled, strict=True):
        np.testing.assert_allclose(p, feats[rows["index"].numpy() == v].mean(0), rtol=1e-5)


def test_audio_only_extraction(kinetics: Path) -> None:
    shards = find_shards(kinetics, "train", video=False)
    rows = _rows(extract_loader(shards, batch_size=8, clip=ClipSpec(video=False)))
    assert "video" not in rows and rows["audio"].shape == (27, 1, fmt.N_MELS, fmt.WINDOW_FRAMES)


# --- evaluation loader -------------------------------------------------------------------------


def test_eval_gives_n_aligned_clips_per_video_in_order(synth: Path) -> None:
    shards = find_shards(synth, "train")
    rows = _rows(eval_loader(shards, batch_size=3, num_clips=10, clip=SMALL))
    infos = _infos(shards)
    mels = {k: np.load(io.BytesIO(b)) for k, b in _members(shards, fmt.MEL_EXT).items()}
    index, clip_ids, frames = (rows[n].numpy() for n in ("index", "clip", "frame"))
    assert rows["video"].shape == (60, 3, 8, 112, 112) and rows["audio"].shape == (60, 1, 40, 100)
    for v in range(6):
        mine = index == v
        assert clip_ids[mine].tolist() == list(range(10))
        keys = sorted(k for k, i in infos.items() if i["video"] == v)
        segments = [(infos[k]["start_frame"], infos[k]["num_frames"]) for k in keys]
        total = infos[keys[0]]["video_frames"]
        plan = sampling.video_clips(total, segments, 10, 8)
        want = [s0 + start for (s0, _), c in zip(segments, plan, strict=True) for start in c.starts]
        assert frames[mine].tolist() == want
        # each audio window is the stored mel at format.clip_mel_start of its clip, standardised
        for row in np.flatnonzero(mine):
            seg = max(
                (k for k in keys if infos[k]["start_frame"] <= frames[row]),
                key=lambda k: infos[k]["start_frame"],
            )
            info = infos[seg]
            local = frames[row] - info["start_frame"]
            col = fmt.clip_mel_start(
                local,
                8,
                Fraction(info["fps_num"], info["fps_den"]),
                segment_start=info["start_frame"],
                video_frames=info["video_frames"],
                mel_frames=info["mel_frames"],
            )
            window = np.full((40, 100), fmt.TOP_DB_FLOOR, dtype=np.float32)
            part = mels[seg][:, col : col + 100].astype(np.float32)
            window[:, : part.shape[1]] = part
            np.testing.assert_allclose(
                rows["audio"][row, 0].numpy(), (window - MEL_MEAN) / MEL_STD, atol=1e-5
            )

    # a "prediction" per clip, averaged per video, equals the mean over that video's 10 clips
    rng = np.random.default_rng(0)
    weights = rng.normal(size=(3 * 8, 5)).astype(np.float32)
    pred = rows["video"].mean(dim=(3, 4)).reshape(60, -1).numpy() @ weights
    ids, video_pred = sampling.mean_per_video(pred, index)
    assert ids.tolist() == list(range(6))
    for v in range(6):
        np.testing.assert_allclose(video_pred[v], pred[index == v].mean(0), rtol=1e-5, atol=1e-6)


# --- audio-visual alignment --------------------------------------------------------------------


def _flash_and_click(rows: dict[str, torch.Tensor], stride: int) -> int:
    """Check every clip: white frames exactly where the flash is; the click where the mapping puts it."""
    span = 8 * stride
    with_flash = 0
    for video, audio, frame in zip(rows["video"], rows["audio"], rows["frame"].tolist(), strict=True):
        numbers = frame + stride * np.arange(8)
        bright = video.mean(dim=(0, 2, 3)).numpy() > 0.5  # white is ~+2 after normalisation, dark ~-1.6
        assert bright.tolist() == [FLASH_FIRST <= f < FLASH_FIRST + FLASH_FRAMES for f in numbers]
        if not bright.any():
            continue
        with_flash += 1
        # the window is centred on the clip: it starts at (frame + span/2)/fps - 1 s
        start = round((frame + span / 2) / FLASH_FPS * fmt.MEL_FPS) - fmt.MEL_PAD_FRAMES
        expected = round(FLASH_TIME * fmt.MEL_FPS) - start
        loudness = audio[0].mean(dim=0).numpy()
        assert 0 <= expected < fmt.WINDOW_FRAMES
        assert abs(int(np.argmax(loudness)) - expected) <= 2
        assert loudness.max() > loudness.min() + 1.0  # a click, not silence
    return with_flash


def test_training_clips_hear_what_they_show(flash: Path) -> None:
    shards = find_shards(flash, "train")
    loader = train_loader(shards, batch_size=16, epoch_size=320, clip=ClipSpec(crop=96), run=Runtime(seed=1))
    rows = _rows(loader)
    assert len(rows["frame"]) == 320
    assert _flash_and_click(rows, stride=1) >= 3


def test_eval_clips_hear_what_they_show(flash: Path) -> None:
    shards = find_shards(flash, "train")
    rows = _rows(eval_loader(shards, batch_size=2, num_clips=40, clip=ClipSpec(crop=96, stride=2)))
    assert rows["clip"].tolist() == list(range(40))
    assert _flash_and_click(rows, stride=2) >= 3


def test_flip_off_keeps_every_training_clip_unmirrored(ramp: Path) -> None:
    shards = find_shards(ramp, "train")

    def left_darker(flip: bool) -> torch.Tensor:
        loader = train_loader(shards, batch_size=8, epoch_size=32, clip=SMALL, run=Runtime(seed=5), flip=flip)
        video = torch.cat([b["video"] for b in loader])  # (32, 3, L, 112, 112)
        return video[..., :56].mean(dim=(1, 2, 3, 4)) < video[..., 56:].mean(dim=(1, 2, 3, 4))

    assert left_darker(flip=False).all()
    mirrored = ~left_darker(flip=True)  # the default: about half the clips mirrored
    assert 0 < mirrored.sum() < 32
