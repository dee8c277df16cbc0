"""`clustering.init: handcrafted`: first audio pseudo-labels from the videos' stored log-mel statistics."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import yaml

from trainer import loop
from trainer.data import find_shards
from trainer.extract import read_catalog
from trainer.handcrafted import mel_statistics
from xdctools.cluster import KMeansParams, cluster_store
from xdctools.errors import DataError
from xdctools.features.store import open_store
from xdctools.recipe import parse_recipe
from xdctools.shard import format as fmt
from xdctools.shard.read import parse_index


def test_mel_statistics_are_each_videos_soundtrack_read_once(tiny_shards: Path) -> None:
    """Recomputed through tarfile: each sample's stored mel without its pads, grouped by video."""
    shards = find_shards(tiny_shards, "train")
    catalog = read_catalog(shards)
    spans: dict[int, list[np.ndarray]] = defaultdict(list)
    for tar in shards.tars:
        with tarfile.open(tar) as t:
            members = {m.name: t.extractfile(m).read() for m in t.getmembers() if m.isfile()}
        for name, data in members.items():
            if name.endswith("." + fmt.MEL_EXT):
                key = name[: -len(fmt.MEL_EXT) - 1]
                video = int(fmt.decode_int64_vector(members[f"{key}.{fmt.INFO_EXT}"])[fmt.INFO["video"]])
                mel = np.load(io.BytesIO(data)).astype(np.float64)
                spans[video].append(mel[:, fmt.MEL_PAD_FRAMES : -fmt.MEL_PAD_FRAMES])
    stats = mel_statistics(shards, catalog)
    assert stats.shape == (9, 2 * fmt.N_MELS) and stats.dtype == np.float32
    for row, video in enumerate(catalog.videos):
        whole = np.concatenate(spans[int(video)], axis=1)
        assert abs(whole.shape[1] - 3.0 * fmt.MEL_FPS) <= 2  # the 3 s soundtrack, each moment once
        np.testing.assert_allclose(stats[row, : fmt.N_MELS], whole.mean(1), rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(stats[row, fmt.N_MELS :], whole.std(1), rtol=1e-4, atol=1e-3)


def test_a_broken_mel_member_is_named(tiny_shards: Path, tmp_path: Path) -> None:
    broken = tmp_path / "shards"
    shutil.copytree(tiny_shards, broken)
    shards = find_shards(broken, "train")
    key, members = parse_index(shards.indexes[1].read_text())[2]
    offset, size = members[fmt.MEL_EXT]
    with open(shards.tars[1], "r+b") as f:
        f.seek(offset)
        f.write(b"\0" * size)
    with pytest.raises(DataError, match=rf"{shards.tars[1]}: member {key}\.mel\.npy cannot be read"):
        mel_statistics(shards, read_catalog(shards))


def handcrafted_recipe(shards: Path, out: Path, init: str, k: int | dict = 3) -> dict:
    return {
        "name": "handcrafted",
        "method": "xdc",
        "data": {"shards": str(shards), "clip_frames": 4, "crop": 64, "short_side": 64},
        "model": {"width": 0.125},
        "clustering": {"k": k, "iterations": 1, "niter": 10, "init": init},
        "optim": {"epoch_size": 4, "batch_size": 4, "lr": 0.05, "warmup_epochs": 0, "step_epochs": 1,
                  "total_epochs": 1},
        "run": {"out": str(out), "keep_features": True},
    }  # fmt: skip


def test_handcrafted_init_clusters_the_audio_side_on_the_mel_statistics(
    tiny_shards: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    recipe = parse_recipe(yaml.safe_dump(handcrafted_recipe(tiny_shards, out, "handcrafted")))
    loop.run(recipe)
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    clusters = {(r["iteration"], r["view"]): r for r in records if r["event"] == "cluster"}
    assert clusters[0, "audio"]["init"] == clusters[0, "video"]["init"] == "handcrafted"
    assert "init" not in clusters[1, "audio"]  # the final encoders' clusters are the encoders' own
    # the synthetic classes are three tones: their mel statistics separate them exactly
    assert clusters[0, "audio"]["nmi"] == pytest.approx(1.0)

    handcrafted, random = (open_store(out / "features" / f"it000{s}.zarr") for s in ("-handcrafted", ""))
    catalog = read_catalog(find_shards(tiny_shards, "train"))
    assert handcrafted.dims == {"video": random.dims["video"], "audio": 2 * fmt.N_MELS}
    assert np.array_equal(handcrafted.read_index(), random.read_index())
    assert np.array_equal(handcrafted.read("video", 0, 9), random.read("video", 0, 9))  # video unchanged
    stats = mel_statistics(find_shards(tiny_shards, "train"), catalog)
    np.testing.assert_allclose(handcrafted.read("audio", 0, 9), stats, rtol=1e-3, atol=0.05)  # float16
    for view in ("video", "audio"):  # the labels trained on are k-means of that store, as any iteration's
        again = cluster_store(
            handcrafted.path, KMeansParams(k=3, niter=10, seed=recipe.seed, gpu=False), view=view
        )
        assert np.array_equal(np.load(out / "clusters" / f"it000-{view}" / "labels.npy"), again.labels)


def test_handcrafted_only_gives_every_view_the_mel_statistics_clusters(
    tiny_shards: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    doc = handcrafted_recipe(tiny_shards, out, "handcrafted-only", k={"video": 2, "audio": 3})
    loop.run(parse_recipe(yaml.safe_dump(doc)))
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    first = {r["view"]: r for r in records if r["event"] == "cluster" and r["iteration"] == 0}
    assert {view: (r["k"], r["init"]) for view, r in first.items()} == {
        "video": (2, "handcrafted-only"),
        "audio": (3, "handcrafted-only"),
    }
    store = open_store(out / "features" / "it000-handcrafted.zarr")
    for view, k in (("video", 2), ("audio", 3)):  # each view's k over the same audio statistics
        again = cluster_store(store.path, KMeansParams(k=k, niter=10, seed=0, gpu=False), view="audio")
        assert np.array_equal(np.load(out / "clusters" / f"it000-{view}" / "labels.npy"), again.labels)
