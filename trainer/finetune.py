"""Downstream transfer (paper §4.1, Tables 4, 11, 12): finetune or fc-only on official splits, 10-clip test.

Protocol, as the paper fixes it and as this module implements it:
- Encoders: the video R(2+1)D-18 for UCF101/HMDB51, the audio ResNet-18 for ESC-50 (recipe
  `data.modality`), from a pretrained checkpoint (ours, the official XDC video weights, a torchvision
  state dict) or random (Scratch). A fresh linear head (`LinearHead`) over the pooled features.
- Modes (Table 4): `full` trains every parameter; `fc` freezes the encoder and keeps it in eval mode,
  BatchNorm running statistics included, so only the linear classifier learns.
- Schedule (Table 11): SGD, momentum 0.9, batch 32, warmup/step/total 2/2/8 epochs, wd 0.005, γ 0.01,
  an epoch being `epoch_size` clips (106K UCF101, 40K HMDB51, 20K ESC-50). The base lr is either one
  value or the sweep of Table 12 (full: 0.001..0.01; fc adds 0.02, 0.04); like the paper, the sweep
  reports the best lr by mean test accuracy over the splits (there is no separate validation set),
  and every lr's accuracies beside it.
- Test (§4.1): `num_clips` (10) clips uniformly spaced over each test video, centre crop (video) or the
  full 40×100 window (audio), one crop per clip. The video's prediction is the mean of its clips'
  SOFTMAX probabilities (not of their logits: neighbouring projects differ here, and the two can
  disagree), its class the argmax. Accuracy is per split; the table shows the mean over the splits
  (UCF101/HMDB51: 3 splits; ESC-50: 5 folds, each tested after training on the 4 others).
- Audio-only sets (ESC-50): a "clip" is one 2-s mel window; the windows are spread uniformly over the
  file (each inside it when the file is longer than 2 s) and training draws one at random.
- Multi-label sets (AudioSet; dataset.json `multi_label: true`): a clip's targets are its video's
  multi-hot row, looked up by the batch's video index through the train set's catalog (as the
  pretraining loop looks up pseudo-labels), and the loss is binary cross-entropy on the logits
  (sigmoid), averaged over the batch and the classes (see `batch_loss`). A video's test score is the
  mean of its clips' SIGMOID probabilities; a split reports mAP (`trainer.metrics`: macro over the
  classes with a positive among the test videos), no accuracy, and the sweep picks the lr by mean mAP.

Files under `<run.out>/<dataset>/<method>/<mode>/`:
  lr<lr>/<split>/checkpoints/it000-ep<e>.pt   after every epoch (resume point; pruned when the split ends)
  lr<lr>/<split>/metrics.jsonl                epoch and test records (trainer.log)
  lr<lr>/<split>/predictions.csv              per test video: name, label, prediction, confidence
                                              (multi-label: name, its classes, top classes and scores)
  lr<lr>/<split>/result.json                  the split's accuracy (multi-label: `map`): its presence
                                              marks the split done
  sweep.json, recipe.yaml                     every lr and split of this run, the resolved recipe
and `<run.out>/results.{json,md}`, the table every run merges its rows into (`trainer.results`).
A rerun skips finished (lr, split) pairs and resumes an unfinished one from its last epoch; all of
it is refused when the recipe changed what that pair computes (digest mismatch). The loader is seeded
per epoch and the RNG state is checkpointed, so a pair killed mid-way and resumed ends with the weights,
result and predictions of an uninterrupted one (tests/test_faults.py).

Distributed: under torchrun each rank trains on its share of the clips (DDP reduces gradients) and
tests on its share of the segments; clip rows are gathered before averaging, rank 0 writes.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from trainer import distributed, sampling
from trainer.checkpoint import (
    checkpoint_path,
    diverged_error,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    prune_checkpoints,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from trainer.data import (
    ClipSpec,
    Runtime,
    ShardSet,
    eval_loader,
    find_shards,
    parse_index,
    train_loader,
    warn_if_name_ordered,
)
from trainer.extract import Catalog, read_catalog
from trainer.log import RunLogger
from trainer.metrics import mean_average_precision
from trainer.models import (
    Classifier,
    LinearHead,
    autocast,
    r2plus1d_18,
    resnet18_audio,
    video_model_for,
)
from trainer.models.weights import (
    StateDict,
    audio_model_for,
    detect_layout,
    read_payload,
    unwrap_state_dict,
)
from trainer.optim import LrScheduler, effective_schedule, sgd_with_schedule
from xdctools import recipe as train_recipe
from xdctools.atomic import write_bytes_atomic
from xdctools.errors import ConfigError, DataError
from xdctools.eval_recipe import DATASETS, EvalRecipe, SplitSets, dump_eval_recipe, eval_digest
from xdctools.shard import format as fmt

Progress = Callable[[str], None]
RESULT_FILE = "result.json"
PREDICTIONS_FILE = "predictions.csv"
SWEEP_FILE = "sweep.json"
TOP_CLASSES = 5  # multi-label predictions.csv: the best-scored classes listed per video
OFFICIAL_XDC_BN_EPS = 1e-3  # the released weights were converted from Caffe2, which used eps 1e-3


# --- splits: which shard sets train and which one tests ------------------------------------------


@dataclass(frozen=True)
class Split:
    """One train/test split: the shard sets trained on (several for ESC-50 folds) and the test set."""

    name: str  # "split1", "fold3", or an explicit split's name
    train: tuple[str, ...]
    test: str


def read_dataset(root: str | os.PathLike) -> dict[str, Any]:
    """The shards' dataset.json (written by `xdctools shard` when a run is complete)."""
    path = Path(root) / "dataset.json"
    if not path.is_file():
        raise DataError(f"{path}: not found (shard the dataset with `xdctools shard ... -o {root}` first)")
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: unreadable ({e})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("sets"), dict):
        raise DataError(f"{path}: no 'sets' mapping; not a dataset.json of `xdctools shard`")
    return doc


def resolve_splits(recipe: EvalRecipe, doc: Mapping[str, Any], source: str = "dataset.json") -> list[Split]:
    """The recipe's splits as shard sets; DataError naming the set a split needs and the sets there are.

    `train-test`: split N trains on `splitN-train`, tests on `splitN-test`. `folds`: fold N tests on
    `foldN` and trains on every other `fold*` set of the shards.
    """
    sets = doc["sets"]
    have = ", ".join(sorted(sets)) or "none"
    folds = sorted((int(m[1]), name) for name in sets if (m := re.fullmatch(r"fold(\d+)", name)))
    out = []
    for entry in recipe.data.splits:
        if isinstance(entry, SplitSets):
            split = Split(entry.name, tuple(entry.train), entry.test)
        elif recipe.data.split_layout == "train-test":
            split = Split(f"split{entry}", (f"split{entry}-train",), f"split{entry}-test")
        else:
            split = Split(f"fold{entry}", tuple(n for k, n in folds if k != entry), f"fold{entry}")
            if not split.train:
                raise DataError(f"{source}: fold {entry} leaves no other fold to train on (sets: {have})")
            official = DATASETS[recipe.dataset].splits if recipe.dataset in DATASETS else ()
            absent = [f"fold{k}" for k in official if k != entry and f"fold{k}" not in sets]
            if absent:  # the protocol trains on every other official fold
                raise DataError(
                    f"{source}: fold {entry} trains on all other folds, but the shards lack "
                    f"{', '.join(absent)} (sets: {have})"
                )
        for role, name in [("test", split.test)] + [("train", n) for n in split.train]:
            if name not in sets:
                hint = " (shard it with --split all)" if recipe.data.split_layout == "train-test" else ""
                raise DataError(
                    f"{source}: split {split.name} needs {role} set {name!r}, which the shards lack{hint} "
                    f"(sets: {have})"
                )
            if not sets[name].get("ok", 1):
                raise DataError(f"{source}: set {name!r} of split {split.name} holds no video")
        out.append(split)
    return out


def open_sets(root: str | os.PathLike, names: Iterable[str], *, video: bool) -> ShardSet:
    """The checked tars of several shard sets as one (ESC-50 trains on four folds)."""
    parts = [find_shards(root, name, video=video) for name in names]
    if len(parts) == 1:
        return parts[0]
    exts = {p.video_ext for p in parts}
    if len(exts) > 1:
        raise DataError(f"{root}: sets {list(names)} mix video formats {sorted(map(str, exts))}")
    return ShardSet(
        tars=tuple(t for p in parts for t in p.tars),
        indexes=tuple(i for p in parts for i in p.indexes),
        keys=tuple(k for p in parts for k in p.keys),
        sizes=tuple(s for p in parts for s in p.sizes),
        video_ext=parts[0].video_ext,
        short_side=parts[0].short_side,
        name_ordered=any(p.name_ordered for p in parts),
    )


def _members(shards: ShardSet, ext: str, *, first_segment_only: bool = False) -> Iterable[bytes]:
    """The bytes of one member of every sample (or of each video's segment 0), via the .idx offsets."""
    for tar, idx in zip(shards.tars, shards.indexes, strict=True):
        try:
            entries = parse_index(idx.read_text())
            with open(tar, "rb") as f:
                for key, members in entries:
                    if first_segment_only and not key.endswith("_s000"):
                        continue
                    offset, size = members[ext]
                    f.seek(offset)
                    yield f.read(size)
        except (OSError, ValueError, KeyError) as e:
            raise DataError(f"{tar}: cannot read the {ext} members ({type(e).__name__}: {e})") from None


def is_audio_only(shards: ShardSet) -> bool:
    """True when the set's samples carry no video (ESC-50): their info has no frame rate."""
    members = iter(_members(shards, fmt.INFO_EXT))
    try:
        info = fmt.decode_info(next(members))
    finally:
        members.close()  # type: ignore[attr-defined]  # a generator: closes the tar
    return info["fps_num"] == 0


def video_names(shards: ShardSet) -> dict[int, str]:
    """Video index -> source name (the relative path that was sharded), from the json members."""
    names = {}
    for data in _members(shards, fmt.META_EXT, first_segment_only=True):
        try:
            meta = json.loads(data)
            names[int(meta["key"][1:9])] = str(meta["source"]["name"])
        except (ValueError, KeyError, TypeError) as e:
            raise DataError(f"{shards.tars[0].parent}: a json member is malformed ({e})") from None
    return names


def clip_spec(recipe: EvalRecipe, audio_only: bool) -> ClipSpec:
    """The clip of the recipe; on audio-only sets a clip is exactly one WINDOW_FRAMES mel window."""
    d = recipe.data
    if audio_only:
        if d.modality == "video":
            raise ConfigError(f"{d.shards}: audio-only shards cannot feed the video encoder (data.modality)")
        return ClipSpec(length=fmt.WINDOW_FRAMES, stride=1, video=False)
    return ClipSpec(
        length=d.clip_frames,
        stride=d.stride,
        crop=d.crop,
        short_side=d.short_side,
        video=d.modality == "video",
    )


def check_labels(root: str | os.PathLike, set_names: Iterable[str], num_classes: int, *, video: bool) -> int:
    """Videos in the sets; DataError when a video has no label or one outside the dataset's classes.

    Each set is read on its own: video indices count from 0 in every set.
    """
    total = 0
    for name in set_names:
        catalog = read_catalog(find_shards(root, name, video=video))
        unlabelled = int((catalog.labels < 0).sum())
        if unlabelled:
            raise DataError(f"{root}: set {name}: {unlabelled} of {catalog.num_videos} videos have no label")
        if int(catalog.labels.max()) >= num_classes:
            raise DataError(
                f"{root}: set {name}: label {int(catalog.labels.max())}, "
                f"but dataset.json lists {num_classes} classes"
            )
        total += catalog.num_videos
    return total


def is_multi_label(doc: Mapping[str, Any]) -> bool:
    """Whether dataset.json says its videos carry class lists (AudioSet) rather than one class each."""
    return doc.get("multi_label") is True


def multi_label_catalog(root: str | os.PathLike, name: str, num_classes: int, *, video: bool) -> Catalog:
    """One set of a multi-label dataset: its catalog (the class lists by video), checked.

    DataError when its samples carry no class lists, when a video's list is empty (naming the first such
    video: it would train as a clip of no class and leave the test without its positives) or when a
    class index is outside the dataset's classes.
    """
    shards = find_shards(root, name, video=video)
    catalog = read_catalog(shards)
    where = f"{root}: set {name}"
    if not catalog.multi_label or catalog.label_values is None:
        raise DataError(f"{where}: dataset.json says multi_label, but its samples carry no labels.npy")
    empty = empty_label_lists(catalog)
    if len(empty):
        first = int(empty[0])
        source = video_names(shards).get(first, "")
        raise DataError(
            f"{where}: {len(empty)} of {catalog.num_videos} videos have an empty label list "
            f"(first: video {first} {source!r})"
        )
    top = int(catalog.label_values.max())
    if top >= num_classes:
        raise DataError(f"{where}: class index {top}, but dataset.json lists {num_classes} classes")
    return catalog


def empty_label_lists(catalog: Catalog) -> np.ndarray:
    """Video indices of a multi-label catalog whose class list is empty (ascending)."""
    if catalog.label_offsets is None:
        return np.zeros(0, np.int64)
    return catalog.videos[np.diff(catalog.label_offsets) == 0]


# --- encoders: from a checkpoint or from scratch ---------------------------------------------------


@dataclass(frozen=True)
class EncoderSource:
    """Where an encoder's weights came from, for the results and the digest."""

    # "scratch", "xdctools" (our training checkpoint), "state dict" (official XDC, torchvision, ...)
    kind: str
    path: str | None = None
    layout: str | None = None  # video layout of the weights
    bytes: int = 0


def encoder_state(payload: Any, modality: str, *, source: str) -> tuple[str, StateDict, dict[str, Any]]:
    """(kind, state dict of the `modality` encoder, its build config) from a loaded checkpoint.

    Our training checkpoints and `encoders.pt` (`trainer.checkpoint` format: {"format", "digest",
    "state": {"config", "model"}}, written by trainer.loop) hold both encoders of a `Learner` under
    `encoders.video.` / `encoders.audio.`; a bare state dict (official XDC, torchvision, or saved by
    hand) holds one, possibly under "state_dict"/"model" containers and DDP prefixes, or a whole
    model's keys under `encoders.<modality>.` / `<modality>.`, which are then taken.
    """
    kind, config = "state dict", {}
    if isinstance(payload, Mapping) and "format" in payload and isinstance(payload.get("state"), Mapping):
        kind = "xdctools"
        inner = payload["state"]
        if not isinstance(inner.get("model"), Mapping):
            keys = ", ".join(sorted(map(str, inner)))
            raise DataError(
                f"{source}: training checkpoint without a 'model' state dict (state keys: {keys})"
            )
        config = dict(inner.get("config") or {})
        payload = inner["model"]
    state = unwrap_state_dict(payload, source=source)
    for prefix in (f"encoders.{modality}.", f"{modality}."):
        taken = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        if taken:
            return kind, taken, config
    if kind == "xdctools":
        raise DataError(
            f"{source}: training checkpoint holds no {modality} encoder (no encoders.{modality}.*)"
        )
    return kind, state, config


def build_encoder(recipe: EvalRecipe) -> tuple[nn.Module, EncoderSource]:
    """The encoder of `data.modality`, from `model.checkpoint` or random (Scratch), without any fc."""
    cfg, modality = recipe.model, recipe.data.modality
    if cfg.checkpoint is None:
        eps = cfg.bn_eps or 1e-5
        if modality == "video":
            model = r2plus1d_18(width=cfg.width, layout=cfg.video_layout, bn_eps=eps)
        else:
            model = resnet18_audio(width=cfg.width, maxpool=cfg.audio_maxpool, bn_eps=eps)
        return model, EncoderSource("scratch")
    path = Path(cfg.checkpoint)
    kind, state, config = encoder_state(read_payload(path), modality, source=str(path))
    size = path.stat().st_size
    if modality == "audio":
        eps = cfg.bn_eps or float(config.get("bn_eps", 1e-5))
        model = audio_model_for(state, source=str(path), maxpool=cfg.audio_maxpool, bn_eps=eps)
        return model, EncoderSource(kind, str(path), None, size)
    if "conv1.weight" in state and "stem.0.weight" not in state:
        raise DataError(f"{path}: holds an audio encoder (conv1.*), but data.modality is video")
    layout = detect_layout(state, source=str(path))
    official = kind == "state dict" and layout == "xdc"  # the released XDC weights: Caffe2's eps
    eps = cfg.bn_eps or float(config.get("bn_eps", OFFICIAL_XDC_BN_EPS if official else 1e-5))
    try:
        model = video_model_for(state, bn_eps=eps)
    except DataError as e:  # it names the source "state dict": name the file instead
        raise DataError(f"{path}: {e.message.removeprefix('state dict: ')}") from None
    model.fc = None  # a torchvision checkpoint's classifier is not transferred
    return model, EncoderSource(kind, str(path), layout, size)


def freeze_encoder(model: Classifier) -> None:
    """fc-only transfer: no encoder parameter learns (and `set_mode` keeps its BatchNorm in eval)."""
    for p in model.encoder.parameters():
        p.requires_grad_(False)


def set_mode(model: Classifier, mode: str, *, training: bool) -> None:
    """train()/eval() for the mode: with `fc` the encoder stays in eval mode, so BN statistics stay."""
    model.train(training)
    if mode == "fc":
        model.encoder.eval()


# --- test time: clip probabilities -> video predictions --------------------------------------------


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


# --- one (lr, split): train, test, record ------------------------------------------------------


SCORE_FIELDS = ("accuracy", "correct", "map")  # result.json holds the ones its set has


@dataclass
class SplitResult:
    """A finished (lr, split): what result.json holds. A multi-label set's has `map`, no accuracy."""

    split: str
    lr: float
    accuracy: float | None  # 0..1, over the test videos; None on a multi-label set
    videos: int
    correct: int | None
    epochs: int
    train_loss: float | None
    seconds: float
    digest: str
    extra: dict[str, Any] = field(default_factory=dict)
    map: float | None = None  # multi-label sets: mAP over the classes with a positive among the videos

    @property
    def score(self) -> float:
        """What the lr sweep compares: the mAP of a multi-label set, else the accuracy."""
        return self.map if self.map is not None else float(self.accuracy)  # type: ignore[arg-type]

    def to_json(self) -> dict[str, Any]:
        """Every field but the scores the set does not have (single-label files are as they were)."""
        doc = {k: getattr(self, k) for k in self.__dataclass_fields__}
        return {k: v for k, v in doc.items() if not (k in SCORE_FIELDS and v is None)}

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> SplitResult:
        return cls(**{"accuracy": None, "correct": None, **doc})


def lr_dirname(lr: float) -> str:
    return f"lr{lr:g}"


def slug(text: str) -> str:
    """A folder name for a method label ("XDC IG65M" -> "xdc-ig65m")."""
    return re.sub(r"[^a-z0-9._-]+", "-", text.lower()).strip("-") or "method"


def run_dir(recipe: EvalRecipe) -> Path:
    """`<run.out>/<dataset>/<method>/<mode>` (dataset as `table_name`): what one run writes besides the
    merged table."""
    return Path(recipe.run.out) / recipe.table_name / slug(recipe.model.row) / recipe.mode


@dataclass
class _Context:
    """What every (lr, split) of a run shares."""

    recipe: EvalRecipe
    dist: distributed.Dist
    classes: list[str]
    source: EncoderSource
    progress: Progress
    multi_label: bool = False


@dataclass(frozen=True)
class MultiHot:
    """Training targets of a multi-label set: the multi-hot rows of a batch's videos, found by their
    video indices in the train set's catalog (`Catalog.rows_of`, the pretraining loop's lookup: a batch
    holds clips of several videos, and DALI gives each clip its video index, not its class list)."""

    catalog: Catalog
    num_classes: int

    def __call__(self, index: torch.Tensor) -> torch.Tensor:
        rows = self.catalog.rows_of(index.cpu().numpy().reshape(-1))
        return torch.from_numpy(self.catalog.multi_hot(rows, self.num_classes))


def check_multi_label_splits(splits: Iterable[Split], source: str) -> None:
    """DataError when a multi-label split trains on several sets: video indices count from 0 in every
    set and a batch does not say which set a clip came from, so its class list could not be found."""
    for split in splits:
        if len(split.train) != 1:
            raise DataError(
                f"{source}: split {split.name} trains on {len(split.train)} sets ({', '.join(split.train)}); "
                "a multi-label split trains on one (its labels are looked up by video index, which counts "
                "from 0 in every set)"
            )


def finetune_split(ctx: _Context, split: Split, lr: float) -> SplitResult:
    """Train a fresh head (and the encoder with mode full) on the split's train sets, test, record.

    Skips a pair whose result.json exists (same digest) and resumes from its last epoch checkpoint.
    """
    recipe, dist = ctx.recipe, ctx.dist
    folder = run_dir(recipe) / lr_dirname(lr) / split.name
    digest = eval_digest(
        recipe,
        {
            "lr": lr,
            "split": split.name,
            "train": split.train,
            "test": split.test,
            "checkpoint": ctx.source.path,
            "checkpoint_bytes": ctx.source.bytes,
        },
    )
    done = _finished(folder, digest)
    if done is not None:
        score = f"mAP {done.map:.3f}" if done.map is not None else f"{100 * done.score:.1f}%"
        ctx.progress(f"{split.name} lr {lr:g}: done before ({score}), skipped")
        return done
    started = time.time()
    root = recipe.data.shards
    train_shards = open_sets(root, split.train, video=recipe.data.modality == "video")
    if dist.is_main:  # once, not once per rank
        warn_if_name_ordered(train_shards)
    test_shards = open_sets(root, [split.test], video=recipe.data.modality == "video")
    audio_only = is_audio_only(train_shards)
    if is_audio_only(test_shards) != audio_only:
        raise DataError(f"{root}: sets {split.train} and {split.test} differ in having video")
    video = recipe.data.modality == "video"
    targets, test_catalog = None, None
    if ctx.multi_label:  # one train set: check_multi_label_splits
        targets = MultiHot(
            multi_label_catalog(root, split.train[0], len(ctx.classes), video=video), len(ctx.classes)
        )
        test_catalog = multi_label_catalog(root, split.test, len(ctx.classes), video=video)
        test_videos = test_catalog.num_videos
    else:
        check_labels(root, split.train, len(ctx.classes), video=video)
        test_videos = check_labels(root, [split.test], len(ctx.classes), video=video)
    spec = clip_spec(recipe, audio_only)

    # model: encoder from the checkpoint (or random), a fresh linear head; SGD on what may learn
    torch.manual_seed(recipe.seed)
    encoder, _ = build_encoder(recipe)
    model = make_classifier(encoder, len(ctx.classes), recipe.mode, recipe.model.head_norm).to(dist.device)
    optimizer, scheduler = make_optimizer(model, recipe, lr, dist.world_size)
    o = recipe.optim

    # resume from the last finished epoch of this (lr, split), if any
    start_epoch, logger_state = 0, None
    last = latest_checkpoint(folder)
    if last is not None:
        state = load_checkpoint(last, digest=digest)
        model.head.load_state_dict(state["head"])
        if "encoder" in state:
            model.encoder.load_state_dict(state["encoder"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        start_epoch, logger_state = int(state["epoch"]), state["logger"]
        ctx.progress(f"{split.name} lr {lr:g}: resuming after epoch {start_epoch}")
    trained = _ddp(model, dist)
    logger = RunLogger(folder, enabled=dist.is_main, resume=logger_state, tensorboard=False)
    if start_epoch == 0:  # a resumed pair keeps the record in the metrics lines it restores
        schedule = effective_schedule(optim_config(recipe, lr), dist.world_size)
        logger.log("schedule", 0, base_lr=float(lr), **schedule.to_dict())
    try:
        train_loss = None
        for epoch in range(start_epoch, o.total_epochs):
            run = _runtime(recipe, dist, seed=recipe.seed + 1009 * epoch)
            loader = train_loader(
                train_shards,
                batch_size=o.batch_size,
                epoch_size=o.epoch_size,
                clip=spec,
                run=run,
                spec_augment=recipe.data.spec_augment and recipe.data.modality == "audio",
                flip=recipe.data.flip,
            )
            train_loss, train_acc, seconds = train_epoch(
                model,
                loader,
                optimizer,
                scheduler,
                mode=recipe.mode,
                modality=recipe.data.modality,
                precision=recipe.model.precision,
                step=trained,
                targets=targets,
            )
            del loader
            if not math.isfinite(train_loss):  # checked on every rank before this epoch's checkpoint
                raise diverged_error(folder, f"in epoch {epoch + 1} at lr {lr:g}", "Lower the lr")
            distributed.broadcast_buffers_(model)  # rank 0's BatchNorm statistics: the test is sharded
            accuracy = {} if train_acc is None else {"train_acc": train_acc}  # no single class to hit
            logger.log(
                "epoch",
                scheduler.steps,
                epoch=epoch + 1,
                lr=scheduler.lr,
                train_loss=train_loss,
                **accuracy,
                seconds=seconds,
            )
            shown = "" if train_acc is None else f"acc {100 * train_acc:.1f}% "
            ctx.progress(
                f"{split.name} lr {lr:g}: epoch {epoch + 1}/{o.total_epochs} loss {train_loss:.4f} "
                f"{shown}({seconds:.0f} s)"
            )
            if dist.is_main:
                state = {
                    "epoch": epoch + 1,
                    "head": model.head.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "rng": rng_state(),
                    "logger": logger.state_dict(),
                }
                if recipe.mode == "full":
                    state["encoder"] = model.encoder.state_dict()
                save_checkpoint(checkpoint_path(folder, 0, epoch + 1), state, digest=digest)
            distributed.barrier()

        # test: every clip of every test video, softmax (multi-label: sigmoid) averaged per video
        set_mode(model, recipe.mode, training=False)
        test = eval_loader(
            test_shards,
            batch_size=recipe.test.batch_size,
            num_clips=recipe.test.num_clips,
            clip=spec,
            run=_runtime(recipe, dist, seed=recipe.seed),
        )
        rows = clip_probabilities(
            model,
            test,
            modality=recipe.data.modality,
            device=dist.device,
            precision=recipe.model.precision,
            multi_label=ctx.multi_label,
        )
        del test
        rows = gather_clip_rows(rows, len(ctx.classes))
        source = f"{root} set {split.test}"
        scores: VideoScores | MultiLabelScores
        if test_catalog is not None:
            scores = multi_label_scores(
                rows, recipe.test.num_clips, test_catalog, len(ctx.classes), source=source
            )
        else:
            scores = video_scores(rows, recipe.test.num_clips, source=source)
        if len(scores.videos) != test_videos:
            raise DataError(
                f"{root}: set {split.test} has {test_videos} videos, the test saw {len(scores.videos)}"
            )
        result = SplitResult(
            split=split.name,
            lr=float(lr),
            videos=len(scores.videos),
            epochs=o.total_epochs,
            train_loss=train_loss,
            seconds=round(time.time() - started, 1),
            digest=digest,
            extra={
                "train_sets": list(split.train),
                "test_set": split.test,
                "num_clips": recipe.test.num_clips,
                **score_extra(scores),
            },
            **score_fields(scores),
        )
        logger.log("test", scheduler.steps, split=split.name, **score_record(scores), videos=result.videos)
    finally:
        logger.close()
    if dist.is_main:
        names = video_names(test_shards)
        write_bytes_atomic(folder / PREDICTIONS_FILE, predictions_csv(scores, names, ctx.classes))
        write_bytes_atomic(folder / RESULT_FILE, (json.dumps(result.to_json(), indent=1) + "\n").encode())
        prune_checkpoints(folder, keep_last=recipe.run.keep_checkpoints)
        if recipe.run.keep_checkpoints == 0:
            for _, _, path in list_checkpoints(folder):
                path.unlink(missing_ok=True)
    distributed.barrier()
    if result.map is not None:
        classes = result.extra["map_classes"]
        tested = f"test mAP {result.map:.4f} ({result.videos} videos, mean over {classes} classes)"
    else:
        tested = f"test accuracy {100 * result.score:.2f}% ({result.videos} videos)"
    ctx.progress(f"{split.name} lr {lr:g}: {tested}")
    return result


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


def _finished(folder: Path, digest: str) -> SplitResult | None:
    path = folder / RESULT_FILE
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text())
        result = SplitResult.from_json(doc)
    except (OSError, ValueError, TypeError) as e:
        raise DataError(f"{path}: unreadable ({e}); remove it to redo this split") from None
    if result.digest != digest:
        raise DataError(
            f"{path}: written by another recipe or checkpoint (digest {result.digest}, now {digest}); "
            "use another run.out or remove the folder"
        )
    return result


def _runtime(recipe: EvalRecipe, dist: distributed.Dist, *, seed: int) -> Runtime:
    return Runtime(
        device=recipe.data.device,
        device_id=dist.local_rank,
        num_threads=recipe.data.num_threads,
        prefetch_queue_depth=recipe.data.prefetch,
        seed=seed,
        rank=dist.rank,
        world_size=dist.world_size,
    )


def _ddp(model: nn.Module, dist: distributed.Dist) -> nn.Module:
    """The module the training step calls: DDP over ranks, the model itself in one process."""
    if not dist.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [dist.device.index] if dist.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def make_classifier(encoder: nn.Module, num_classes: int, mode: str, head_norm: bool = False) -> Classifier:
    """The encoder and a fresh linear head over its pooled features; with mode fc the encoder is frozen.

    `head_norm` puts a BatchNorm without affine parameters before the linear layer (MAE-style linear
    probing): features whose spread is tiny next to their mean (the digits XDC audio encoder: std 0.007
    around 0.23 on random inputs) are otherwise out of reach of a short SGD schedule. Not the paper's
    protocol. With fc the features are stationary, so the norm keeps the exact running average
    (momentum None): the default exponential one starts from variance 1 and after 48 steps still holds
    0.9**48 = 0.006 of it, 60x the true variance of such features, so test logits were all bias.
    """
    head: nn.Module = LinearHead(encoder.feature_dim, num_classes)
    if head_norm:
        exact = {"momentum": None} if mode == "fc" else {}
        head = nn.Sequential(nn.BatchNorm1d(encoder.feature_dim, affine=False, **exact), head)
    model = Classifier(encoder, head)
    if mode == "fc":
        freeze_encoder(model)
    return model


def optim_config(recipe: EvalRecipe, lr: float) -> train_recipe.Optim:
    """Table 11's schedule at base lr `lr` in the pretraining terms (per-GPU batch, linear lr scaling)."""
    o = recipe.optim
    if o.epoch_size is None:
        raise ConfigError("optim.epoch_size: required to finetune")
    return train_recipe.Optim(
        epoch_size=o.epoch_size,
        batch_size=o.batch_size,
        lr=float(lr),
        lr_scaling=o.lr_scaling,
        warmup_start=o.warmup_start,
        momentum=o.momentum,
        weight_decay=o.weight_decay,
        warmup_epochs=o.warmup_epochs,
        step_epochs=o.step_epochs,
        total_epochs=o.total_epochs,
        gamma=o.gamma,
    )


def make_optimizer(
    model: nn.Module, recipe: EvalRecipe, lr: float, world_size: int = 1
) -> tuple[torch.optim.SGD, LrScheduler]:
    """SGD over the parameters that learn (the head only with mode fc) and Table 11's schedule at `lr`."""
    cfg = optim_config(recipe, lr)
    return sgd_with_schedule([p for p in model.parameters() if p.requires_grad], cfg, world_size)


def train_epoch(
    model: Classifier,
    loader: Iterable[Mapping[str, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    scheduler: LrScheduler,
    *,
    mode: str,
    modality: str,
    precision: str = "fp32",
    step: nn.Module | None = None,
    targets: MultiHot | None = None,
) -> tuple[float, float | None, float]:
    """One epoch on the true labels; (mean loss, accuracy, seconds) over all ranks (see `batch_loss`).

    `step` is the module called (the DDP wrapper of `model` under torchrun; `model` itself by default).
    With mode fc the encoder runs in eval mode: BatchNorm uses and keeps its running statistics.
    `targets` (a multi-label set) gives each batch's multi-hot rows; the accuracy is then None.
    """
    started = time.time()
    device = next(model.head.parameters()).device
    step = model if step is None else step
    set_mode(model, mode, training=True)
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, correct, clips
    for batch in loader:
        x = batch[modality].to(device, non_blocking=True)
        with autocast(device, precision):  # type: ignore[arg-type]
            logits = step(x)
        loss, correct = batch_loss(logits, batch, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        with torch.no_grad():
            sums += torch.stack(
                [
                    loss.detach().double() * len(logits),
                    correct.double(),
                    torch.tensor(len(logits), device=device).double(),
                ]
            )
    loss_sum, correct, clips = distributed.all_reduce_sum(sums.cpu().numpy())
    accuracy = None if targets is not None else correct / max(clips, 1.0)
    return loss_sum / max(clips, 1.0), accuracy, time.time() - started


def batch_loss(
    logits: torch.Tensor, batch: Mapping[str, torch.Tensor], targets: MultiHot | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, clips whose argmax is their class) of one training batch.

    Single-label: softmax cross-entropy against `batch["label"]`, averaged over the clips.
    Multi-label (`targets`): binary cross-entropy with logits (a sigmoid per class) against the
    multi-hot rows of the batch's videos, averaged over the clips AND the classes, as the AudioSet
    systems do (PANNs' clip_bce, AST's BCEWithLogitsLoss: the frameworks' default reduction), so the
    loss reads as the mean over yes/no questions whatever the number of classes. Under SGD this makes
    a logit's gradient 1/C of a class-summed loss's: the lr sweep is what adapts to it. The count of
    correct clips is then 0 (no single class to hit).
    """
    device = logits.device
    if targets is None:
        y = batch["label"].to(device, non_blocking=True)
        return F.cross_entropy(logits.float(), y), (logits.detach().argmax(1) == y).sum()
    y = targets(batch["index"]).to(device, non_blocking=True)
    loss = F.binary_cross_entropy_with_logits(logits.float(), y)
    return loss, torch.zeros((), dtype=torch.int64, device=device)


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


# --- the run: every lr of the sweep on every split, then the table -----------------------------------


def run_finetune(recipe: EvalRecipe, progress: Progress | None = None) -> dict[str, Any]:
    """Finetune (mode full) or train fc-only (mode fc) for every lr and split; merge the results table.

    Returns the sweep summary (see `summarise_sweep`); rank 0 also writes sweep.json, recipe.yaml
    and the merged results table under `run.out`.
    """
    if recipe.mode not in ("full", "fc"):
        raise ConfigError(f"mode {recipe.mode!r}: run_finetune trains (full or fc); use trainer.svm for svm")
    progress = progress or (lambda _msg: None)
    dist, classes, splits, multi_label = start_run(recipe, needs="finetuning")
    if multi_label:
        check_multi_label_splits(splits, f"{recipe.data.shards}/dataset.json")
    _, source = build_encoder(recipe)  # fails early on a checkpoint that does not fit
    write_recipe(recipe, dist)
    ctx = _Context(recipe, dist, classes, source, progress, multi_label)
    done = [finetune_split(ctx, split, lr) for lr in recipe.lrs for split in splits]
    summary = summarise_sweep(recipe, source, done, [s.name for s in splits])
    return finish_run(recipe, dist, SWEEP_FILE, summary)


class RunStart(NamedTuple):
    """What an evaluation run starts from."""

    dist: distributed.Dist
    classes: list[str]
    splits: list[Split]
    multi_label: bool  # dataset.json `multi_label`: videos carry class lists (AudioSet)


def start_run(recipe: EvalRecipe, *, needs: str) -> RunStart:
    """What an evaluation run starts from: the process group, the dataset's classes, the splits, and
    whether the dataset is multi-label.

    DataError when dataset.json lists fewer than 2 classes (`needs` names what needs the labels).
    """
    dist = distributed.init(recipe.data.device)
    doc = read_dataset(recipe.data.shards)
    classes = list(doc.get("classes") or [])
    if len(classes) < 2:
        raise DataError(
            f"{recipe.data.shards}/dataset.json: lists {len(classes)} classes; {needs} needs labels"
        )
    splits = resolve_splits(recipe, doc, f"{recipe.data.shards}/dataset.json")
    return RunStart(dist, classes, splits, is_multi_label(doc))


def write_recipe(recipe: EvalRecipe, dist: distributed.Dist) -> None:
    """Rank 0 writes the resolved recipe as `recipe.yaml` in the run folder."""
    if dist.is_main:
        write_bytes_atomic(run_dir(recipe) / "recipe.yaml", dump_eval_recipe(recipe).encode())


def finish_run(
    recipe: EvalRecipe, dist: distributed.Dist, name: str, summary: dict[str, Any]
) -> dict[str, Any]:
    """Rank 0 writes `summary` as `name` in the run folder and merges it into the results table (the
    files written go to summary["table"]); every rank waits for it. Returns `summary`."""
    from trainer import results

    if dist.is_main:
        write_bytes_atomic(run_dir(recipe) / name, (json.dumps(summary, indent=1) + "\n").encode())
        summary["table"] = [str(p) for p in results.merge_entry(recipe.run.out, summary)]
    distributed.barrier()
    return summary


def summarise_sweep(
    recipe: EvalRecipe, source: EncoderSource, done: list[SplitResult], split_names: list[str]
) -> dict[str, Any]:
    """Per lr: accuracy (multi-label: mAP) per split and their mean; the best lr (highest mean; the
    smaller lr on a tie)."""
    by_lr: dict[float, dict[str, float]] = {}
    for r in done:
        by_lr.setdefault(r.lr, {})[r.split] = r.score
    sweep = [
        {
            "lr": lr,
            "mean": float(np.mean([accs[s] for s in split_names])),
            "splits": {s: accs[s] for s in split_names},
        }
        for lr, accs in sorted(by_lr.items())
    ]
    best = max(sweep, key=lambda row: (row["mean"], -row["lr"]))
    metric = "map" if any(r.map is not None for r in done) else "accuracy"
    return entry_record(
        recipe, source, best["mean"], best["splits"], metric=metric, best_lr=best["lr"], sweep=sweep
    )


def entry_record(
    recipe: EvalRecipe,
    source: EncoderSource,
    score: float,
    splits: Mapping[str, float],
    *,
    metric: str = "accuracy",
    **details: Any,
) -> dict[str, Any]:
    """One row cell of the results table, with what produced it (see `trainer.results`); `score` (the
    mean over `splits`) is filed under `metric`: "accuracy", or "map" for a multi-label set."""
    info = DATASETS.get(recipe.dataset)
    return {
        "method": recipe.model.row,
        "pretraining": recipe.model.pretraining or ("None" if source.kind == "scratch" else "-"),
        "dataset": recipe.table_name,
        "title": recipe.title,
        "column": recipe.column,
        metric: float(score),
        "std": float(np.std(list(splits.values()))) if len(splits) > 1 else 0.0,
        "splits": dict(splits),
        "all_splits": info is None or set(splits) >= {_split_name(recipe, s) for s in info.splits},
        "checkpoint": source.path,
        "checkpoint_kind": source.kind,
        "modality": recipe.data.modality,
        "recipe": recipe.name,
        "run": str(run_dir(recipe)),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        **details,
    }


def _split_name(recipe: EvalRecipe, number: int) -> str:
    return f"split{number}" if recipe.data.split_layout == "train-test" else f"fold{number}"
