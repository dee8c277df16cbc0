"""The downstream set's splits: dataset.json's sets as train/test splits, opened, their labels checked.

A split trains on one or more shard sets and tests on one (`Split`). `resolve_splits` maps the recipe's
splits onto the sets dataset.json lists (`train-test`: UCF101/HMDB51's `splitN-train`/`splitN-test`;
`folds`: ESC-50's `foldN`, each tested after training on the others); `open_split` opens a split's
shards (through `xdctools.shard.read`, via `trainer.data.find_shards`) and checks that every video has
a label among the dataset's classes, or, on a multi-label set (AudioSet), a non-empty class list.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trainer import distributed
from trainer.data import ClipSpec, Runtime, ShardSet, find_shards, warn_if_name_ordered
from trainer.extract import Catalog, read_catalog
from xdctools.errors import ConfigError, DataError
from xdctools.eval_recipe import DATASETS, EvalRecipe, SplitSets
from xdctools.shard import format as fmt
from xdctools.shard.read import DATASET_FILE, Sample, locations, read_dataset_json, read_samples


@dataclass(frozen=True)
class Split:
    """One train/test split: the shard sets trained on (several for ESC-50 folds) and the test set."""

    name: str  # "split1", "fold3", or an explicit split's name
    train: tuple[str, ...]
    test: str


def read_dataset(root: str | os.PathLike) -> dict[str, Any]:
    """The shards' dataset.json (written by `xdctools shard` when a run is complete)."""
    path = Path(root) / DATASET_FILE
    doc = read_dataset_json(root)
    if doc is None:
        raise DataError(f"{path}: not found (shard the dataset with `xdctools shard ... -o {root}` first)")
    if "sets" not in doc:
        raise DataError(f"{path}: no 'sets' mapping; not a dataset.json of `xdctools shard`")
    return doc


def is_multi_label(doc: Mapping[str, Any]) -> bool:
    """Whether dataset.json says its videos carry class lists (AudioSet) rather than one class each."""
    return doc.get("multi_label") is True


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


def split_name(recipe: EvalRecipe, number: int) -> str:
    """The name of official split `number` in the recipe's layout: "split2" or "fold2"."""
    return f"split{number}" if recipe.data.split_layout == "train-test" else f"fold{number}"


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


# --- the sets of a split, opened -------------------------------------------------------------------


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


def _members(shards: ShardSet, ext: str, *, first_segment_only: bool = False) -> Iterator[Sample]:
    """The `ext` member of every sample (or of each video's segment 0), via the .idx offsets."""
    locs = locations(shards.tars)
    if first_segment_only:
        locs = (loc for loc in locs if loc.key.endswith("_s000"))
    return read_samples(locs, [ext])


def is_audio_only(shards: ShardSet) -> bool:
    """True when the set's samples carry no video (ESC-50): their info has no frame rate."""
    samples = _members(shards, fmt.INFO_EXT)
    try:
        info = next(samples).decode(fmt.INFO_EXT, fmt.decode_info)
    finally:
        samples.close()  # a generator: closes the tar
    return info["fps_num"] == 0


def video_names(shards: ShardSet) -> dict[int, str]:
    """Video index -> source name (the relative path that was sharded), from the json members."""
    names = {}
    for sample in _members(shards, fmt.META_EXT, first_segment_only=True):
        meta = sample.decode(fmt.META_EXT, json.loads)
        try:
            names[int(meta["key"][1:9])] = str(meta["source"]["name"])
        except (ValueError, KeyError, TypeError) as e:
            raise DataError(f"{shards.tars[0].parent}: a json member is malformed ({e})") from None
    return names


def eval_clip_spec(recipe: EvalRecipe, audio_only: bool) -> ClipSpec:
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


def loader_runtime(recipe: EvalRecipe, dist: distributed.Dist, *, seed: int) -> Runtime:
    """The DALI runtime of the recipe's loaders on this rank, seeded with `seed`."""
    return Runtime(
        device=recipe.data.device,
        device_id=dist.local_rank,
        num_threads=recipe.data.num_threads,
        prefetch_queue_depth=recipe.data.prefetch,
        seed=seed,
        rank=dist.rank,
        world_size=dist.world_size,
    )


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


@dataclass(frozen=True)
class SplitData:
    """A split's sets opened and their labels checked: what trains, what tests, and the clip they yield."""

    train: ShardSet
    test: ShardSet
    clip: ClipSpec
    test_videos: int
    targets: MultiHot | None = None  # multi-label: the train set's class lists, by video index
    test_catalog: Catalog | None = None  # multi-label: the test set's class lists


def open_split(
    recipe: EvalRecipe, split: Split, num_classes: int, *, multi_label: bool, warn: bool
) -> SplitData:
    """The split's train and test sets, checked (labels, same kind of media); `warn` on one rank only:
    a warning when a train set's samples are in name order (so a class's videos sit together)."""
    root = recipe.data.shards
    video = recipe.data.modality == "video"
    train = open_sets(root, split.train, video=video)
    if warn:  # once, not once per rank
        warn_if_name_ordered(train)
    test = open_sets(root, [split.test], video=video)
    audio_only = is_audio_only(train)
    if is_audio_only(test) != audio_only:
        raise DataError(f"{root}: sets {split.train} and {split.test} differ in having video")
    if multi_label:  # one train set: check_multi_label_splits
        targets = MultiHot(multi_label_catalog(root, split.train[0], num_classes, video=video), num_classes)
        catalog = multi_label_catalog(root, split.test, num_classes, video=video)
        return SplitData(
            train, test, eval_clip_spec(recipe, audio_only), catalog.num_videos, targets, catalog
        )
    check_set_labels(root, split.train, num_classes, video=video)
    videos = check_set_labels(root, [split.test], num_classes, video=video)
    return SplitData(train, test, eval_clip_spec(recipe, audio_only), videos)


# --- labels ----------------------------------------------------------------------------------------


def check_set_labels(
    root: str | os.PathLike, set_names: Iterable[str], num_classes: int, *, video: bool
) -> int:
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
