"""`xdctools filters CKPT [CKPT ...] -o filters.png`: conv1 spatial and temporal filters, side by side."""

from __future__ import annotations

from pathlib import Path

import click


@click.command("filters")
@click.argument("checkpoints", nargs=-1, required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "-o", "--out", required=True, type=click.Path(dir_okay=False, path_type=Path), help="PNG to write."
)
@click.option(
    "--label",
    "labels",
    multiple=True,
    help="Title of each checkpoint's column, once per checkpoint in order [default: file names].",
)
@click.option(
    "--norm",
    type=click.Choice(["filter", "shared"]),
    default="filter",
    show_default=True,
    help="filter: stretch each filter to its own range; shared: one range per checkpoint (keeps strengths).",
)
@click.option(
    "--scale",
    type=click.IntRange(1, 32),
    default=6,
    show_default=True,
    help="PNG pixels per pixel of a spatial filter.",
)
def filters(checkpoints: tuple[Path, ...], out: Path, labels: tuple[str, ...], norm: str, scale: int) -> None:
    """Draw the conv1 filters of R(2+1)D video CHECKPOINTS (the paper's Figure 2), one column each.

    Top: the spatial 1×7×7 filters (stem.0) as RGB tiles; bottom: the temporal 3×1×1 filters (stem.3)
    as heat maps, one row per spatial filter they combine and one column per frame. Reads our training
    checkpoints, plain state dicts, {"state_dict"/"model": ...} containers, the official XDC weights and
    torchvision's layout (loaded with weights_only: no pickled code runs).
    """
    from xdctools.viz.filters import filter_sheet

    stems, sheet = filter_sheet(
        checkpoints, out, labels=list(labels) or None, shared=norm == "shared", scale=scale
    )
    for path, stem in zip(checkpoints, stems, strict=True):
        m, _, kh, kw = stem.spatial.shape
        c, _, kt = stem.temporal.shape
        click.echo(
            f"{path}: stem at {stem.where or 'top level'} ({stem.layout or 'unknown'} layout): "
            f"{m} spatial 3×{kh}×{kw}, {c} temporal {m}×{kt}"
        )
    h, w = sheet.image.shape[:2]
    click.echo(f"wrote {out} ({w}×{h} px, normalisation: {norm})")
