"""scripts/digits_factors.py: the nuisance factors a digits clustering is scored against."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "digits_factors.py"
spec = importlib.util.spec_from_file_location("digits_factors", SCRIPT)
factors = importlib.util.module_from_spec(spec)
spec.loader.exec_module(factors)


def test_colours_bin_by_hue_and_greys_by_lightness():
    assert factors.colour_bin([255, 0, 0]) == factors.colour_bin([200, 30, 20]) == 0
    assert factors.colour_bin([0, 200, 0]) == 2  # hue 1/3 of 8 bins
    assert factors.colour_bin([20, 20, 20]) == 8 and factors.colour_bin([240, 240, 235]) == 10


def test_clusters_that_follow_the_background_score_on_it_not_on_the_digit():
    rng = np.random.default_rng(0)
    backgrounds = ([230, 20, 20], [20, 20, 230])
    records = [
        {"digit": int(d), "speaker": "s", "nuisance": {"background": backgrounds[b], "ink": [255, 255, 255]}}
        for d, b in zip(rng.integers(0, 10, 400), rng.integers(0, 2, 400), strict=True)
    ]
    by_background = np.array([factors.colour_bin(r["nuisance"]["background"]) for r in records])
    nmi = factors.factor_nmi(records, by_background)
    assert nmi["background"] == pytest.approx(1.0) and nmi["digit"] < 0.05
    nmi = factors.factor_nmi(records, np.array([r["digit"] for r in records]))
    assert nmi["digit"] == pytest.approx(1.0) and nmi["background"] < 0.05


def test_feature_store_variants_score_each_view_against_the_factors(tmp_path, capsys):
    """--features: video features that encode the background, audio ones the digit, rows out of order."""
    from xdctools.features.store import create_store

    rng = np.random.default_rng(0)
    n, dim = 400, 40
    backgrounds = ([230, 20, 20], [20, 20, 230], [20, 200, 20], [20, 20, 20])
    digit, background = rng.integers(0, 10, n), rng.integers(0, 4, n)
    described = {
        f"v{i}": {
            "digit": int(d),
            "speaker": "s",
            "nuisance": {"background": backgrounds[b], "ink": [255] * 3},
        }
        for i, (d, b) in enumerate(zip(digit, background, strict=True))
    }
    sources = {7 * i + 3: f"v{i}" for i in range(n)}  # video index (info.npy) -> source name
    rows = rng.permutation(n)  # the store's row order is not the video order
    centres = rng.normal(size=(10, dim)) * 4
    feats = {
        "video": centres[background[rows]] + rng.normal(size=(n, dim)),
        "audio": centres[digit[rows]] + rng.normal(size=(n, dim)),
    }
    store = create_store(tmp_path / "it000.zarr", n, {m: dim for m in feats}, chunk_rows=n)
    store.write_rows(0, {m: f.astype(np.float32) for m, f in feats.items()}, (7 * rows + 3).astype(np.int64))
    factors.print_variants([store.path], described, sources, seed=0)
    table = [line.removesuffix(" |").split(" | ") for line in capsys.readouterr().out.splitlines()[2:]]
    assert len(table) == 2 * len(factors.VARIANTS)
    score = {(view, variant): [float(c) for c in cells] for _, view, variant, *cells in table}
    digit_nmi, _, background_nmi, _ = score[("video", "k=20")]
    assert background_nmi > 0.6 and digit_nmi < 0.1
    digit_nmi, _, background_nmi, _ = score[("audio", "k=20")]
    assert digit_nmi > 0.6 and background_nmi < 0.1
