"""`xdctools montage CLUSTERS SHARDS -o montage/`: a page and PNGs of the clusters, ranked by purity."""

from __future__ import annotations

from pathlib import Path

import click


@click.command("montage")
@click.argument("clusters_dir", type=click.Path(file_okay=False, path_type=Path))
@click.argument("shards", type=click.Path(file_okay=False, path_type=Path))
@click.option("-o", "--out", required=True, type=click.Path(path_type=Path), help="Output folder.")
@click.option(
    "--modality",
    type=click.Choice(["video", "audio", "both"]),
    default=None,
    help="video: member frames; audio: their log-mels; both [default: video for video clusters, else both].",
)
@click.option(
    "--top", type=click.IntRange(min=0), default=10, show_default=True, help="Purest clusters shown."
)
@click.option(
    "--bottom", type=click.IntRange(min=0), default=10, show_default=True, help="Least pure clusters shown."
)
@click.option("--all", "show_all", is_flag=True, help="Show every non-empty cluster.")
@click.option(
    "--per-cluster", type=click.IntRange(min=1), default=6, show_default=True, help="Members per cluster."
)
@click.option(
    "--pick",
    type=click.Choice(["nearest", "random"]),
    default="nearest",
    show_default=True,
    help="Members nearest to the centroid (random without distances.npy), or a seeded random draw.",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random draw.")
@click.option("--set", "set_name", help="Shard set the clusters were made from, when SHARDS holds several.")
@click.option(
    "--height", type=click.IntRange(min=16), default=96, show_default=True, help="Pixels of a member frame."
)
@click.option("--overwrite", is_flag=True, help="Replace an existing output folder.")
def montage(
    clusters_dir: Path,
    shards: Path,
    out: Path,
    modality: str | None,
    top: int,
    bottom: int,
    show_all: bool,
    per_cluster: int,
    pick: str,
    seed: int,
    set_name: str | None,
    height: int,
    overwrite: bool,
) -> None:
    """Show the clusters in CLUSTERS_DIR (from `xdctools cluster`) with members read from SHARDS.

    One row per cluster, purest first (the paper's Tables 13/14): a few members (middle frame of their
    first segment, and its log-mel for audio clusters), the cluster size, purity and 5 most frequent
    classes when the shards carry labels. Writes OUT/index.html (static, opens from disk),
    OUT/rows/cluster-NNNN.png, OUT/montage.png and OUT/montage.json.
    """
    from xdctools.viz.montage import write_montage

    s = write_montage(
        clusters_dir,
        shards,
        out,
        modality=modality,
        top=None if show_all else top,
        bottom=None if show_all else bottom,
        per_cluster=per_cluster,
        pick=pick,
        seed=seed,
        set_name=set_name,
        height=height,
        overwrite=overwrite,
    )
    purity = "no true labels" if s.purity is None else f"purity {s.purity:.3f} over {s.labelled} labelled"
    click.echo(
        f"{s.rows} videos in {s.clusters} non-empty clusters ({s.empty} empty), {purity}; "
        f"showing {s.shown} clusters, {s.modality}, members {s.pick}"
    )
    rows = sum(name.startswith("rows/") for name in s.files)
    top = ", ".join(name for name in s.files if "/" not in name)
    click.echo(f"wrote {out}: {top}, and {rows} row PNGs in rows/")
