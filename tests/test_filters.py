"""xdctools filters: tile grids (pure) and the PNG of real R(2+1)D checkpoints with known conv1 weights."""

from __future__ import annotations

from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from trainer.checkpoint import save_checkpoint
from trainer.models.audio import resnet18_audio
from trainer.models.video import r2plus1d_18
from xdctools.commands.filters import filters
from xdctools.errors import DataError
from xdctools.viz.filters import (
    compose_sheet,
    default_labels,
    find_stem,
    grid_shape,
    read_stem,
    spatial_tiles,
    temporal_tiles,
)

RED_PLUS = np.array([0.404, 0.0, 0.122])  # RdBu_r at +1
WHITE = np.array([1.0, 1.0, 1.0])


def _known_model(layout: str = "torchvision") -> torch.nn.Module:
    """Spatial filter i: one bright pixel at (i // 7, i % 7) in colour channel i % 3, zero elsewhere.
    Temporal filter j: +1 at input channel j % 45, frame j % 3, zero elsewhere."""
    model = r2plus1d_18(layout=layout)
    with torch.no_grad():
        spatial, temporal = model.stem[0].weight, model.stem[3].weight
        spatial.zero_()
        temporal.zero_()
        for i in range(spatial.shape[0]):
            spatial[i, i % 3, 0, i // 7, i % 7] = 1.0
        for j in range(temporal.shape[0]):
            temporal[j, j % 45, j % 3, 0, 0] = 1.0
    return model


def _tile(png: np.ndarray, panel, i: int) -> np.ndarray:
    top, left, bottom, right = panel.tile_box(i)
    return png[top:bottom, left:right, :3]


def _cell(tile: np.ndarray, scale: int, r: int, c: int) -> np.ndarray:
    return tile[r * scale : (r + 1) * scale, c * scale : (c + 1) * scale].reshape(-1, 3)


def test_spatial_tiles_grid_and_normalisation():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(45, 3, 1, 7, 7)).astype(np.float32)
    w[3] *= 10  # a strong filter
    w[7] = 0.25  # a constant one
    grid = spatial_tiles(w)
    assert grid_shape(45, 1.8) == (5, 9)
    assert grid.shape == (5 * 8 - 1, 9 * 8 - 1, 3)
    assert np.isnan(grid[7, :]).all() and np.isnan(grid[:, 7]).all()  # separators
    tiles = [grid[r * 8 : r * 8 + 7, c * 8 : c * 8 + 7] for r in range(5) for c in range(9)]
    assert not any(np.isnan(t).any() for t in tiles)
    want = ((w[0, :, 0] - w[0].min()) / np.ptp(w[0])).transpose(1, 2, 0)  # (kh, kw, RGB)
    np.testing.assert_allclose(tiles[0], want, rtol=1e-5)
    for i, t in enumerate(tiles):
        if i != 7:
            assert t.min() == 0 and t.max() == pytest.approx(1)
    assert (tiles[7] == 0.5).all()
    # shared: one range for all, so the strong filter spans it and the others sit near grey
    shared = spatial_tiles(w, shared=True)
    strong = shared[0:7, 3 * 8 : 3 * 8 + 7]
    weak = shared[0:7, 0:7]
    assert strong.min() == 0 and strong.max() == pytest.approx(1)
    assert np.ptp(weak) < 0.3


def test_temporal_tiles_grid_and_normalisation():
    rng = np.random.default_rng(1)
    w = rng.normal(size=(64, 45, 3, 1, 1)).astype(np.float32)
    grid = temporal_tiles(w)
    assert grid_shape(64, 4.0) == (4, 16)
    assert grid.shape == (4 * 46 - 1, 16 * 10 - 1)  # tiles of 45 rows × (3 frames · 3 px)
    tile = grid[0:45, 10:19]  # filter 1
    np.testing.assert_allclose(tile[:, ::3], w[1, :, :, 0, 0] / np.abs(w[1]).max(), rtol=1e-5)
    assert np.nanmax(np.abs(grid)) == pytest.approx(1)
    assert np.isnan(grid[45]).all() and np.isnan(grid[:, 9]).all()
    zero = temporal_tiles(np.zeros((5, 4, 3)))
    assert np.nanmax(np.abs(zero)) == 0


def test_png_of_a_known_checkpoint_shows_filter_i_at_tile_i(tmp_path: Path):
    path = tmp_path / "known.pt"
    torch.save(_known_model().state_dict(), path)
    out = tmp_path / "filters.png"
    res = CliRunner().invoke(filters, [str(path), "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert "stem at top level (torchvision layout): 45 spatial 3×7×7, 64 temporal 45×3" in res.output

    png = matplotlib.image.imread(out)
    sheet = compose_sheet([read_stem(path)], ["known.pt"])
    assert png.shape[:2] == sheet.image.shape[:2]
    spatial, temporal = sheet.panels
    assert (spatial.rows, spatial.cols, spatial.tile_h, spatial.tile_w) == (5, 9, 7, 7)
    assert (temporal.rows, temporal.cols, temporal.tile_h, temporal.tile_w) == (4, 16, 45, 9)
    s = spatial.scale
    for i in range(45):
        tile = _tile(png, spatial, i)
        bright = np.eye(3)[i % 3]
        for r in range(7):
            for c in range(7):
                want = bright if (r, c) == divmod(i, 7) else np.zeros(3)
                np.testing.assert_allclose(_cell(tile, s, r, c), np.tile(want, (s * s, 1)), atol=1 / 255)
        top, _, bottom, right = spatial.tile_box(i)
        if i % 9 != 8:  # the separator right of the tile is white
            np.testing.assert_allclose(png[top:bottom, right : right + s, :3], 1.0, atol=1 / 255)
    t = temporal.scale
    for j in range(64):
        tile = _tile(png, temporal, j)
        for frame in range(3):
            cell = tile[(j % 45) * t : (j % 45 + 1) * t, frame * 3 * t : (frame + 1) * 3 * t].reshape(-1, 3)
            want = RED_PLUS if frame == j % 3 else WHITE
            np.testing.assert_allclose(cell, np.tile(want, (len(cell), 1)), atol=0.04)
        others = np.delete(tile.reshape(45, t, -1, 3), j % 45, axis=0)
        assert np.abs(others - 0.97).max() < 0.04  # RdBu_r at 0 is near-white


def test_two_checkpoints_side_by_side_from_containers(tmp_path: Path):
    torch.manual_seed(0)
    tv = r2plus1d_18()
    xdc = _known_model(layout="xdc")
    # a torchvision-layout state dict as DDP saves it, in a {"state_dict": ...} container
    wrapped = tmp_path / "tv.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in tv.state_dict().items()}, "epoch": 3}, wrapped)
    # an XDC-layout encoder in a training checkpoint: both encoders flattened as a Learner's state dict
    train = tmp_path / "train.pt"
    learner = {f"encoders.video.{k}": v for k, v in xdc.state_dict().items()}
    learner |= {f"encoders.audio.{k}": v for k, v in resnet18_audio().state_dict().items()}
    save_checkpoint(train, {"config": {"width": 1.0}, "model": learner}, digest="d")

    out = tmp_path / "pair.png"
    res = CliRunner().invoke(
        filters, [str(wrapped), str(train), "-o", str(out), "--label", "Scratch", "--label", "XDC"]
    )
    assert res.exit_code == 0, res.output
    assert "tv.pt: stem at state_dict.module (torchvision layout)" in res.output
    assert "train.pt: stem at state.model.encoders.video (xdc layout)" in res.output

    stems = [read_stem(wrapped), read_stem(train)]
    np.testing.assert_array_equal(stems[0].spatial, tv.stem[0].weight.detach().numpy()[:, :, 0])
    sheet = compose_sheet(stems, ["Scratch", "XDC"])
    png = matplotlib.image.imread(out)[..., :3]
    assert png.shape == sheet.image.shape
    left, right = sheet.panels[0], sheet.panels[2]
    assert (left.block, right.block) == (0, 1) and right.x > left.x + left.cols * 8 * left.scale
    for panel, stem in [(left, stems[0]), (right, stems[1])]:
        top, x0, *_ = panel.tile_box(0)
        *_, bottom, x1 = panel.tile_box(panel.rows * panel.cols - 1)
        grid = np.repeat(np.repeat(spatial_tiles(stem.spatial), panel.scale, 0), panel.scale, 1)
        drawn = png[top:bottom, x0:x1]
        np.testing.assert_allclose(drawn, np.nan_to_num(grid, nan=1.0), atol=1 / 255)
    # the two blocks differ where the weights differ: left is random, right is the known pattern
    assert np.abs(_tile(png, left, 0) - _tile(png, right, 0)).max() > 0.3


def test_find_stem_prefers_video_and_shared_norm_runs(tmp_path: Path):
    a, b = _known_model(), r2plus1d_18()
    stem = find_stem({"teacher": {"model": a.state_dict()}, "student_video": b.state_dict()})
    assert stem.where == "student_video" and stem.layout == "torchvision"
    np.testing.assert_array_equal(stem.spatial, b.stem[0].weight.detach().numpy()[:, :, 0])
    path = tmp_path / "b.pt"
    torch.save(b.state_dict(), path)
    res = CliRunner().invoke(filters, [str(path), "-o", str(tmp_path / "s.png"), "--norm", "shared"])
    assert res.exit_code == 0 and "normalisation: shared" in res.output
    assert default_labels(["r1/it003-ep010.pt", "r2/it003-ep010.pt"]) == [
        "r1/it003-ep010.pt",
        "r2/it003-ep010.pt",
    ]


def test_files_without_a_stem_fail_cleanly(tmp_path: Path):
    audio = tmp_path / "audio.pt"
    torch.save(resnet18_audio().state_dict(), audio)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    flat = tmp_path / "flat.pt"  # a stem.0 of a 2-D network: right name, wrong shape
    torch.save({"stem.0.weight": torch.zeros(64, 3, 7, 7), "stem.3.weight": torch.zeros(64, 64, 3, 3)}, flat)
    runner = CliRunner()
    for path, needle in [
        (audio, "no R(2+1)D stem"),
        (garbage, "cannot read checkpoint"),
        (flat, "stem.0.weight [64, 3, 7, 7]"),
    ]:
        res = runner.invoke(filters, [str(path), "-o", str(tmp_path / "x.png")])
        assert res.exit_code == DataError.exit_code, res.output
        lines = res.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"Error: {path}:") and needle in lines[0], res.output
    res = runner.invoke(filters, [str(tmp_path / "missing.pt"), "-o", str(tmp_path / "x.png")])
    assert res.exit_code == 3 and "checkpoint not found" in res.output
    res = runner.invoke(filters, [str(audio), "-o", str(tmp_path / "x.png"), "--label", "a", "--label", "b"])
    assert res.exit_code == 4 and "2 labels for 1 checkpoints" in res.output
    assert not (tmp_path / "x.png").exists()
