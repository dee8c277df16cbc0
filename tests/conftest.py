"""Paths to the real test data beside the project (../shared); never copied into the repo."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.fail(f"real test data not found at {SHARED} (the project expects ../shared)")
    return SHARED


@pytest.fixture(scope="session")
def media_dir(shared_dir: Path) -> Path:
    return shared_dir / "data" / "media"


@pytest.fixture(scope="session")
def class_tree(media_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small class tree of 8 real clips (links), two of them unusable (empty, truncated): with shards of
    2 videos, 4 units of 2 videos."""
    root = tmp_path_factory.mktemp("tree")
    picks = [
        "UCF-101/SoccerJuggling/v_SoccerJuggling_g23_c01.avi",
        "UCF-101/SoccerJuggling/v_SoccerJuggling_g24_c01.avi",
        "edge/empty.mp4",
        "edge/truncated_R6llTwEh07w.mp4",
        "hmdb51/cartwheel/Turnk_r_Pippi_Michel_cartwheel_f_cm_np2_le_med_6.avi",
        "hmdb51/wave/RATRACE_wave_f_nm_np1_fr_goo_37.avi",
        "hmdb51/wave/SchoolRulesHowTheyHelpUs_wave_f_nm_np1_ba_med_0.avi",
        "hmdb51/wave/TrumanShow_wave_f_nm_np1_fr_med_26.avi",
    ]
    for rel in picks:
        folder = "broken" if rel.startswith("edge/") else rel.split("/")[1]
        (root / folder).mkdir(exist_ok=True)
        (root / folder / Path(rel).name).symlink_to(media_dir / rel)
    return root


@pytest.fixture(scope="session")
def splits_dir(shared_dir: Path) -> Path:
    return shared_dir / "data" / "splits"


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The trainer tests' tiny set: 3 classes x 3 synthetic 3 s videos, 2 segments each (64 + 11 frames),
    short side 64, 3 tars, in the shuffled order `xdctools shard` writes. Made once per session."""
    from xdctools.shard.params import ShardParams
    from xdctools.shard.plan import build_plan, shuffle_plan
    from xdctools.shard.run import run_shard
    from xdctools.synth import SynthParams, synthesize

    root = tmp_path_factory.mktemp("xdc-tiny")
    synthesize(root / "videos", SynthParams(classes=3, per_class=3, seconds=3.0, size=(96, 64)))
    plan = shuffle_plan(build_plan(root / "videos"), 0)
    run_shard(plan, ShardParams(short_side=64), root / "shards", shard_size=3, workers=2)
    return root / "shards"


@pytest.fixture(scope="session")
def audioset_shards(tiny_shards: Path, splits_dir: Path) -> Path:
    """A multi-label set: the tiny set's 9 synthetic videos under the names of 9 real rows of AudioSet's
    balanced_train_segments.csv (real label lists, real class index), sharded through the AudioSet input
    as set `balanced_train`. The labels say nothing about the pictures; the plumbing is what is tested."""
    from xdctools.shard.params import ShardParams
    from xdctools.shard.plan import build_plan, shuffle_plan
    from xdctools.shard.run import run_shard

    root = tiny_shards.parent / "audioset"
    if (root / "shards" / "dataset.json").is_file():
        return root / "shards"
    lines = (splits_dir / "audioset" / "balanced_train_segments.csv").read_text().splitlines()
    rows = [line for line in lines[3:] if ".000, " in line and line.split(",")[1].strip().endswith(".000")][
        :9
    ]
    videos = sorted((tiny_shards.parent / "videos").glob("*/*.mp4"))
    (root / "downloads").mkdir(parents=True)
    for line, video in zip(rows, videos, strict=True):
        ytid, start, end = (cell.strip() for cell in line.split(",")[:3])
        (root / "downloads" / f"{ytid}_{float(start):06.0f}_{float(end):06.0f}.mp4").symlink_to(video)
    csv = root / "balanced_train_segments.csv"
    csv.write_text("\n".join([*lines[:3], *rows]) + "\n")
    (root / "class_labels_indices.csv").symlink_to(splits_dir / "audioset" / "class_labels_indices.csv")
    plan = shuffle_plan(build_plan(root / "downloads", csv=csv), 0)
    run_shard(plan, ShardParams(short_side=64), root / "shards", shard_size=3, workers=2)
    return root / "shards"


@pytest.fixture(scope="session")
def synth_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The finetuning tests' split set: 2 classes x 4 synth videos (2 s, 64x48) via a manifest, sets
    split1-train (3+3) and split1-test (1+1), short side 48."""
    from xdctools.shard.params import ShardParams
    from xdctools.shard.plan import build_plan, shuffle_plan
    from xdctools.shard.run import run_shard
    from xdctools.synth import SynthParams, synthesize

    root = tmp_path_factory.mktemp("synth")
    made = synthesize(
        root / "videos", SynthParams(classes=2, per_class=4, seconds=2.0, size=(64, 48)), workers=2
    )
    rows = ["path,label,set"]
    for f in made.files:
        rel = f.relative_to(root / "videos").as_posix()
        test = f.stem.endswith("_0003")
        rows.append(f"{rel},{rel.split('/')[0]},{'split1-test' if test else 'split1-train'}")
    (root / "videos" / "manifest.csv").write_text("\n".join(rows) + "\n")
    plan = shuffle_plan(build_plan(root / "videos" / "manifest.csv"), 0)
    run_shard(plan, ShardParams(short_side=48), root / "shards", shard_size=3, workers=1)
    return root / "shards"


@pytest.fixture(scope="session")
def esc_shards(tmp_path_factory: pytest.TempPathFactory, shared_dir: Path) -> Path:
    """Real FSDD recordings laid out as ESC-50 (audio only): digits 0 and 1, one each per fold 1..5."""
    from xdctools.shard.params import ShardParams
    from xdctools.shard.plan import build_plan, shuffle_plan
    from xdctools.shard.run import run_shard

    root = tmp_path_factory.mktemp("esc")
    (root / "meta").mkdir()
    (root / "audio").mkdir()
    rows = ["filename,fold,target,category,esc10,src_file,take"]
    for digit in (0, 1):
        for fold in range(1, 6):
            name = f"{digit}_jackson_{fold}.wav"
            os.symlink(shared_dir / "data" / "fsdd" / "recordings" / name, root / "audio" / name)
            rows.append(f"{name},{fold},{digit},digit{digit},False,{fold},A")
    (root / "meta" / "esc50.csv").write_text("\n".join(rows) + "\n")
    run_shard(shuffle_plan(build_plan(root), 0), ShardParams(), root / "shards", shard_size=3, workers=1)
    return root / "shards"
