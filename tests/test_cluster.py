"""Out-of-core k-means on real features (FSDD log-mel and MFCC statistics) vs in-memory faiss and sklearn."""

from __future__ import annotations

import gc
import io
import itertools
import json
import tarfile
import tempfile
import tracemalloc
from collections import Counter
from dataclasses import replace
from pathlib import Path

import faiss
import numpy as np
import pytest
from click.testing import CliRunner
from faiss.contrib.clustering import DatasetAssign, reassign_centroids
from faiss.contrib.clustering import kmeans as contrib_kmeans
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

from xdctools.cluster import assign as assign_module
from xdctools.cluster import kmeans as kmeans_module
from xdctools.cluster.assign import ChunkAssign, StoreRows, l2_normalize
from xdctools.cluster.kmeans import (
    RESEED_ROUNDS,
    KMeansParams,
    cluster_array,
    cluster_store,
    cluster_store_to,
    load_result,
    reseed_centroids,
    sample_rows,
    save_result,
    write_result_files,
)
from xdctools.cluster.report import cluster_metrics, format_table, purity, rank_clusters, top_bottom
from xdctools.cluster.rowfiles import Float64Sum, NpyColumn, npy_header
from xdctools.commands.cluster import cluster
from xdctools.errors import ConfigError, DataError, InputError
from xdctools.features.store import create_store, open_store
from xdctools.shard.format import encode_info, make_key

SPEAKERS = ("george", "jackson", "lucas", "nicolas", "theo", "yweweler")
CHUNK = 32  # small chunks, so 360 rows stream through 12 of them


@pytest.fixture(scope="module")
def fsdd(shared_dir: Path) -> dict[str, np.ndarray]:
    """360 real recordings (6 speakers x 10 digits x 6): mean/std-pooled log-mel (80-d) and MFCC (40-d)."""
    import librosa
    import soundfile

    mel, mfcc, speaker, digit = [], [], [], []
    for s, name in enumerate(SPEAKERS):
        for d in range(10):
            for i in range(6):
                y, sr = soundfile.read(shared_dir / "data" / "fsdd" / "recordings" / f"{d}_{name}_{i}.wav")
                m = librosa.power_to_db(
                    librosa.feature.melspectrogram(y=y, sr=sr, n_fft=256, hop_length=80, n_mels=40)
                )
                c = librosa.feature.mfcc(S=m, n_mfcc=20)
                mel.append(np.r_[m.mean(1), m.std(1)])
                mfcc.append(np.r_[c.mean(1), c.std(1)])
                speaker.append(s)
                digit.append(d)
    return {
        "video": np.array(mel, dtype=np.float32),
        "audio": np.array(mfcc, dtype=np.float32),
        "speaker": np.array(speaker),
        "digit": np.array(digit),
        "index": np.arange(len(mel), dtype=np.int64) * 3 + 11,  # global sample index != row number
    }


def make_store(path: Path, feats: dict[str, np.ndarray], modalities=("video", "audio")) -> Path:
    n = len(feats["index"])
    store = create_store(path, n, {m: feats[m].shape[1] for m in modalities}, chunk_rows=CHUNK)
    for a in range(0, n, CHUNK):
        store.write_rows(a, {m: feats[m][a : a + CHUNK] for m in modalities}, feats["index"][a : a + CHUNK])
    return path


@pytest.fixture(scope="module")
def store_path(fsdd: dict[str, np.ndarray], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_store(tmp_path_factory.mktemp("feats") / "feats.zarr", fsdd)


def stored(fsdd: dict[str, np.ndarray], modality: str) -> np.ndarray:
    """What the store holds for a modality, as float32: the input rounded to float16."""
    return fsdd[modality].astype(np.float16).astype(np.float32)


def faiss_reference(x: np.ndarray, k: int, *, niter: int, seed: int, spc: int, spherical: bool = False):
    km = faiss.Kmeans(
        x.shape[1],
        k,
        niter=niter,
        seed=seed,
        max_points_per_centroid=spc,
        min_points_per_centroid=1,
        spherical=spherical,
    )
    km.train(x[sample_rows(len(x), k * spc, seed)])
    dist, labels = km.index.search(x, 1)
    return km, labels[:, 0], dist[:, 0]


@pytest.mark.parametrize("spc", [256, 8])  # the whole set fits in the sample / a sample of 96 rows
def test_labels_identical_to_in_memory_faiss_kmeans(store_path: Path, fsdd: dict, spc: int) -> None:
    result = cluster_store(
        store_path, KMeansParams(k=12, niter=15, seed=4, sample_per_centroid=spc), view="video"
    )
    x = stored(fsdd, "video")
    km, labels, dist = faiss_reference(x, 12, niter=15, seed=4, spc=spc)
    np.testing.assert_array_equal(result.labels, labels)
    assert result.labels.dtype == np.int32
    np.testing.assert_array_equal(result.centroids, km.centroids)
    np.testing.assert_allclose(result.distances, dist, rtol=1e-5, atol=1e-3)
    np.testing.assert_array_equal(result.index, fsdd["index"])
    assert result.stats["sample_size"] == min(360, 12 * spc)
    assert result.stats["objective"] == pytest.approx(float(dist.astype(np.float64).sum()), rel=1e-5)
    np.testing.assert_array_equal(result.stats["sizes"], np.bincount(labels, minlength=12))


def test_streaming_assignment_equals_assigning_everything_at_once(store_path: Path, fsdd: dict) -> None:
    x = stored(fsdd, "video")
    centroids = x[[3, 50, 101, 170, 220, 300, 355]].copy()
    index = faiss.IndexFlatL2(x.shape[1])
    index.add(centroids)
    dist_all, labels_all = index.search(x, 1)
    weights = np.linspace(0.5, 2.0, len(x))
    ref_sums = np.zeros(centroids.shape)
    np.add.at(ref_sums, labels_all[:, 0], x.astype(np.float64) * weights[:, None])

    store = open_store(store_path)
    for block_rows, prefetch in ((CHUNK, True), (3 * CHUNK, False), (None, True)):  # None: one block
        assign = ChunkAssign(StoreRows(store, "video"), block_rows=block_rows, prefetch=prefetch)
        dist, labels = assign.perform_search(centroids)
        np.testing.assert_array_equal(labels, labels_all[:, 0])
        np.testing.assert_allclose(dist, dist_all[:, 0], rtol=1e-5, atol=1e-3)
        labels2, _, sums = assign.assign_to(centroids, weights)
        np.testing.assert_array_equal(labels2, labels_all[:, 0])
        assert sums.dtype == np.float64
        np.testing.assert_allclose(sums, ref_sums, rtol=1e-12)
        rows = np.array([359, 0, 33, 33, 200, 31])  # any order, repeats, across chunks
        np.testing.assert_array_equal(assign.get_subset(rows), x[rows])


def test_faiss_contrib_kmeans_runs_over_the_store(store_path: Path, fsdd: dict) -> None:
    x = stored(fsdd, "audio")
    ours = contrib_kmeans(
        6, ChunkAssign(StoreRows(open_store(store_path), "audio")), niter=4, seed=7, verbose=False
    )
    ref = contrib_kmeans(6, DatasetAssign(x), niter=4, seed=7, verbose=False)
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4)


def test_cdc_view_equals_the_explicit_concatenation(store_path: Path, fsdd: dict) -> None:
    explicit = np.hstack([l2_normalize(stored(fsdd, "video")), l2_normalize(stored(fsdd, "audio"))])
    view = StoreRows(open_store(store_path), "cdc")
    got = np.empty((360, view.dim), dtype=np.float32)
    view.read_into(0, 360, got)
    np.testing.assert_allclose(got, explicit, rtol=1e-6, atol=1e-7)
    assert not any("cdc" in p.name for p in store_path.iterdir())  # never materialised

    on_store = cluster_store(store_path, KMeansParams(k=8, niter=10, seed=1), view="cdc")
    in_memory = cluster_array(explicit, KMeansParams(k=8, niter=10, seed=1))
    np.testing.assert_array_equal(on_store.labels, in_memory.labels)
    np.testing.assert_allclose(on_store.centroids, in_memory.centroids, rtol=1e-5, atol=1e-6)


def test_metrics_on_real_speaker_labels(store_path: Path, fsdd: dict) -> None:
    truth = fsdd["speaker"]
    result = cluster_store(store_path, KMeansParams(k=12, niter=20, seed=0), view="audio")
    metrics = cluster_metrics(truth, result.labels)
    assert metrics["nmi"] == pytest.approx(normalized_mutual_info_score(truth, result.labels))
    assert metrics["ari"] == pytest.approx(adjusted_rand_score(truth, result.labels))
    majority = sum(
        Counter(truth[result.labels == c].tolist()).most_common(1)[0][1] for c in np.unique(result.labels)
    )
    assert metrics["purity"] == pytest.approx(majority / len(truth))
    assert metrics["labelled"] == 360
    # MFCC statistics separate speakers: far above the same clusters scored against shuffled labels
    shuffled = np.random.default_rng(0).permutation(truth)
    assert metrics["nmi"] > 0.4 > cluster_metrics(shuffled, result.labels)["nmi"] + 0.3

    ranked = rank_clusters(truth, result.labels)
    assert [r.rank for r in ranked] == list(range(1, len(ranked) + 1))
    assert all(a.purity >= b.purity for a, b in itertools.pairwise(ranked))
    assert sum(r.size for r in ranked) == 360
    for r in ranked:
        members = truth[result.labels == r.cluster]
        assert r.classes[0] == (Counter(members.tolist()).most_common(1)[0][0], pytest.approx(r.purity))
        assert len(r.classes) <= 5


def test_purity_and_table_on_a_hand_computed_case() -> None:
    truth = np.array([0, 0, 1, 1, 1, 2, 2, -1, 3])
    clusters = np.array([0, 0, 0, 1, 1, 1, 2, 2, -1])  # the last two rows: unknown class, dropped row
    # cluster 0 -> classes {0: 2, 1: 1}, cluster 1 -> {1: 2, 2: 1}, cluster 2 -> {2: 1}: (2 + 2 + 1) / 7
    assert purity(truth, clusters) == pytest.approx(5 / 7)
    rows = rank_clusters(truth, clusters)
    assert [(r.rank, r.cluster, r.size) for r in rows] == [(1, 2, 1), (2, 0, 3), (3, 1, 3)]
    assert rows[1].classes == ((0, pytest.approx(2 / 3)), (1, pytest.approx(1 / 3)))
    text = format_table(rows, class_names=["zero", "one", "two"])
    assert text.splitlines()[2].split() == ["2", "0", "3", "0.67", "zero(0.67),", "one(0.33)"]
    assert len(top_bottom(list(range(30)), 10)) == 20 and top_bottom([1, 2], 10) == [1, 2]


def test_refine_passes_lower_the_objective(store_path: Path) -> None:
    base = cluster_store(store_path, KMeansParams(k=12, niter=2, seed=0, sample_per_centroid=4), view="video")
    refined = cluster_store(
        store_path, KMeansParams(k=12, niter=2, seed=0, sample_per_centroid=4, refine=3), view="video"
    )
    passes = [p["objective"] for p in refined.stats["refine"]]
    assert passes[0] == pytest.approx(
        base.stats["objective"], rel=1e-6
    )  # pass 1 scores the trained centroids
    assert refined.stats["objective"] <= passes[-1] <= passes[0]
    assert refined.stats["objective"] < base.stats["objective"]


def test_empty_clusters_are_split_and_reported(fsdd: dict) -> None:
    x = np.repeat(
        fsdd["audio"][:30], 12, axis=0
    )  # 30 distinct rows, each 12 times: k=40 must leave some empty
    result = cluster_array(x, KMeansParams(k=40, niter=5, seed=0, refine=1))
    sizes = np.asarray(result.stats["sizes"])
    assert result.stats["empty_clusters"] == np.flatnonzero(sizes == 0).tolist() != []
    assert result.stats["splits"] > 0 and result.stats["refine"][0]["splits"] > 0
    assert sizes.sum() == len(x) and result.stats["imbalance"] > 1


def collapsed(fsdd: dict, copies: int = 100) -> np.ndarray:
    """The 360 real MFCC rows plus `copies` copies of one of them (a share of clips an encoder collapsed)."""
    x = np.concatenate([fsdd["audio"], np.repeat(fsdd["audio"][:1], copies, axis=0)])
    return x[np.random.default_rng(0).permutation(len(x))]


@pytest.mark.parametrize("spherical", [False, True])
def test_clusters_left_empty_by_the_assignment_are_reseeded(fsdd: dict, spherical: bool) -> None:
    # A sample of k rows (--sample-per-centroid 1) holds several copies of the collapsed row: faiss cannot
    # split identical rows, so it ends with centroids no row is nearest to, in the sample and in all rows.
    x = collapsed(fsdd)
    params = KMeansParams(k=32, niter=10, seed=0, sample_per_centroid=1, spherical=spherical, gpu=False)
    plain = cluster_array(x, replace(params, reseed_empty=False))
    empty = plain.stats["empty_clusters"]
    assert len(empty) >= 3 and (plain.sizes[empty] == 0).all()
    assert plain.stats["reseeded"] == {"empty_before": len(empty), "rounds": 0, "clusters": 0}

    fixed = cluster_array(x, params)
    assert fixed.stats["empty_clusters"] == [] and fixed.stats["min_size"] >= 1
    np.testing.assert_array_equal(np.unique(fixed.labels), np.arange(32))
    assert fixed.stats["params"]["reseed_empty"] and not plain.stats["params"]["reseed_empty"]
    reseeded = fixed.stats["reseeded"]
    assert reseeded["empty_before"] == len(empty) and 1 <= reseeded["rounds"] <= RESEED_ROUNDS
    assert reseeded["clusters"] >= len(empty)
    # labels, distances and centroids agree: every row at its squared distance to the nearest centroid
    xs = l2_normalize(x.copy()) if spherical else x
    full = ((xs[:, None, :].astype(np.float64) - fixed.centroids[None].astype(np.float64)) ** 2).sum(-1)
    np.testing.assert_allclose(fixed.distances, full[np.arange(len(x)), fixed.labels], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(fixed.distances, full.min(1), rtol=1e-5, atol=1e-5)
    if spherical:
        np.testing.assert_allclose(np.linalg.norm(fixed.centroids, axis=1), 1, rtol=1e-5)
    assert fixed.stats["objective"] < plain.stats["objective"]
    again = cluster_array(x, params)  # seeded by --seed: reproducible
    assert again.labels.tobytes() == fixed.labels.tobytes()
    np.testing.assert_array_equal(again.centroids, fixed.centroids)


def test_reseed_rule_splits_a_donor_of_size_above_one() -> None:
    centroids = np.arange(1, 21, dtype=np.float32).reshape(5, 4)
    # donors: 2 (weight 3 - 1) and 3 (weight 7 - 1); clusters 1 and 4 have no row to spare
    counts = np.array([0, 1, 3, 7, 1])
    fac = np.array([1 + 1 / 1024, 1 - 1 / 1024] * 2, dtype=np.float32)
    donors = []
    for seed in range(400):
        new, n = reseed_centroids(centroids, counts, np.random.RandomState(seed))
        assert n == 1
        (donor,) = [c for c in (2, 3) if not np.array_equal(new[c], centroids[c])]
        np.testing.assert_allclose(new[0], centroids[donor] * fac, rtol=1e-6)
        np.testing.assert_allclose(new[donor], centroids[donor] / fac, rtol=1e-6)
        np.testing.assert_array_equal(
            np.delete(new, [0, donor], axis=0), np.delete(centroids, [0, donor], axis=0)
        )
        donors.append(donor)
    assert 0.65 < np.mean(np.array(donors) == 3) < 0.85  # drawn with probability 6/8
    assert counts.tolist() == [0, 1, 3, 7, 1] and centroids[0, 0] == 1  # inputs left alone

    a, _ = reseed_centroids(centroids, counts, np.random.RandomState(7))
    b, _ = reseed_centroids(centroids, counts, np.random.RandomState(7))
    assert a.tobytes() == b.tobytes()

    # two empties, one spare row: only the first is re-seeded; no spare row at all: nothing to do
    new, n = reseed_centroids(centroids, [0, 2, 0, 1, 1], np.random.RandomState(0))
    assert n == 1 and np.array_equal(new[2], centroids[2]) and not np.array_equal(new[0], centroids[0])
    new, n = reseed_centroids(centroids, [0, 1, 1, 0, 1], np.random.RandomState(0))
    assert n == 0 and np.array_equal(new, centroids)
    new, n = reseed_centroids(centroids, [2, 1, 1, 1, 1], np.random.RandomState(0))
    assert n == 0 and np.array_equal(new, centroids)

    # spherical: unit norm again, and the pair still points apart (the perturbation alternates by dimension)
    unit = l2_normalize(centroids.copy())
    new, _ = reseed_centroids(unit, [0, 1, 1, 5, 1], np.random.RandomState(0), spherical=True)
    np.testing.assert_allclose(np.linalg.norm(new, axis=1), 1, rtol=1e-6)
    assert float(new[0] @ new[3]) < 1 - 1e-7


def test_clusters_that_cannot_be_filled_are_reported(fsdd: dict) -> None:
    x = np.repeat(fsdd["audio"][:30], 12, axis=0)  # 30 distinct rows for 40 clusters
    result = cluster_array(x, KMeansParams(k=40, niter=5, seed=0, gpu=False))
    sizes = np.asarray(result.stats["sizes"])
    assert len(result.stats["empty_clusters"]) == 40 - np.count_nonzero(sizes) >= 10  # at most 30 filled
    assert result.stats["reseeded"]["rounds"] == RESEED_ROUNDS  # bounded: gives up, no error
    assert result.stats["reseeded"]["empty_before"] >= len(result.stats["empty_clusters"])
    assert sizes.sum() == len(x)


def test_reseeding_changes_nothing_without_empty_clusters(store_path: Path) -> None:
    on = cluster_store(store_path, KMeansParams(k=12, niter=10, seed=1, gpu=False), view="audio")
    off = cluster_store(
        store_path, KMeansParams(k=12, niter=10, seed=1, gpu=False, reseed_empty=False), view="audio"
    )
    assert on.stats["empty_clusters"] == [] and on.stats["reseeded"] == off.stats["reseeded"]
    assert on.stats["reseeded"] == {"empty_before": 0, "rounds": 0, "clusters": 0}
    assert on.labels.tobytes() == off.labels.tobytes()
    assert on.distances.tobytes() == off.distances.tobytes()
    assert on.centroids.tobytes() == off.centroids.tobytes()
    skip = ("params", "timings")
    assert {k: v for k, v in on.stats.items() if k not in skip} == {
        k: v for k, v in off.stats.items() if k not in skip
    }


def test_spherical_and_pca_whitening(fsdd: dict) -> None:
    x = fsdd["video"]
    unit = l2_normalize(x.copy())
    result = cluster_array(x, KMeansParams(k=10, niter=10, seed=2, spherical=True))
    _, labels, _ = faiss_reference(unit, 10, niter=10, seed=2, spc=256, spherical=True)
    np.testing.assert_array_equal(result.labels, labels)
    np.testing.assert_allclose(np.linalg.norm(result.centroids, axis=1), 1, rtol=1e-5)
    expected = ((unit - result.centroids[result.labels]) ** 2).sum(1)
    np.testing.assert_allclose(result.distances, expected, atol=1e-5)

    result = cluster_array(x, KMeansParams(k=10, niter=10, seed=2, pca=16))
    pca = faiss.PCAMatrix(80, 16, -0.5)
    pca.train(x)
    whitened = l2_normalize(pca.apply(x))
    np.testing.assert_allclose(result.transform.apply(x.copy()), whitened, rtol=1e-4, atol=1e-5)
    assert result.centroids.shape == (10, 16)
    _, labels, _ = faiss_reference(whitened, 10, niter=10, seed=2, spc=256)
    assert normalized_mutual_info_score(labels, result.labels) > 0.95  # same clustering up to float rounding


def test_progress_and_save_load_roundtrip(store_path: Path, tmp_path: Path) -> None:
    calls: list[tuple[str, int, int]] = []
    result = cluster_store(
        store_path, KMeansParams(k=5, pca=8), view="audio", progress=lambda *a: calls.append(a)
    )
    stages = [c[0] for c in calls]
    assert stages[0] == "sample" and "train" in stages and stages[-1] == "assign"
    assert calls[-1] == ("assign", 360, 360)

    out = save_result(result, tmp_path / "out", extra_files={"note.txt": b"hi"})
    back = load_result(out)
    np.testing.assert_array_equal(back.labels, result.labels)
    np.testing.assert_array_equal(back.index, result.index)
    np.testing.assert_array_equal(back.transform.matrix, result.transform.matrix)
    assert back.stats == json.loads(json.dumps(result.stats)) and (out / "note.txt").read_bytes() == b"hi"

    with pytest.raises(FileNotFoundError):  # a failure while writing leaves nothing behind
        save_result(result, tmp_path / "out2", extra_files={"missing/dir.txt": b""})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_nonfinite_rows_fail_or_are_dropped(fsdd: dict, tmp_path: Path) -> None:
    feats = {**fsdd, "video": fsdd["video"].copy()}
    outside = np.setdiff1d(np.arange(360), sample_rows(360, 4 * 2, 0))  # rows a sample of 8 leaves out
    bad = [int(outside[5]), int(outside[200]), int(outside[201])]
    feats["video"][bad[0], 3] = np.nan
    feats["video"][bad[1:], 0] = 1e6  # overflows float16: inf on disk
    path = make_store(tmp_path / "bad.zarr", feats)
    message = rf"3 of 360 rows are not finite \(NaN/inf; first rows: {bad[0]}, {bad[1]}, {bad[2]}\)"
    with pytest.raises(DataError, match=message):  # found while sampling (every row is in the sample)
        cluster_store(path, KMeansParams(k=4))
    with pytest.raises(DataError, match=message):  # found by the assignment pass
        cluster_store(path, KMeansParams(k=4, sample_per_centroid=2))

    result = cluster_store(path, KMeansParams(k=4, drop_nonfinite=True))
    assert result.labels[bad].tolist() == [-1, -1, -1] and np.isnan(result.distances[bad]).all()
    assert (np.delete(result.labels, bad) >= 0).all()
    assert result.stats["dropped_rows"] == 3 and result.stats["dropped_first"] == bad
    assert sum(result.stats["sizes"]) == 357


def test_bad_inputs_fail_cleanly(store_path: Path, fsdd: dict, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="k=361 is greater than the 360 rows"):
        cluster_store(store_path, KMeansParams(k=361))
    with pytest.raises(ConfigError, match="view must be one of"):
        cluster_store(store_path, KMeansParams(k=2), view="both")
    with pytest.raises(ConfigError, match=r"--pca must be in \[1, 40\]"):
        cluster_store(store_path, KMeansParams(k=2, pca=41), view="audio")
    with pytest.raises(DataError, match="no feature store here"):
        cluster_store(tmp_path / "none.zarr", KMeansParams(k=2))
    video_only = make_store(tmp_path / "v.zarr", fsdd, modalities=("video",))
    with pytest.raises(DataError, match="view 'cdc' needs 'audio' features"):
        cluster_store(video_only, KMeansParams(k=2), view="cdc")
    partial = create_store(tmp_path / "p.zarr", 360, {"video": 80}, chunk_rows=CHUNK)
    partial.write_rows(0, {"video": fsdd["video"][:CHUNK]}, fsdd["index"][:CHUNK])
    with pytest.raises(DataError, match="328 of 360 rows are not written"):
        cluster_store(tmp_path / "p.zarr", KMeansParams(k=2))
    with pytest.raises(DataError, match="non-empty"):
        cluster_array(np.zeros((0, 4), np.float32), KMeansParams(k=1))
    if faiss.get_num_gpus() == 0:  # faiss-cpu: asking for a GPU is an error, "auto" falls back to the CPU
        with pytest.raises(ConfigError, match=r"0 GPU\(s\) visible to faiss"):
            cluster_store(store_path, KMeansParams(k=2, gpu=True))


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def in_memory_reference(
    x: np.ndarray, k: int, *, niter: int, seed: int, spc: int, refine: int, spherical: bool
):
    """Out-of-core k-means as it was computed before the per-row outputs went to disk: every per-row array
    whole in memory (one block, as a 360-row store streams), then np.save. Returns labels, distances,
    centroids, objective, sizes and the number of re-seeding passes."""
    if spherical:
        x = l2_normalize(x.copy())
    km = faiss.Kmeans(x.shape[1], k, niter=niter, seed=seed, spherical=spherical, max_points_per_centroid=spc,
                      min_points_per_centroid=1)  # fmt: skip
    km.train(x[sample_rows(len(x), k * spc, seed)])
    centroids = np.ascontiguousarray(km.centroids)

    def search(c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        index = faiss.IndexFlatIP(x.shape[1]) if spherical else faiss.IndexFlatL2(x.shape[1])
        index.add(c)
        d, i = index.search(x, 1)
        d, i = d[:, 0], i[:, 0]
        if spherical:
            d = np.einsum("ij,ij->i", x, x) + np.einsum("ij,ij->i", c, c)[i] - 2 * d
        return d, i

    rs = np.random.RandomState(seed + 1)
    for _ in range(refine):
        _, labels = search(centroids)
        counts = np.bincount(labels, minlength=k)
        sums = np.zeros((k, x.shape[1]))
        np.add.at(sums, labels, x.astype(np.float64))
        centroids = (sums / np.maximum(counts, 1)[:, None]).astype(np.float32)
        reassign_centroids(counts.copy(), centroids, rs)
        if spherical:
            l2_normalize(centroids)
    dist, labels = search(centroids)
    rs, rounds = np.random.RandomState(seed + 2), 0
    while rounds < RESEED_ROUNDS and not (counts := np.bincount(labels, minlength=k)).all():
        centroids, n = reseed_centroids(centroids, counts, rs, spherical=spherical)
        if n == 0:
            break
        dist, labels = search(centroids)
        rounds += 1
    return {
        "labels": labels.astype(np.int32),
        "distances": dist,
        "centroids": centroids,
        "objective": float(dist.sum(dtype=np.float64)),
        "mean_distance": float(dist.mean(dtype=np.float64)),
        "sizes": np.bincount(labels, minlength=k).tolist(),
        "rounds": rounds,
    }


@pytest.mark.parametrize(
    "case",
    [
        dict(view="video", k=12, niter=10, seed=4, spc=8, refine=2, spherical=False),
        dict(view="audio", k=10, niter=10, seed=1, spc=256, refine=1, spherical=True),
        dict(view="collapsed", k=32, niter=10, seed=0, spc=1, refine=0, spherical=False),  # re-seeds
        dict(view="collapsed", k=32, niter=10, seed=0, spc=1, refine=0, spherical=True),  # re-seeds
    ],
    ids=["video-refine", "audio-spherical", "reseed", "reseed-spherical"],
)
def test_outputs_on_disk_are_byte_identical_to_the_in_memory_computation(
    fsdd: dict, store_path: Path, tmp_path: Path, case: dict
) -> None:
    if case["view"] == "collapsed":  # the real rows plus 100 copies of one: clusters left empty, re-seeded
        x = collapsed(fsdd)
        feats = {"audio": x, "index": np.arange(len(x), dtype=np.int64) * 5 + 2}
        path, view = make_store(tmp_path / "c.zarr", feats, modalities=("audio",)), "audio"
    else:
        feats, path, view = fsdd, store_path, case["view"]
    x = feats[view].astype(np.float16).astype(np.float32)
    params = KMeansParams(
        k=case["k"],
        niter=case["niter"],
        seed=case["seed"],
        sample_per_centroid=case["spc"],
        refine=case["refine"],
        spherical=case["spherical"],
        gpu=False,
    )
    ref = in_memory_reference(x, case["k"], niter=case["niter"], seed=case["seed"], spc=case["spc"],
                              refine=case["refine"], spherical=case["spherical"])  # fmt: skip
    expected = {
        "labels.npy": npy_bytes(ref["labels"]),
        "distances.npy": npy_bytes(ref["distances"]),
        "index.npy": npy_bytes(feats["index"].astype(np.int64)),
        "centroids.npy": npy_bytes(ref["centroids"]),
    }

    result = cluster_store(path, params, view=view)
    assert result.stats["reseeded"]["rounds"] == ref["rounds"]
    if case["view"] == "collapsed":
        assert ref["rounds"] >= 1 and result.stats["reseeded"]["empty_before"] > 0  # files rewritten in place
    for name in ("labels", "distances", "index"):  # on disk, mapped read-only, usable as arrays
        array = getattr(result, name)
        assert isinstance(array, np.memmap) and not array.flags.writeable
    assert result.labels.tobytes() == ref["labels"].tobytes()
    assert result.stats["objective"] == ref["objective"]  # tallied block by block, summed as numpy sums
    assert result.stats["mean_distance"] == ref["mean_distance"]
    assert result.stats["sizes"] == ref["sizes"] == result.sizes.tolist()

    saved = save_result(result, tmp_path / "saved")
    args = [str(path), "--k", str(case["k"]), "--view", view, "--niter", str(case["niter"])]
    args += ["--seed", str(case["seed"]), "--sample-per-centroid", str(case["spc"])]
    args += ["--refine", str(case["refine"]), "--no-gpu", "-o", str(tmp_path / "cli")]
    res = CliRunner().invoke(cluster, [*args, "--spherical"] if case["spherical"] else args)
    assert res.exit_code == 0, res.output
    for folder in (saved, tmp_path / "cli"):
        for name, data in expected.items():
            assert (folder / name).read_bytes() == data, (folder, name)
        stats = json.loads((folder / "stats.json").read_text())
        assert stats["objective"] == ref["objective"] and stats["sizes"] == ref["sizes"]


def test_per_row_files_are_written_in_the_workdir_and_linked_not_copied(
    store_path: Path, tmp_path: Path
) -> None:
    work = tmp_path / "work"
    work.mkdir()
    result = cluster_store(store_path, KMeansParams(k=6, niter=5, seed=0), view="audio", workdir=work)
    assert sorted(p.name for p in work.iterdir()) == ["distances.npy", "index.npy", "labels.npy"]
    assert Path(result.labels.filename) == work / "labels.npy"
    inode = {p.name: p.stat().st_ino for p in work.iterdir()}
    write_result_files(result, work)  # the folder they were built in: kept as they are
    assert {
        p.name: p.stat().st_ino for p in work.iterdir() if p.suffix == ".npy" and p.name in inode
    } == inode
    out = save_result(result, tmp_path / "out")  # elsewhere on the same filesystem: hard links
    assert {name: (out / name).stat().st_ino for name in inode} == inode

    result.labels = np.asarray(result.labels).copy()  # replaced by another array: saved from memory
    result.labels[0] = (result.labels[0] + 1) % 6
    other = save_result(result, tmp_path / "other")
    assert (other / "labels.npy").stat().st_ino != inode["labels.npy"]
    np.testing.assert_array_equal(np.load(other / "labels.npy"), result.labels)
    assert (out / "labels.npy").read_bytes() == (work / "labels.npy").read_bytes()

    saved = {name: (out / name).read_bytes() for name in inode}
    again = cluster_store(
        store_path, KMeansParams(k=3, niter=5, seed=1), view="video", workdir=work
    )  # same workdir
    assert (work / "labels.npy").stat().st_ino != inode["labels.npy"]  # new files: the links keep theirs
    assert {name: (out / name).read_bytes() for name in inode} == saved
    assert again.labels.max() == 2 and result.files["distances"][1].max() > 0


def test_the_default_scratch_folder_goes_with_the_result(
    store_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    result = cluster_store(store_path, KMeansParams(k=6, niter=5, seed=0), view="audio")
    (scratch,) = tmp_path.glob("xdctools-cluster-*")
    out = save_result(result, tmp_path / "out")
    labels = result.labels  # what the training loop keeps: usable after the result (and its files) go
    expected = np.load(out / "labels.npy")
    del result
    gc.collect()
    assert not scratch.exists() and (out / "labels.npy").exists()
    np.testing.assert_array_equal(labels, expected)

    bad = {"audio": np.full((64, 4), np.nan, np.float32), "index": np.arange(64)}
    path = make_store(tmp_path / "bad.zarr", bad, modalities=("audio",))
    with pytest.raises(DataError, match="not finite"):  # a failed clustering leaves no scratch folder
        cluster_store(path, KMeansParams(k=2), view="audio")
    assert list(tmp_path.glob("xdctools-cluster-*")) == []


def test_cluster_store_to_writes_the_rows_into_the_output_folder_and_no_scratch(
    store_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    params = KMeansParams(k=6, niter=5, seed=0, gpu=False)
    out = tmp_path / "out"
    result = cluster_store_to(
        out, store_path, params, view="audio", extra_files=lambda r: {"n.txt": str(len(r.labels)).encode()}
    )
    assert list(tmp_path.glob("xdctools-cluster-*")) == [] and list(tmp_path.glob(".out.*")) == []
    assert {name: path for name, (path, _) in result.files.items()} == {
        name: out / f"{name}.npy" for name in ("labels", "distances", "index")
    }
    reference = save_result(cluster_store(store_path, params, view="audio"), tmp_path / "reference")
    for name in ("labels.npy", "distances.npy", "index.npy", "centroids.npy"):
        assert (out / name).read_bytes() == (reference / name).read_bytes(), name
    assert (out / "n.txt").read_text() == str(len(result.labels))
    with pytest.raises(InputError, match="already exists"):  # an existing folder is kept without overwrite
        cluster_store_to(out, store_path, params, view="audio")
    again = cluster_store_to(out, store_path, replace(params, k=3), view="audio", overwrite=True)
    assert np.load(out / "labels.npy").max() == 2 and np.array_equal(
        np.asarray(again.labels), np.load(out / "labels.npy")
    )


def test_npy_column_writes_what_np_save_writes(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for dtype in (np.int32, np.float32, np.int64):
        for n in (1, 7, 1000):
            values = rng.integers(-5, 1000, n).astype(dtype)
            column = NpyColumn(tmp_path / "c.npy", n, dtype)
            for start in rng.permutation(range(0, n, 3)):  # any order
                column.write(int(start), values[start : start + 3])
            column.write(0, values[:1])  # again: overwritten in place
            np.testing.assert_array_equal(column.read(0, n), values)
            mapped = column.finish()
            assert (tmp_path / "c.npy").read_bytes() == npy_bytes(values)
            assert mapped.dtype == dtype and not mapped.flags.writeable
    header = npy_header(10**12, np.dtype(np.int64))  # a huge column: still format 1.0, 64-byte aligned
    assert len(header) % 64 == 0
    f = io.BytesIO(header)
    assert np.lib.format.read_magic(f) == (1, 0)
    assert np.lib.format.read_array_header_1_0(f) == ((10**12,), False, np.dtype(np.int64))
    with pytest.raises(ValueError, match="outside"):
        NpyColumn(tmp_path / "d.npy", 2, np.int32).write(1, np.zeros(2, np.int32))


def test_float64_sum_of_a_stream_is_numpys_sum_of_the_whole() -> None:
    rng = np.random.default_rng(1)
    for n in (0, 1, 8191, 8192, 8193, 50_000, 123_457):
        x = (rng.standard_normal(n) ** 2 * 10.0 ** rng.uniform(-3, 6, n)).astype(np.float32)
        cuts = np.sort(rng.integers(0, n + 1, 12))
        total = Float64Sum()
        for part in np.split(x, cuts):
            total.add(part)
        assert total.value == float(x.sum(dtype=np.float64)) and total.count == n


def test_peak_memory_does_not_grow_with_the_rows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Python-side allocations (numpy arrays included) traced by tracemalloc: deterministic, unlike RSS. Small
    # blocks, so 20k and 80k rows stream through many; per-row outputs in memory would add 16 B a row (~1 MB).
    monkeypatch.setattr(assign_module, "BLOCK_BYTES", 32 << 10)
    monkeypatch.setattr(assign_module, "READ_BYTES", 8 << 10)
    monkeypatch.setattr(kmeans_module, "META_ROWS", 2048)
    peaks = {}
    for n in (20_000, 80_000):
        x = np.random.default_rng(n).standard_normal((n, 8)).astype(np.float32)
        store = create_store(tmp_path / f"{n}.zarr", n, {"video": 8}, chunk_rows=512)
        store.write_rows(0, {"video": x}, np.arange(n))
        gc.collect()
        tracemalloc.start()
        try:
            result = cluster_store(
                store.path, KMeansParams(k=4, niter=4, seed=0, sample_per_centroid=64, refine=1)
            )
            save_result(result, tmp_path / f"out{n}")
            peaks[n] = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert len(np.load(tmp_path / f"out{n}" / "labels.npy")) == n
        del result
    assert peaks[80_000] < peaks[20_000] + 200_000, peaks  # 60k more rows: under 4 bytes a row more


def write_shards(folder: Path, fsdd: dict) -> None:
    """A shard set with only info.npy members: two tars, some videos split into two segments."""
    folder.mkdir(parents=True)
    videos = fsdd["index"]
    for part, chunk in enumerate(np.array_split(np.arange(len(videos)), 2)):
        with tarfile.open(folder / f"train-{part:06d}-00.tar", "w") as tar:
            for row in chunk:
                for seg in range(1 + row % 2):
                    info = encode_info(
                        video=int(videos[row]),
                        segment=seg,
                        num_segments=1 + row % 2,
                        start_frame=64 * seg,
                        num_frames=64,
                        video_frames=128,
                        fps_num=25,
                        fps_den=1,
                        label=int(fsdd["speaker"][row]),
                        has_audio=1,
                        mel_frames=228,
                    )
                    member = tarfile.TarInfo(f"{make_key(int(videos[row]), 'clip', seg)}.info.npy")
                    member.size = len(info)
                    tar.addfile(member, io.BytesIO(info))


def test_cli_clusters_and_reports(store_path: Path, fsdd: dict, tmp_path: Path) -> None:
    np.save(tmp_path / "speakers.npy", fsdd["speaker"])
    out = tmp_path / "clusters"
    args = [str(store_path), "--k", "12", "--view", "audio", "--seed", "3", "--no-gpu"]
    res = CliRunner().invoke(cluster, [*args, "--labels", str(tmp_path / "speakers.npy"), "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in out.iterdir()) == [
        "centroids.npy",
        "clusters.txt",
        "distances.npy",
        "index.npy",
        "labels.npy",
        "report.json",
        "sizes.png",
        "stats.json",
    ]
    expected = cluster_store(store_path, KMeansParams(k=12, seed=3, gpu=False), view="audio")
    np.testing.assert_array_equal(np.load(out / "labels.npy"), expected.labels)
    report = json.loads((out / "report.json").read_text())
    assert report["nmi"] == pytest.approx(cluster_metrics(fsdd["speaker"], expected.labels)["nmi"])
    assert f"NMI {report['nmi']:.4f}" in res.output and str(out) in res.output
    assert (out / "sizes.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "stats.json").read_text())["sizes"] == expected.sizes.tolist()

    write_shards(tmp_path / "shards" / "train", fsdd)
    (tmp_path / "shards" / "dataset.json").write_text(json.dumps({"classes": SPEAKERS}))
    out2 = tmp_path / "clusters2"
    res = CliRunner().invoke(cluster, [*args, "--shards", str(tmp_path / "shards"), "-o", str(out2)])
    assert res.exit_code == 0, res.output
    assert json.loads((out2 / "report.json").read_text()) == report
    top = report["clusters"][0]
    name, fraction = SPEAKERS[top["classes"][0][0]], top["classes"][0][1]
    assert f"{name}({fraction:.2f})" in (out2 / "clusters.txt").read_text().splitlines()[1]
    assert "(" in (out / "clusters.txt").read_text() and "george(" not in (out / "clusters.txt").read_text()


def test_cli_reseed_empty_flag(fsdd: dict, tmp_path: Path) -> None:
    x = collapsed(fsdd)
    path = make_store(tmp_path / "c.zarr", {"audio": x, "index": np.arange(len(x))}, modalities=("audio",))
    args = [str(path), "--k", "32", "--view", "audio", "--sample-per-centroid", "1", "--niter", "10"]
    runner = CliRunner()
    res = runner.invoke(cluster, [*args, "--no-gpu", "-o", str(tmp_path / "on")])
    assert res.exit_code == 0, res.output
    on = json.loads((tmp_path / "on" / "stats.json").read_text())
    res_off = runner.invoke(cluster, [*args, "--no-gpu", "--no-reseed-empty", "-o", str(tmp_path / "off")])
    assert res_off.exit_code == 0, res_off.output
    off = json.loads((tmp_path / "off" / "stats.json").read_text())
    assert on["params"]["reseed_empty"] is True and off["params"]["reseed_empty"] is False
    assert on["empty_clusters"] == [] and len(off["empty_clusters"]) == off["reseeded"]["empty_before"] > 0
    r = on["reseeded"]
    assert r["empty_before"] == len(off["empty_clusters"]) and off["reseeded"]["rounds"] == 0
    line = f"{r['empty_before']} clusters empty after the assignment: {r['clusters']} re-seedings in "
    assert f"{line}{r['rounds']} more passes, 0 still empty" in res.output
    assert f"re-seedings in 0 more passes, {len(off['empty_clusters'])} still empty" in res_off.output


def test_cli_bad_inputs_exit_nonzero_and_write_nothing(store_path: Path, fsdd: dict, tmp_path: Path) -> None:
    feats = {**fsdd, "audio": fsdd["audio"].copy()}
    feats["audio"][7] = np.inf
    bad = make_store(tmp_path / "bad.zarr", feats)
    runner = CliRunner()

    res = runner.invoke(cluster, [str(bad), "--k", "4", "--view", "audio", "-o", str(tmp_path / "o1")])
    assert res.exit_code == DataError.exit_code
    assert "1 of 360 rows are not finite" in res.output and "first rows: 7" in res.output
    res = runner.invoke(
        cluster, [str(bad), "--k", "4", "--view", "cdc", "--drop-nonfinite", "-o", str(tmp_path / "o1")]
    )
    assert res.exit_code == 0 and "dropped 1 non-finite rows" in res.output
    assert np.load(tmp_path / "o1" / "labels.npy")[7] == -1

    res = runner.invoke(cluster, [str(store_path), "--k", "400", "-o", str(tmp_path / "o2")])
    assert res.exit_code == ConfigError.exit_code and "k=400 is greater than the 360 rows" in res.output
    res = runner.invoke(cluster, [str(tmp_path / "nope.zarr"), "--k", "4", "-o", str(tmp_path / "o2")])
    assert res.exit_code == DataError.exit_code
    np.save(tmp_path / "short.npy", np.zeros(10, dtype=np.int64))
    res = runner.invoke(
        cluster,
        [str(store_path), "--k", "4", "--labels", str(tmp_path / "short.npy"), "-o", str(tmp_path / "o2")],
    )
    assert res.exit_code == 3 and "expected 360 integer labels" in res.output
    assert not (tmp_path / "o2").exists()

    before = sorted(p.name for p in (tmp_path / "o1").iterdir())
    res = runner.invoke(cluster, [str(store_path), "--k", "4", "-o", str(tmp_path / "o1")])
    assert res.exit_code == 3 and "already exists" in res.output
    assert sorted(p.name for p in (tmp_path / "o1").iterdir()) == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_an_unreadable_dataset_json_is_an_error_not_a_missing_class_list(tmp_path: Path) -> None:
    from xdctools.commands.cluster import shard_class_names

    (tmp_path / "train").mkdir()
    assert shard_class_names(tmp_path / "train") is None  # no dataset.json: no class names to show
    (tmp_path / "dataset.json").write_text('{"classes": ["a", "b"]}')
    assert shard_class_names(tmp_path / "train") == ["a", "b"]
    (tmp_path / "dataset.json").write_text('{"classes": ["a", ')  # cut off mid-write
    with pytest.raises(DataError, match=r"dataset.json: unreadable \(JSONDecodeError"):
        shard_class_names(tmp_path / "train")
