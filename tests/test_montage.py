"""xdctools montage on real tiny shards, clustered for real; the page checked in headless chromium."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
from click.testing import CliRunner

from xdctools.cluster.kmeans import KMeansParams, cluster_array, load_result, save_result
from xdctools.commands.montage import montage
from xdctools.errors import DataError, InputError
from xdctools.inspect import decode_mel, decode_video, load_dataset, read_sample
from xdctools.shard import format as fmt
from xdctools.shard.params import ShardParams
from xdctools.shard.plan import build_plan
from xdctools.shard.run import run_shard
from xdctools.synth import SynthParams, synthesize
from xdctools.viz.montage import FirstSegments, pick_members, rank_rows, split_shown

K = 4
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--enable-logging=stderr",
    "--v=0",
]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    """3 classes × 4 synth videos of 1 s, sharded at short side 64 (3 tars); features: each video's
    mean log-mel (its sound), k-means k=4 as an audio clustering with index.npy = video indices."""
    base = tmp_path_factory.mktemp("montage")
    synthesize(base / "synth", SynthParams(classes=3, per_class=4, seconds=1.0, seed=3))
    summary = run_shard(build_plan(base / "synth"), ShardParams(short_side=64), base / "shards", shard_size=4)
    assert summary.complete and summary.ok == 12
    shards = FirstSegments(base / "shards")
    videos = np.array(sorted(shards.first))
    feats = []
    for v in videos:
        loc = shards.first[v]
        sample = read_sample(base / "shards", loc.key)
        feats.append(decode_mel(sample.members[fmt.MEL_EXT]).mean(axis=1))
    result = cluster_array(np.stack(feats), KMeansParams(k=K, seed=0, gpu=False))
    result.index = videos
    result.stats["view"] = "audio"
    save_result(result, base / "clusters")
    return {"base": base, "shards": base / "shards", "clusters": base / "clusters"}


def _chromium(*args: str) -> subprocess.CompletedProcess:
    exe = shutil.which("chromium")
    if exe is None:
        pytest.fail("chromium not found: it is a test dependency (apt-get install chromium)")
    with tempfile.TemporaryDirectory() as profile:
        return subprocess.run(
            [exe, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
            capture_output=True,
            text=True,
            timeout=120,
        )


def _console(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "CONSOLE" in line]


# --- pure ------------------------------------------------------------------------------------------


def test_rank_rows_purity_then_unlabelled_by_size():
    labels = np.array([0, 0, 0, 0, 1, 1, 2, 2, 2, 3, -1])
    truth = np.array([5, 5, 5, 6, 7, 7, -1, -1, -1, 2, 4])
    rows = rank_rows(labels, truth)
    assert [r.cluster for r in rows] == [1, 3, 0, 2]  # 1.0 (2 rows), 1.0 (1 row), 0.75, then unlabelled
    assert [r.rank for r in rows] == [1, 2, 3, 4]
    assert rows[2].size == 4 and rows[2].purity == 0.75 and rows[2].classes == ((5, 0.75), (6, 0.25))
    assert rows[3].purity is None and rows[3].size == 3 and rows[3].labelled == 0
    by_size = rank_rows(labels, None)
    assert [(r.cluster, r.size) for r in by_size] == [(0, 4), (2, 3), (1, 2), (3, 1)]
    assert split_shown(rows, 1, 1) == ([rows[0]], [rows[3]])
    assert split_shown(rows, 2, 2) == (rows, []) and split_shown(rows, None, None) == (rows, [])
    assert split_shown(rows, 1, 0) == ([rows[0]], [])


def test_pick_members_nearest_or_seeded():
    labels = np.array([1, 0, 1, 1, 0, 1, 1])
    dist = np.array([0.5, 9.0, np.nan, 0.1, 1.0, 0.5, 0.3], dtype=np.float32)
    picked = pick_members(labels, [1, 0], 3, distances=dist)
    assert picked[1].tolist() == [3, 6, 0]  # 0.1, 0.3, then the tie 0.5 by row; NaN last
    assert picked[0].tolist() == [4, 1]  # fewer members than asked: all of them
    a = pick_members(labels, [1], 2, seed=7)[1]
    b = pick_members(labels, [0, 1], 2, seed=7)[1]
    assert a.tolist() == b.tolist() and set(a) <= {0, 2, 3, 5, 6}  # independent of the other clusters
    many = {tuple(pick_members(labels, [1], 2, seed=s)[1]) for s in range(20)}
    assert len(many) > 1


# --- the command on real shards --------------------------------------------------------------------


def test_montage_writes_page_and_pngs_for_every_cluster(data, tmp_path: Path):
    out = tmp_path / "montage"
    res = CliRunner().invoke(montage, [str(data["clusters"]), str(data["shards"]), "-o", str(out)])
    assert res.exit_code == 0, res.output
    result = load_result(data["clusters"])
    clusters = sorted(set(result.labels.tolist()))
    assert f"12 videos in {len(clusters)} non-empty clusters" in res.output

    report = json.loads((out / "montage.json").read_text())
    shown = report["shown_rows"]
    assert sorted(r["cluster"] for r in shown) == clusters
    assert report["modality"] == "both" and report["pick"] == "nearest" and report["labelled"] == 12
    purities = [r["purity"] for r in shown]
    assert purities == sorted(purities, reverse=True)
    dataset = load_dataset(data["shards"])
    h, w = decode_video(read_sample(data["shards"]).members["webm"]).shape[1:3]
    for row in shown:
        members = np.flatnonzero(result.labels == row["cluster"])
        assert row["size"] == len(members)
        nearest = members[np.argsort(result.distances[members], kind="stable")][:6]
        assert [m["video"] for m in row["members"]] == result.index[nearest].tolist()
        for m in row["members"]:  # keys name the video's first segment; labels are the shards' own
            assert m["key"].startswith(f"v{m['video']:08d}_") and m["key"].endswith("_s000")
            assert m["label"] == int(read_sample(data["shards"], m["key"]).info["label"])
        _, fraction = row["classes"][0]
        assert fraction == row["purity"]
        img = matplotlib.image.imread(out / row["image"])
        # a member is its frame (96 px high, aspect kept) above a 2-px gap and its 48-px mel
        assert img.shape[0] == 96 + 2 + 48
        n = len(row["members"])
        assert img.shape[1] == n * round(w * 96 / h) + (n - 1) * 4
        assert img[..., :3].std() > 0.05
    page = (out / "index.html").read_text()
    for row in shown:
        assert f'id="cluster-{row["cluster"]}"' in page
        concept = dataset["classes"][row["classes"][0][0]]
        assert f"{concept}({row['classes'][0][1]:.2f})" in page
    assert "http://" not in page and "https://" not in page  # no external resources
    assert (out / "montage.png").is_file()
    assert sorted(p.name for p in (out / "rows").iterdir()) == [f"cluster-{c:04d}.png" for c in clusters]


def test_page_loads_in_headless_chromium_and_shows_every_cluster(data, tmp_path: Path):
    out = tmp_path / "montage"
    res = CliRunner().invoke(montage, [str(data["clusters"]), str(data["shards"]), "-o", str(out)])
    assert res.exit_code == 0, res.output
    clusters = sorted(set(load_result(data["clusters"]).labels.tolist()))

    # The rendered DOM, with a probe page beside index.html reporting whether every image decoded.
    page = (out / "index.html").read_text()
    probe = out / "probe.html"
    script = (
        "<script>addEventListener('load', () => { const bad = [...document.images]"
        ".filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.src);"
        "document.body.dataset.images = document.images.length;"
        "document.body.dataset.broken = bad.length;"
        "if (bad.length) console.error('broken images: ' + bad.join(' ')); });</script>"
    )
    probe.write_text(page.replace("</body>", script + "</body>"))
    dom = _chromium("--virtual-time-budget=5000", "--dump-dom", probe.as_uri())
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert _console(dom.stderr) == []
    assert f'data-images="{len(clusters)}"' in dom.stdout and 'data-broken="0"' in dom.stdout
    rows = re.findall(r'<tr class="cluster" id="cluster-(\d+)"', dom.stdout)
    assert sorted(map(int, rows)) == clusters

    # The page itself: no console message, and a screenshot that shows the table and its pictures.
    shot = tmp_path / "shot.png"
    run = _chromium("--screenshot=" + str(shot), "--window-size=1200,900", (out / "index.html").as_uri())
    assert run.returncode == 0, run.stderr[-2000:]
    assert _console(run.stderr) == []
    img = matplotlib.image.imread(shot)[..., :3]
    assert img.shape[:2] == (900, 1200)
    assert img.std() > 0.1  # not blank
    colours = np.unique((img.reshape(-1, 3) * 255).astype(np.uint8), axis=0)
    assert len(colours) > 1000  # frames and mels were drawn, not just text on white


def test_video_modality_random_members_top_and_bottom(data, tmp_path: Path):
    args = [str(data["clusters"]), str(data["shards"]), "--modality", "video", "--pick", "random"]
    args += ["--top", "1", "--bottom", "1", "--per-cluster", "2", "--seed", "5"]
    runner = CliRunner()
    res = runner.invoke(montage, [*args, "-o", str(tmp_path / "a")])
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "a" / "montage.json").read_text())
    ranks = [r["rank"] for r in report["shown_rows"]]
    assert ranks == [1, report["clusters"]] and report["hidden"] == report["clusters"] - 2
    assert report["pick"] == "random" and report["modality"] == "video"
    assert all(len(r["members"]) == min(2, r["size"]) for r in report["shown_rows"])
    img = matplotlib.image.imread(tmp_path / "a" / report["shown_rows"][0]["image"])
    assert img.shape[0] == 96  # frames only
    page = (tmp_path / "a" / "index.html").read_text()
    assert page.count('<tr class="cluster"') == 2 and f"{report['hidden']} clusters not shown" in page
    # same seed, same members; an existing folder is kept unless --overwrite
    res = runner.invoke(montage, [*args, "-o", str(tmp_path / "a")])
    assert res.exit_code == InputError.exit_code and "already exists" in res.output
    res = runner.invoke(montage, [*args, "-o", str(tmp_path / "a"), "--overwrite"])
    assert res.exit_code == 0
    again = json.loads((tmp_path / "a" / "montage.json").read_text())
    assert again["shown_rows"] == report["shown_rows"]
    res = runner.invoke(montage, [*args, "--modality", "audio", "--all", "-o", str(tmp_path / "b")])
    assert res.exit_code == 0, res.output
    audio = json.loads((tmp_path / "b" / "montage.json").read_text())
    assert len(audio["shown_rows"]) == audio["clusters"]
    img = matplotlib.image.imread(tmp_path / "b" / audio["shown_rows"][0]["image"])
    assert img.shape[0] == 96  # a mel alone is as high as a frame


def test_mismatched_inputs_fail_with_one_line(data, tmp_path: Path):
    runner = CliRunner()
    shards = str(data["shards"])
    # clusters of other videos (another set's indices)
    other = load_result(data["clusters"])
    other.index = other.index + 100
    save_result(other, tmp_path / "other")
    res = runner.invoke(montage, [str(tmp_path / "other"), shards, "-o", str(tmp_path / "o1")])
    assert res.exit_code == DataError.exit_code and "clustered videos (e.g. 100" in res.output
    # a result without index.npy cannot be matched to videos
    (tmp_path / "other" / "index.npy").unlink()
    res = runner.invoke(montage, [str(tmp_path / "other"), shards, "-o", str(tmp_path / "o2")])
    assert res.exit_code == DataError.exit_code and "no index.npy" in res.output
    # a shard folder with several sets needs --set
    two = tmp_path / "two"
    shutil.copytree(data["shards"], two)
    dataset = json.loads((two / "dataset.json").read_text())
    dataset["sets"]["val"] = {"shards": []}
    (two / "dataset.json").write_text(json.dumps(dataset))
    res = runner.invoke(montage, [str(data["clusters"]), str(two), "-o", str(tmp_path / "o3")])
    assert res.exit_code == InputError.exit_code and "train, val; pick one with --set" in res.output
    res = runner.invoke(
        montage, [str(data["clusters"]), str(two), "--set", "train", "-o", str(tmp_path / "o3")]
    )
    assert res.exit_code == 0, res.output
    # the set folder itself works too (dataset.json found beside it)
    res = runner.invoke(montage, [str(data["clusters"]), str(two / "train"), "-o", str(tmp_path / "o4")])
    assert res.exit_code == 0, res.output
    for r in (res,):
        assert len(r.output.strip().splitlines()) == 2
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


def test_shards_without_idx_files_read_the_same(data, tmp_path: Path):
    bare = tmp_path / "bare"
    shutil.copytree(data["shards"], bare)
    for idx in bare.glob("*/*.idx"):
        idx.unlink()
    runner = CliRunner()
    for shards, out in [(data["shards"], "with"), (bare, "without")]:
        res = runner.invoke(montage, [str(data["clusters"]), str(shards), "-o", str(tmp_path / out), "--all"])
        assert res.exit_code == 0, res.output
    rows = [
        json.loads((tmp_path / o / "montage.json").read_text())["shown_rows"] for o in ("with", "without")
    ]
    assert rows[0] == rows[1]
    for row in rows[0]:
        a, b = ((tmp_path / o / row["image"]).read_bytes() for o in ("with", "without"))
        assert a == b
