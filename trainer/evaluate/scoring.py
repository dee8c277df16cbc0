"""Test-time scoring (paper §4.1): clip probabilities → per-video means → accuracy or mAP, predictions.csv.

`num_clips` (10) clips uniformly spaced over each test video, centre crop (video) or the full 40×100
window (audio), one crop per clip. The video's prediction is the mean of its clips' SOFTMAX
probabilities (not of their logits: neighbouring projects differ here, and the two can disagree), its
class the argmax. On an audio-only set (ESC-50) a clip is one 2-s mel window, the windows spread
uniformly over the file (each inside it when the file is longer than 2 s). On a multi-label set
(AudioSet) a video's score is the mean of its clips' SIGMOID probabilities and the test reports mAP
(`trainer.metrics`: macro over the classes with a positive among the test videos), no accuracy.
Under torchrun each rank scores its share of the segments; the clip rows are gathered before averaging.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from trainer import distributed, sampling
from trainer.extract import Catalog
from trainer.metrics import mean_average_precision
from trainer.models import autocast
from xdctools.errors import DataError

TOP_CLASSES = 5  # multi-label predictions.csv: the best-scored classes listed per video


@dataclass(frozen=True)
class ClipRows:
    """One row per test clip: its video index, clip id, true label and softmax probabilities (C,)."""

    index: np.ndarray  # (R,) int64
    clip: np.ndarray  # (R,) int64
    label: np.ndarray  # (R,) int64
    probs: np.ndarray  # (R, C) float32


@dataclass(frozen=True)
class VideoScores:
    """Per test video: the mean of its clips' softmax, the argmax class, and the accuracy."""

    videos: np.ndarray  # (V,) int64 ascending
    labels: np.ndarray  # (V,) int64
    probs: np.ndarray  # (V, C) float32: mean over the video's clips of softmax(logits)
    predicted: np.ndarray  # (V,) int64
    accuracy: float


@dataclass(frozen=True)
class MultiLabelScores:
    """Per test video of a multi-label set: the mean of its clips' sigmoid, its classes, and the mAP."""

    videos: np.ndarray  # (V,) int64 ascending
    targets: np.ndarray  # (V, C) float32 multi-hot: the video's classes
    probs: np.ndarray  # (V, C) float32: mean over the video's clips of sigmoid(logits)
    map: float  # macro mean of the per-class APs over the classes with a positive
    classes_scored: int  # how many classes have a positive (the mAP is their mean)


# --- clips -----------------------------------------------------------------------------------------


@torch.no_grad()
def forward_clips(
    forward: Callable[[torch.Tensor], torch.Tensor],
    post: Callable[[torch.Tensor], torch.Tensor],
    loader: Iterable[Mapping[str, torch.Tensor]],
    *,
    modality: str,
    device: torch.device,
    precision: str = "fp32",
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
    """`post(forward(clips))` of every clip the loader yields, `forward` under autocast, `post` after it.

    Returns (outputs (R, ...) float32, video index, clip id, label (R,) int64), or None for no clip.
    """
    outputs, index, clip, label = [], [], [], []
    for batch in loader:
        if batch["index"].numel() == 0:
            continue
        with autocast(device, precision):  # type: ignore[arg-type]
            out = forward(batch[modality].to(device, non_blocking=True))
        outputs.append(post(out).cpu().numpy())
        index.append(batch["index"].numpy())
        clip.append(batch["clip"].numpy())
        label.append(batch["label"].numpy())
    if not outputs:
        return None
    return (
        np.concatenate(outputs).astype(np.float32),
        np.concatenate(index).astype(np.int64),
        np.concatenate(clip).astype(np.int64),
        np.concatenate(label).astype(np.int64),
    )


def clip_probabilities(
    model: nn.Module,
    loader: Iterable[Mapping[str, torch.Tensor]],
    *,
    modality: str,
    device: torch.device,
    precision: str = "fp32",
    multi_label: bool = False,
) -> ClipRows:
    """Softmax over classes of every clip the loader yields (the model in eval mode; caller sets it);
    with `multi_label` each class's sigmoid instead (the classes are independent yes/no questions)."""
    rows = forward_clips(
        model,
        clip_activation(multi_label),
        loader,
        modality=modality,
        device=device,
        precision=precision,
    )
    if rows is None:
        return ClipRows(*(np.zeros(0, np.int64) for _ in range(3)), np.zeros((0, 0), np.float32))
    probs, index, clip, label = rows
    return ClipRows(index, clip, label, probs)


def clip_activation(multi_label: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    """Logits -> the probabilities averaged per video: softmax over classes, or per-class sigmoid."""
    if multi_label:
        return lambda logits: torch.sigmoid(logits.float())
    return lambda logits: F.softmax(logits.float(), dim=1)


def gather_clip_rows(rows: ClipRows, num_classes: int) -> ClipRows:
    """Every rank's clip rows on every rank (a video's segments may sit on two ranks)."""
    probs = rows.probs if rows.probs.size else np.zeros((0, num_classes), np.float32)
    ints = (
        np.stack([rows.index, rows.clip, rows.label], axis=1)
        if len(rows.index)
        else np.zeros((0, 3), np.int64)
    )
    ints = distributed.all_gather_rows(ints.astype(np.int64))
    probs = distributed.all_gather_rows(probs.astype(np.float32))
    return ClipRows(ints[:, 0], ints[:, 1], ints[:, 2], probs)


# --- videos ----------------------------------------------------------------------------------------


def video_scores(rows: ClipRows, num_clips: int, *, source: str = "test set") -> VideoScores:
    """Average clip softmax per video; DataError when a video does not have exactly `num_clips` clips."""
    order, videos, probs = video_means(rows, num_clips, source=source)
    labels = rows.label[order][::num_clips]
    if not np.array_equal(np.repeat(labels, num_clips), rows.label[order]):
        raise DataError(f"{source}: the clips of a video carry different labels")
    predicted = probs.argmax(axis=1).astype(np.int64)
    return VideoScores(videos, labels, probs, predicted, float((predicted == labels).mean()))


def video_means(rows: ClipRows, num_clips: int, *, source: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(row order by video then clip, videos ascending, mean clip probabilities per video), after checking
    that every video has clips 0..num_clips-1 exactly once; DataError naming the first that does not."""
    if len(rows.index) == 0:
        raise DataError(f"{source}: the test loader yielded no clips")
    order = np.lexsort((rows.clip, rows.index))
    index, clip = rows.index[order], rows.clip[order]
    videos, counts = np.unique(index, return_counts=True)
    if not (counts == num_clips).all():
        bad = int(videos[np.flatnonzero(counts != num_clips)[0]])
        raise DataError(
            f"{source}: video {bad} yielded {int(counts[videos == bad][0])} clips, not {num_clips}"
        )
    expected = np.tile(np.arange(num_clips), len(videos))
    if not np.array_equal(clip, expected):
        raise DataError(f"{source}: clip ids of a video are not 0..{num_clips - 1} exactly once")
    _, probs = sampling.mean_per_video(rows.probs, rows.index)
    return order, videos, probs


def multi_label_scores(
    rows: ClipRows, num_clips: int, catalog: Catalog, num_classes: int, *, source: str = "test set"
) -> MultiLabelScores:
    """Average clip sigmoid per video, score it against the videos' class lists (from the test set's
    catalog) by mAP over the classes with a positive; DataError as `video_means`."""
    _, videos, probs = video_means(rows, num_clips, source=source)
    targets = catalog.multi_hot(catalog.rows_of(videos), num_classes)
    try:
        score = mean_average_precision(probs, targets)
    except ValueError as e:  # no test video has a class
        raise DataError(f"{source}: {e}") from None
    return MultiLabelScores(videos, targets, probs, score, int((targets.sum(axis=0) > 0).sum()))


# --- what a test records ---------------------------------------------------------------------------


def score_fields(scores: VideoScores | MultiLabelScores) -> dict[str, Any]:
    """The SplitResult fields of a test: its accuracy and correct videos, or its mAP."""
    if isinstance(scores, MultiLabelScores):
        return {"accuracy": None, "correct": None, "map": scores.map}
    return {"accuracy": scores.accuracy, "correct": int((scores.predicted == scores.labels).sum())}


def score_extra(scores: VideoScores | MultiLabelScores) -> dict[str, Any]:
    """What result.json adds about a multi-label test: over how many classes the mAP is the mean."""
    return {"map_classes": scores.classes_scored} if isinstance(scores, MultiLabelScores) else {}


def score_record(scores: VideoScores | MultiLabelScores) -> dict[str, Any]:
    """The score fields of the metrics.jsonl test record."""
    if isinstance(scores, MultiLabelScores):
        return {"map": scores.map, "map_classes": scores.classes_scored}
    return {"accuracy": scores.accuracy}


def predictions_csv(
    scores: VideoScores | MultiLabelScores, names: Mapping[int, str], classes: list[str]
) -> bytes:
    """predictions.csv of a test: a row per video (`_predictions_csv`, `_multi_label_predictions_csv`)."""
    if isinstance(scores, MultiLabelScores):
        return _multi_label_predictions_csv(scores, names, classes)
    return _predictions_csv(scores, names, classes)


def _multi_label_predictions_csv(
    scores: MultiLabelScores, names: Mapping[int, str], classes: list[str], top: int = TOP_CLASSES
) -> bytes:
    """Per video: its classes ("; "-joined names, class-index order), then its `top` best-scored classes,
    best first, each with its mean sigmoid (top1, score1, top2, score2, ...)."""
    top = min(top, len(classes))
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(
        ["video", "name", "labels", *(f"{c}{k}" for k in range(1, top + 1) for c in ("top", "score"))]
    )
    for v, target, probs in zip(scores.videos, scores.targets, scores.probs, strict=True):
        ranked = np.argsort(-probs, kind="stable")[:top]
        row = [int(v), names.get(int(v), ""), "; ".join(classes[c] for c in np.flatnonzero(target))]
        writer.writerow(row + [x for c in ranked for x in (classes[c], f"{probs[c]:.4f}")])
    return buf.getvalue().encode()


def _predictions_csv(scores: VideoScores, names: Mapping[int, str], classes: list[str]) -> bytes:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["video", "name", "label", "predicted", "confidence", "correct"])
    for v, label, pred, probs in zip(
        scores.videos, scores.labels, scores.predicted, scores.probs, strict=True
    ):
        writer.writerow(
            [
                int(v),
                names.get(int(v), ""),
                classes[label],
                classes[pred],
                f"{probs[pred]:.4f}",
                int(label == pred),
            ]
        )
    return buf.getvalue().encode()
