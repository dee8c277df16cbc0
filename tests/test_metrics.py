"""Multi-label mAP (trainer.metrics): hand-computed cases with ties; scikit-learn on real AudioSet labels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import average_precision_score

from trainer.metrics import average_precision, average_precisions, mean_average_precision


@pytest.mark.parametrize(
    ("scores", "targets", "ap"),
    [
        ([0.9, 0.8, 0.1], [1, 1, 0], 1.0),  # positives ranked first
        ([0.9, 0.8, 0.1], [0, 0, 1], 1 / 3),  # the one positive ranked last: precision 1/3 at recall 1
        ([0.9, 0.8, 0.7, 0.6], [1, 0, 1, 0], (1 + 2 / 3) / 2),  # hits at ranks 1 and 3
        ([0.5, 0.5, 0.5, 0.5], [1, 0, 0, 1], 0.5),  # one tie: a single threshold, precision 2/4
        ([0.9, 0.5, 0.5, 0.1], [0, 1, 0, 1], 0.5 * 1 / 3 + 0.5 * 2 / 4),  # tie at ranks 2-3: one step, 1/3
        ([0.5, 0.5, 0.9], [1, 0, 0], 1 / 3),  # whatever order the tied rows come in
        ([0.5, 0.5, 0.9], [0, 1, 0], 1 / 3),
    ],
)
def test_hand_computed_cases(scores: list[float], targets: list[int], ap: float) -> None:
    assert average_precision(np.array(scores), np.array(targets)) == pytest.approx(ap, abs=1e-12)
    assert average_precision_score(targets, scores) == pytest.approx(ap, abs=1e-12)  # the same definition


def test_classes_without_positives_are_left_out_of_the_mean() -> None:
    scores = np.array([[0.9, 0.2, 0.3], [0.1, 0.8, 0.4], [0.4, 0.6, 0.5]])
    targets = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 0]])  # class 2 never present
    per_class = average_precisions(scores, targets)
    assert per_class[:2].tolist() == [1.0, 1.0] and np.isnan(per_class[2])
    assert mean_average_precision(scores, targets) == 1.0  # not (1 + 1 + 0) / 3
    with pytest.raises(ValueError, match="no class has a positive"):
        mean_average_precision(scores, np.zeros((3, 3)))


def test_matches_scikit_learn_on_an_audioset_shaped_case(splits_dir: Path) -> None:
    """The eval set's real label sets (first 2,000 clips, 527 classes, many ties in the scores) against
    scores that know the labels only noisily; classes absent from the subset are left out by both."""
    lines = (splits_dir / "audioset" / "eval_segments.csv").read_text().splitlines()[3:2003]
    classes = [
        line.split(",")[1]
        for line in (splits_dir / "audioset" / "class_labels_indices.csv").read_text().splitlines()[1:]
    ]
    index = {mid: i for i, mid in enumerate(classes)}
    targets = np.zeros((len(lines), len(classes)), np.float32)
    for row, line in enumerate(lines):
        for mid in line.split('"')[1].split(","):
            targets[row, index[mid]] = 1
    rng = np.random.default_rng(0)
    scores = np.round(targets * 0.6 + rng.random(targets.shape), 1)  # rounding makes ties
    present = targets.sum(0) > 0
    assert 300 < present.sum() < 527
    expected = average_precision_score(targets[:, present], scores[:, present], average="macro")
    assert mean_average_precision(scores, targets) == pytest.approx(expected, abs=1e-12)
    assert 0.05 < expected < 0.9


def test_bad_inputs() -> None:
    with pytest.raises(ValueError, match="targets have shape"):
        average_precisions(np.zeros((3, 2)), np.zeros((3, 3)))
    with pytest.raises(ValueError, match="0 or 1"):
        average_precision(np.zeros(3), np.array([0, 2, 1]))
    with pytest.raises(ValueError, match="finite"):
        average_precision(np.array([0.1, np.nan, 0.3]), np.array([0, 1, 1]))
    with pytest.raises(ValueError, match="videos, classes"):
        average_precisions(np.zeros(3), np.zeros(3))
