"""What do a digits run's clusters capture? NMI of its clusters with the digit and with the nuisance factors.

    .venv/bin/python scripts/digits_factors.py runs/digits-xdc runs/digits-sdc [--shards DIR --set train]

The digits set records every random choice per video (`digits.json`): speaker, background and ink colour.
A clustering that follows the background instead of the digit has a low digit NMI and a high background
NMI; this prints both, for the random encoders' clusters (iteration 0) and the final ones, per view.
Colours are binned by hue (8 bins), with greys apart by lightness (3 bins).

`--features STORE...` clusters feature stores of the run's set instead (e.g. iteration 0's, kept with
`run.keep_features: true`) under each k-means variant of VARIANTS: does DeepCluster's PCA-whitening, an
l2 normalisation or another k give the random encoders' clusters more of the digit?
"""

from __future__ import annotations

import argparse
import colorsys
import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
from sklearn.metrics import normalized_mutual_info_score

from trainer.data import find_shards
from xdctools.shard import format as fmt
from xdctools.shard.read import locations, read_samples

FACTORS = ("digit", "speaker", "background", "ink")
# name -> KMeansParams fields; the first is the loop's k-means as recipes/digits.yaml sets it
VARIANTS = {
    "k=20": {"k": 20},
    "k=20 spherical": {"k": 20, "spherical": True},
    "k=20 PCA-whitened 32": {"k": 20, "pca": 32},
    "k=20 PCA-whitened 16": {"k": 20, "pca": 16},
    "k=10": {"k": 10},
    "k=40": {"k": 40},
    "k=40 PCA-whitened 32": {"k": 40, "pca": 32},
}


def colour_bin(rgb: Sequence[float], hues: int = 8) -> int:
    """A colour's hue bin, or one of 3 lightness bins (after the hue bins) for a near-grey colour."""
    hue, light, sat = colorsys.rgb_to_hls(*(c / 255 for c in rgb))
    return int(hue * hues) % hues if sat > 0.15 else hues + min(int(light * 3), 2)


def factor_labels(records: Sequence[Mapping]) -> dict[str, list]:
    """Per factor, one label per video from its `digits.json` record."""
    return {
        "digit": [r["digit"] for r in records],
        "speaker": [r["speaker"] for r in records],
        "background": [colour_bin(r["nuisance"]["background"]) for r in records],
        "ink": [colour_bin(r["nuisance"]["ink"]) for r in records],
    }


def factor_nmi(records: Sequence[Mapping], clusters: np.ndarray) -> dict[str, float]:
    return {k: normalized_mutual_info_score(v, clusters) for k, v in factor_labels(records).items()}


def video_sources(tars: Iterable[Path]) -> dict[int, str]:
    """Video index (the samples' info.npy) -> source name relative to the videos folder (their JSON).

    Indices count from 0 in every set: pass the tars of the set the run clustered, and no other.
    """
    samples = read_samples(locations(tars), (fmt.INFO_EXT, fmt.META_EXT))
    return {s.info["video"]: s.meta["source"]["name"] for s in samples}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="*", type=Path)
    parser.add_argument("--shards", type=Path, default=Path("digits/shards"))
    parser.add_argument("--set", default="train", help="The shard set the runs trained on.")
    parser.add_argument("--videos", type=Path, default=Path("digits/videos"))
    parser.add_argument("--features", type=Path, nargs="+", help="Cluster these feature stores instead.")
    parser.add_argument("--seed", type=int, default=0, help="k-means seed with --features.")
    args = parser.parse_args()
    if not args.runs and not args.features:
        parser.error("name runs, or feature stores with --features")
    described = {f["path"]: f for f in json.loads((args.videos / "digits.json").read_text())["files"]}
    sources = video_sources(find_shards(args.shards, args.set).tars)
    if args.features:
        print_variants(args.features, described, sources, args.seed)
    else:
        print_runs(args.runs, described, sources)


def table_header(*columns: str) -> str:
    """The first two lines of a markdown table: `columns`, then one NMI column per factor."""
    names = [*columns, *(f"NMI {f}" for f in FACTORS)]
    return "| " + " | ".join(names) + " |\n|" + "---|" * len(columns) + "---:|" * len(FACTORS)


def table_row(
    cells: Sequence[str],
    described: Mapping,
    sources: Mapping[int, str],
    index: np.ndarray,
    labels: np.ndarray,
) -> str:
    """`cells`, then the NMI with each factor of the clusters `labels` of the videos `index`."""
    nmi = factor_nmi([described[sources[int(v)]] for v in index], labels)
    return "| " + " | ".join([*cells, *(f"{nmi[f]:.3f}" for f in FACTORS)]) + " |"


def print_runs(runs: Sequence[Path], described: Mapping, sources: Mapping[int, str]) -> None:
    print(table_header("run", "view", "clusters"))
    for run in runs:
        for view in ("video", "audio", "cdc"):
            for when in ("it000", "final"):
                folder = run / "clusters" / f"{when}-{view}"
                if not folder.exists():
                    continue
                label = "random (it. 0)" if when == "it000" else "final"
                index, labels = np.load(folder / "index.npy"), np.load(folder / "labels.npy")
                print(table_row([run.name, view, label], described, sources, index, labels))


def print_variants(stores: Sequence[Path], described: Mapping, sources: Mapping[int, str], seed: int) -> None:
    from xdctools.cluster import KMeansParams, cluster_store

    print(table_header("store", "view", "k-means"))
    for store in stores:
        for view in ("video", "audio"):
            for name, kwargs in VARIANTS.items():
                result = cluster_store(store, KMeansParams(seed=seed, gpu=False, **kwargs), view=view)
                row = table_row([str(store), view, name], described, sources, result.index, result.labels)
                print(row, flush=True)


if __name__ == "__main__":
    main()
