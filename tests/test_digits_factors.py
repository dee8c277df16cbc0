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
