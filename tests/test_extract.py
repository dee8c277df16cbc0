"""Feature extraction (trainer.extract) and `xdctools extract` on tiny shards made by the shard pipeline."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from trainer import sampling
from trainer.data import ClipSpec, Runtime, extract_loader, find_shards
from trainer.extract import catalog_from, extract_features, load_encoders, read_catalog, write_plan
from trainer.models import r2plus1d_18, resnet18_audio
from xdctools.commands.extract import extract
from xdctools.errors import DataError, InputError
from xdctools.features.store import open_store

CLIP = ClipSpec(length=4, crop=64)


@pytest.fixture(scope="module")
def shards(tiny_shards: Path):
    return find_shards(tiny_shards, "train")


def encoders(seed: int = 0) -> dict[str, torch.nn.Module]:
    torch.manual_seed(seed)
    return {"video": r2plus1d_18(width=0.125), "audio": resnet18_audio(width=0.125)}


def expected_features(models, shards) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The definition, written out: every segment's centre clip through the encoders, mean per video."""
    rows: dict[str, list[np.ndarray]] = {"video": [], "audio": []}
    index = []
    for m in models.values():
        m.eval()
    with torch.no_grad():
        for batch in extract_loader(shards, batch_size=5, clip=CLIP):
            index.append(batch["index"].numpy())
            for name, model in models.items():
                rows[name].append(model.forward_features(batch[name]).numpy())
    index = np.concatenate(index)
    out = {}
    for name, parts in rows.items():
        videos, out[name] = sampling.mean_per_video(np.concatenate(parts), index)
    return videos, out


# --- the catalog and the write plan (pure) ---------------------------------------------------------


def test_catalog_lists_every_sample_and_video_label(shards) -> None:
    catalog = read_catalog(shards)
    assert len(catalog.sample_video) == len(shards) == 18
    assert catalog.videos.tolist() == list(range(9))
    # keys are v<video>_<class folder>_..._s<segment>: each video's label is its folder's class index
    folder_class = {int(key[1:9]): int(key.split("_")[1][1:3]) for key in shards.keys}
    assert catalog.labels.tolist() == [folder_class[v] for v in range(9)]
    assert sorted(catalog.labels.tolist()) == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert catalog.rows_of(np.array([8, 0])).tolist() == [8, 0]
    with pytest.raises(DataError, match="not in the catalog"):
        catalog.rows_of(np.array([9]))
    assert not catalog.multi_label and catalog.label_offsets is None  # single-label shards


def test_catalog_refuses_interleaved_segments() -> None:
    with pytest.raises(DataError, match="segments of video 0 are not consecutive"):
        catalog_from(np.array([0, 1, 0]), np.array([0, 0, 0]))
    with pytest.raises(DataError, match="different labels"):
        catalog_from(np.array([0, 0, 1]), np.array([0, 1, 1]))


def label_lists(sample_video: list[int], lists: dict[int, list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Per-sample CSR of each sample's video's list, as read_catalog builds it."""
    per_sample = [lists[v] for v in sample_video]
    offsets = np.r_[0, np.cumsum([len(x) for x in per_sample])]
    return offsets, np.array([c for x in per_sample for c in x], dtype=np.int64)


def test_catalog_label_lists_follow_the_videos_not_the_sample_order() -> None:
    sample_video = [3, 3, 0, 2, 2, 2, 1, 4]  # shuffled videos, 1 to 3 segments each
    lists = {3: [5, 9], 0: [1], 2: [0, 2, 4], 1: [], 4: [9]}  # video 1: an empty list
    catalog = catalog_from(
        np.array(sample_video), np.full(8, -1), sample_label_lists=label_lists(sample_video, lists)
    )
    assert catalog.multi_label and not catalog.has_labels
    assert catalog.videos.tolist() == [0, 1, 2, 3, 4] and catalog.label_offsets.tolist() == [0, 1, 1, 4, 6, 7]
    assert [catalog.label_set(r).tolist() for r in range(5)] == [lists[v] for v in range(5)]
    rows = np.array([3, 1, 2, 3, 0])
    expected = np.zeros((5, 12), np.float32)
    for i, row in enumerate(rows):
        expected[i, lists[int(catalog.videos[row])]] = 1
    hot = catalog.multi_hot(rows, 12)
    assert hot.dtype == np.float32 and np.array_equal(hot, expected)
    assert catalog.multi_hot(np.array([], dtype=np.int64), 12).shape == (0, 12)
    with pytest.raises(DataError, match="class index 9 >= num_classes 9"):
        catalog.multi_hot(rows, 9)
    with pytest.raises(DataError, match=r"rows outside 0\.\.4"):
        catalog.multi_hot(np.array([5]), 12)


def test_catalog_refuses_segments_with_different_label_lists() -> None:
    video = np.array([0, 0, 1, 1])
    offsets, values = np.array([0, 2, 4, 5, 6]), np.array([1, 2, 1, 2, 3, 3])
    catalog = catalog_from(video, np.full(4, -1), sample_label_lists=(offsets, values))
    assert [catalog.label_set(r).tolist() for r in range(2)] == [[1, 2], [3]]
    with pytest.raises(DataError, match="segments of video 0 carry different label lists"):
        catalog_from(video, np.full(4, -1), sample_label_lists=(offsets, np.array([1, 2, 1, 4, 3, 3])))
    with pytest.raises(DataError, match="segments of video 1 carry different label lists"):
        catalog_from(video, np.full(4, -1), sample_label_lists=(np.array([0, 2, 4, 5, 5]), values[:5]))
    with pytest.raises(DataError, match="do not fit 4 samples"):
        catalog_from(video, np.full(4, -1), sample_label_lists=(offsets[:-1], values))


def test_single_label_catalog_gives_one_hot_rows() -> None:
    catalog = catalog_from(np.array([0, 0, 1, 2]), np.array([2, 2, -1, 0]))
    assert not catalog.multi_label and catalog.has_labels
    assert [catalog.label_set(r).tolist() for r in range(3)] == [[2], [], [0]]
    assert catalog.multi_hot(np.array([0, 1, 2]), 3).tolist() == [[0, 0, 1], [0, 0, 0], [1, 0, 0]]


@pytest.mark.parametrize("world", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("chunk", [1, 2, 3, 16])
def test_write_plan_gives_each_chunk_one_writer(world: int, chunk: int) -> None:
    rng = np.random.default_rng(world * 100 + chunk)
    segments = rng.integers(1, 5, size=11)
    catalog = catalog_from(np.repeat(np.arange(11), segments), np.zeros(segments.sum(), dtype=np.int64))
    n = catalog.num_videos
    writers = np.zeros(n, dtype=int)
    touched = np.zeros(n, dtype=int)
    for rank in range(world):
        plan = write_plan(catalog, rank, world, chunk)
        if plan.d1 > plan.d0:  # whole chunks inside the rank's rows
            assert plan.d0 % chunk == 0 and (plan.d1 % chunk == 0 or plan.d1 == n)
            assert plan.r0 <= plan.d0 < plan.d1 <= plan.r1
        writers[plan.d0 : plan.d1] += 1
        touched[plan.r0 : plan.r1] += 1
        # a directly written video has all its segments in this rank's range
        for row in range(plan.d0, plan.d1):
            seg = np.flatnonzero(catalog.sample_video == catalog.videos[row])
            assert plan.s0 <= seg.min() and seg.max() < plan.s1
    assert (touched >= 1).all() and writers.max() <= 1
    # what no rank writes itself goes to rank 0 in whole chunks (so rank 0 never shares a chunk)
    for c in range(0, n, chunk):
        assert len(set(writers[c : c + chunk].tolist())) == 1


# --- the extraction ------------------------------------------------------------------------------


def test_store_rows_are_the_mean_of_each_video_segments(shards, tmp_path: Path) -> None:
    models = encoders()
    store = extract_features(
        models, shards, tmp_path / "f.zarr", batch_size=4, clip=CLIP, run=Runtime(), attrs={"iteration": 3}
    )
    assert all(model.training for model in models.values())  # modes are given back
    videos, want = expected_features(models, shards)
    assert store.complete and store.n == 9
    assert np.array_equal(store.read_index(), videos)
    for m in ("video", "audio"):
        np.testing.assert_allclose(store.read(m, 0, 9).astype(np.float32), want[m], rtol=2e-3, atol=2e-3)
    assert store.attrs["iteration"] == 3 and len(store.attrs["checkpoint"]) == 16


def test_interrupted_store_resumes_and_a_complete_one_is_reused(shards, tmp_path: Path) -> None:
    models = encoders()
    path = tmp_path / "f.zarr"
    first = extract_features(models, shards, path, batch_size=4, clip=CLIP, run=Runtime(), chunk_rows=2)
    want = {m: first.read(m, 0, 9) for m in ("video", "audio")}
    # an interruption: chunk [4, 6) lost, as if the process died before writing it
    first.group["written"][4:6] = 0
    first.group["video"][4:6] = 0
    assert open_store(path).missing_chunks() == [2]
    again = extract_features(models, shards, path, batch_size=4, clip=CLIP, run=Runtime(), chunk_rows=2)
    assert again.complete
    for m in ("video", "audio"):
        np.testing.assert_array_equal(again.read(m, 0, 9), want[m])
    # complete and from the same weights: returned without running anything
    stamp = (path / "zarr.json").stat().st_mtime_ns
    extract_features(models, shards, path, batch_size=4, clip=CLIP, run=Runtime())
    assert (path / "zarr.json").stat().st_mtime_ns == stamp


def test_a_store_of_other_weights_is_not_overwritten_silently(shards, tmp_path: Path) -> None:
    path = tmp_path / "f.zarr"
    extract_features({"audio": encoders(0)["audio"]}, shards, path, batch_size=8, clip=CLIP, run=Runtime())
    with pytest.raises(InputError, match="other weights or data"):
        extract_features(
            {"audio": encoders(1)["audio"]}, shards, path, batch_size=8, clip=CLIP, run=Runtime()
        )
    store = extract_features(
        {"audio": encoders(1)["audio"]}, shards, path, batch_size=8, clip=CLIP, run=Runtime(), overwrite=True
    )
    assert store.complete and store.modalities == ("audio",)


# --- weights and the command ------------------------------------------------------------------------


def test_command_from_a_training_checkpoint(shards, tmp_path: Path) -> None:
    from trainer.checkpoint import save_checkpoint
    from trainer.models import MultiHead
    from trainer.step import Learner

    models = encoders(2)
    heads = {m: MultiHead(e.feature_dim, {"other": 3}) for m, e in models.items()}
    learner = Learner(models, heads)
    save_checkpoint(
        tmp_path / "it001-ep002.pt",
        {"iteration": 1, "config": {"bn_eps": 1e-5}, "model": learner.state_dict()},
        digest="x",
    )
    out = tmp_path / "feats.zarr"
    args = [str(tmp_path / "it001-ep002.pt"), str(shards.tars[0].parents[1]), "-o", str(out)]
    result = CliRunner().invoke(extract, [*args, "--crop", "64", "--clip-frames", "4", "--quiet"])
    assert result.exit_code == 0, result.output
    assert "9 videos x (video 64, audio 64)" in result.output
    store = open_store(out)
    assert store.attrs["iteration"] == 1 and store.attrs["weights"] == "xdctools"
    _, want = expected_features(models, shards)
    np.testing.assert_allclose(
        store.read("audio", 0, 9).astype(np.float32), want["audio"], rtol=2e-3, atol=2e-3
    )


@pytest.mark.parametrize("layout", ["torchvision", "xdc"])
def test_command_from_a_plain_video_state_dict(shards, tmp_path: Path, layout: str) -> None:
    torch.manual_seed(5)
    model = r2plus1d_18(width=0.125, layout=layout, num_classes=400)
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, tmp_path / "w.pth")
    loaded = load_encoders(tmp_path / "w.pth")
    assert list(loaded.encoders) == ["video"] and loaded.source == layout
    eps = loaded.encoders["video"].stem[1].eps
    assert eps == (1e-3 if layout == "xdc" else 1e-5)  # the official XDC weights come from Caffe2
    out = tmp_path / "feats.zarr"
    args = [str(tmp_path / "w.pth"), str(shards.tars[0].parents[1]), "-o", str(out), "--crop", "64"]
    result = CliRunner().invoke(extract, [*args, "--clip-frames", "4", "--quiet"])
    assert result.exit_code == 0, result.output
    assert open_store(out).modalities == ("video",)
    result = CliRunner().invoke(extract, [*args, "--modality", "audio", "--quiet"])
    assert result.exit_code == 5 and "holds no audio encoder" in result.output


def test_command_errors_are_one_line(shards, tmp_path: Path) -> None:
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    root = str(shards.tars[0].parents[1])
    result = CliRunner().invoke(extract, [str(tmp_path / "missing.pt"), root, "-o", str(tmp_path / "f")])
    assert result.exit_code == 3 and "checkpoint not found" in result.output
    result = CliRunner().invoke(extract, [str(tmp_path / "bad.pt"), root, "-o", str(tmp_path / "f")])
    assert result.exit_code == 5 and "cannot read checkpoint" in result.output
    assert len(result.output.strip().splitlines()) == 1
