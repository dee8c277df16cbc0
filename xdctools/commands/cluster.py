"""`xdctools cluster FEATS.zarr --k 256`: k-means over a feature store, scored against true labels if any."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import click
import numpy as np

from xdctools.cluster import report
from xdctools.cluster.kmeans import ClusterResult, KMeansParams, cluster_store_to
from xdctools.commands.progress import StageBars
from xdctools.errors import DataError, InputError
from xdctools.shard.format import INFO_EXT, decode_info
from xdctools.shard.read import locations, read_dataset_json, read_samples


def shard_set(shards: Path) -> Path:
    """The folder of one shard set: `shards` itself, or its only set folder."""
    if any(shards.glob("*.tar")):
        return shards
    sets = (
        sorted(p for p in shards.iterdir() if p.is_dir() and any(p.glob("*.tar"))) if shards.is_dir() else []
    )
    if len(sets) > 1:
        names = ", ".join(p.name for p in sets)
        raise InputError(f"{shards}: holds several shard sets ({names}); name one, e.g. {sets[0]}")
    if not sets:
        raise InputError(f"{shards}: no shard (.tar) files found")
    return sets[0]


def shard_class_names(set_dir: Path) -> list[str] | None:
    """Class names from the `dataset.json` beside the set folders (docs/shard-format.md), if there is one;
    DataError when it is there but unreadable."""
    dataset = read_dataset_json(set_dir.parent)
    return None if dataset is None else dataset.get("classes")


def shard_labels(set_dir: Path) -> dict[int, int]:
    """video index -> class index, from the `info.npy` member of every sample in one shard set."""
    labels: dict[int, int] = {}
    for sample in read_samples(locations(sorted(set_dir.glob("*.tar"))), [INFO_EXT]):
        if INFO_EXT not in sample.members:
            continue
        info = sample.decode(INFO_EXT, decode_info)
        video, label = info["video"], info["label"]
        if labels.setdefault(video, label) != label:
            raise DataError(f"{sample.shard}: video {video} has labels {labels[video]} and {label}")
    return labels


def row_labels(index: np.ndarray, labels_file: Path | None, shards: Path | None) -> np.ndarray | None:
    """(N,) int64 class of each store row (-1 unknown), from an npy aligned with the rows or from shards."""
    if labels_file is not None:
        try:
            labels = np.load(labels_file, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise InputError(f"{labels_file}: not a readable .npy file ({e})") from None
        if labels.shape != index.shape or labels.dtype.kind not in "iu":
            raise InputError(
                f"{labels_file}: expected {len(index)} integer labels (one per store row), "
                f"got {labels.dtype} {labels.shape}"
            )
        return labels.astype(np.int64)
    if shards is not None:
        by_video = shard_labels(shard_set(shards))
        videos = np.fromiter(by_video, dtype=np.int64, count=len(by_video))
        classes = np.fromiter(by_video.values(), dtype=np.int64, count=len(by_video))
        order = np.argsort(videos)
        videos, classes = videos[order], classes[order]
        pos = np.clip(np.searchsorted(videos, index), 0, len(videos) - 1)
        found = videos[pos] == index
        if not found.any():
            raise DataError(f"{shards}: none of the store's sample indices are in these shards")
        return np.where(found, classes[pos], -1)
    return None


class ReportFiles:
    """`cluster_store_to`'s `extra_files`: the size histogram, and with true labels the scores (report.json)
    and the best and worst clusters (clusters.txt); keeps the scores and table for the summary."""

    def __init__(self, title: str, truth: np.ndarray | None, shards: Path | None) -> None:
        self.title, self.truth, self.shards = title, truth, shards
        self.metrics: dict | None = None
        self.table = ""

    def __call__(self, result: ClusterResult) -> dict[str, bytes]:
        files = {"sizes.png": report.size_histogram_png(result.sizes, title=self.title)}
        if self.truth is None:
            return files
        self.metrics = report.cluster_metrics(self.truth, result.labels)
        ranked = report.rank_clusters(self.truth, result.labels)
        names = shard_class_names(shard_set(self.shards)) if self.shards is not None else None
        self.table = report.format_table(report.top_bottom(ranked, 10), class_names=names)
        scores = {**self.metrics, "clusters": [asdict(r) for r in ranked]}
        files["report.json"] = (json.dumps(scores, indent=1) + "\n").encode()
        files["clusters.txt"] = (self.table + "\n").encode()
        return files


def summary_lines(stats: dict, feats: Path, metrics: dict | None) -> list[str]:
    """What `xdctools cluster` prints about a finished clustering (its stats.json, and scores if any)."""
    t, sizes = stats["timings"], np.asarray(stats["sizes"])
    lines = [
        f"clustered {stats['n']} rows of {feats} (view {stats['view']}, d={stats['dim']}) "
        f"into k={stats['k']} in {t['total_s']:.1f} s (sample {t['sample_s']:.1f}, train {t['train_s']:.1f}, "
        f"refine {t['refine_s']:.1f}, assign {t['assign_s']:.1f}, reseed {t['reseed_s']:.1f})",
        f"objective {stats['objective']:.6g} (mean {stats['mean_distance']:.4g}); sizes min {sizes.min()} / "
        f"median {int(np.median(sizes))} / max {sizes.max()}, {len(stats['empty_clusters'])} empty, "
        f"imbalance {stats['imbalance']:.3f}, {stats['splits']} splits",
    ]
    if (reseeded := stats["reseeded"])["empty_before"]:
        lines.append(
            f"{reseeded['empty_before']} clusters empty after the assignment: "
            f"{reseeded['clusters']} re-seedings in {reseeded['rounds']} more passes, "
            f"{len(stats['empty_clusters'])} still empty"
        )
    if stats["dropped_rows"]:
        lines.append(f"dropped {stats['dropped_rows']} non-finite rows (label -1)")
    if metrics is not None:
        lines.append(
            f"NMI {metrics['nmi']:.4f}  ARI {metrics['ari']:.4f}  purity {metrics['purity']:.4f}  "
            f"({metrics['labelled']} labelled rows)"
        )
    return lines


@click.command("cluster")
@click.argument("feats", type=click.Path(path_type=Path))
@click.option("--k", "k", type=click.IntRange(min=1), required=True, help="Number of clusters.")
@click.option(
    "--view",
    type=click.Choice(["video", "audio", "cdc"]),
    default="video",
    show_default=True,
    help="Array to cluster; cdc: [l2n(video), l2n(audio)] built per chunk.",
)
@click.option("--niter", type=click.IntRange(min=1), default=20, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--sample-per-centroid",
    type=click.IntRange(min=1),
    default=256,
    show_default=True,
    help="k-means trains on k times this many uniformly sampled rows.",
)
@click.option(
    "--refine",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Full-data Lloyd passes after training, streamed.",
)
@click.option("--spherical", is_flag=True, help="l2-normalise rows and centroids.")
@click.option(
    "--pca",
    type=click.IntRange(min=1),
    default=None,
    help="PCA-whiten to this many dims, then l2-normalise (DeepCluster).",
)
@click.option("--gpu/--no-gpu", default=None, help="faiss on all GPUs [default: when faiss sees one].")
@click.option(
    "--drop-nonfinite", is_flag=True, help="Leave NaN/inf rows unassigned (label -1) instead of failing."
)
@click.option(
    "--reseed-empty/--no-reseed-empty",
    default=True,
    show_default=True,
    help="Re-seed clusters the full assignment leaves empty from large ones, then reassign (DeepCluster).",
)
@click.option(
    "--labels",
    "labels_file",
    type=click.Path(path_type=Path, dir_okay=False),
    help="True labels, .npy of one integer per store row (-1 unknown).",
)
@click.option(
    "--shards",
    type=click.Path(path_type=Path, file_okay=False),
    help="Shard set folder whose info.npy labels give the true labels.",
)
@click.option("-o", "--out", type=click.Path(path_type=Path), required=True, help="Output folder.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output folder.")
def cluster(
    feats: Path,
    k: int,
    view: str,
    niter: int,
    seed: int,
    sample_per_centroid: int,
    refine: int,
    spherical: bool,
    pca: int | None,
    gpu: bool | None,
    drop_nonfinite: bool,
    reseed_empty: bool,
    labels_file: Path | None,
    shards: Path | None,
    out: Path,
    overwrite: bool,
) -> None:
    """Cluster the features in FEATS (a store from `xdctools extract`) with k-means; write labels to OUT."""
    from xdctools.features.store import check_new_folder, open_store

    if labels_file is not None and shards is not None:
        raise click.UsageError("give --labels or --shards, not both")
    check_new_folder(out, overwrite)
    store = open_store(feats)  # fails early on a missing or foreign store; reads no rows
    truth = None  # the store's index (8 bytes a row) is read only to look true labels up
    if labels_file is not None or shards is not None:
        truth = row_labels(store.read_index(), labels_file, shards)
    params = KMeansParams(
        k=k,
        niter=niter,
        seed=seed,
        sample_per_centroid=sample_per_centroid,
        refine=refine,
        spherical=spherical,
        pca=pca,
        gpu="auto" if gpu is None else gpu,
        drop_nonfinite=drop_nonfinite,
        reseed_empty=reseed_empty,
    )
    reports = ReportFiles(f"{feats.name} {view}", truth, shards)
    with StageBars(lambda stage: "it" if stage == "train" else "row") as bars:
        result = cluster_store_to(
            out, feats, params, view=view, overwrite=overwrite, extra_files=reports, progress=bars
        )
    for line in summary_lines(result.stats, feats, reports.metrics):
        click.echo(line)
    if reports.metrics is not None:
        click.echo(reports.table)
    click.echo(f"wrote {', '.join(sorted(p.name for p in out.iterdir()))} to {out}")
