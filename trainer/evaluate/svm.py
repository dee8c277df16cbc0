"""DCASE-style evaluation (paper §6, after AVTS [29]): linear SVM on frozen conv5 features of 60 clips a file.

For every file of a set, `svm.num_clips` (60) clips are sampled uniformly over it (`eval_loader`); on
an audio-only set a clip is one 2-s, 40×100 mel window, each inside the file when it is longer than
2 s. The frozen encoder (eval mode) maps a clip to its conv5 features: the globally average-pooled
output of the last residual stage (`forward_features`, 512·width dims).

How clips become a file's prediction (`svm.pool`; the paper only says "a linear SVM on these
features", and [29]'s text could not be consulted offline here, so both readings are offered):
- `clips` (default): every clip is a training sample carrying its file's label; at test time the
  SVM's decision scores of a file's clips are averaged and the file takes the argmax. This is the
  same "classify clips, average over the file" protocol as the paper's 10-clip test.
- `mean`: a file's clip features are averaged first; one sample per file, train and test.

Features are standardised (mean/std of the training samples), then `sklearn.svm.LinearSVC`
(one-vs-rest, squared hinge). C is cross-validated over `svm.cs` on the training files only
(stratified folds, grouped by file so that clips of one file never sit on both sides), the best C
(mean CV accuracy; the smaller C on a tie) is refit on all training samples, and the test split is
scored once. Splits follow the recipe (DCASE and ESC-50: 5 folds, each tested after training on
the 4 others); each set's features are extracted once per run. Multi-label sets (AudioSet) are refused:
scoring them would take one binary SVM per class (one-vs-rest on the class lists) and mAP, not written here.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from trainer import distributed, sampling
from trainer.data import eval_loader
from trainer.evaluate.encoders import EncoderSource, build_encoder
from trainer.evaluate.run import Progress, entry_record, finish_run, start_run, write_recipe
from trainer.evaluate.scoring import forward_clips
from trainer.evaluate.splits import (
    Split,
    check_set_labels,
    eval_clip_spec,
    is_audio_only,
    loader_runtime,
    open_sets,
)
from trainer.extract import eval_mode
from xdctools.errors import ConfigError, DataError
from xdctools.eval_recipe import EvalRecipe

SVM_FILE = "svm.json"


@dataclass(frozen=True)
class ClipFeatures:
    """Pooled encoder features of every clip of a set: (R, D) float32 with each row's file and label."""

    features: np.ndarray  # (R, D) float32
    file: np.ndarray  # (R,) int64: the video (file) index within its set, offset to be unique across sets
    clip: np.ndarray  # (R,) int64
    label: np.ndarray  # (R,) int64

    def __len__(self) -> int:
        return len(self.file)

    @staticmethod
    def concat(parts: Iterable[ClipFeatures]) -> ClipFeatures:
        parts = list(parts)
        return ClipFeatures(
            *(np.concatenate([getattr(p, f) for p in parts]) for f in ("features", "file", "clip", "label"))
        )

    def per_file(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(files, mean feature per file (F, D), label per file), files ascending."""
        files, means = sampling.mean_per_video(self.features, self.file)
        order = np.argsort(self.file, kind="stable")
        labels = self.label[order][np.searchsorted(self.file[order], files)]
        return files, means, labels


def extract_clip_features(
    encoder: nn.Module,
    loader: Iterable[Mapping[str, torch.Tensor]],
    *,
    modality: str,
    device: torch.device,
    precision: str = "fp32",
) -> ClipFeatures:
    """`encoder.forward_features` of every clip the loader yields, the encoder in eval mode (its own mode
    restored after, so that a caller still training it is not left with frozen batch-norm statistics)."""
    with eval_mode({modality: encoder}):
        rows = forward_clips(
            encoder.forward_features,
            lambda f: f.float(),
            loader,
            modality=modality,
            device=device,
            precision=precision,
        )
    if rows is None:
        dim = int(getattr(encoder, "feature_dim", 0))
        return ClipFeatures(np.zeros((0, dim), np.float32), *(np.zeros(0, np.int64) for _ in range(3)))
    return ClipFeatures(*rows)


def gather_features(part: ClipFeatures) -> ClipFeatures:
    """Every rank's clip rows on every rank, ordered by (file, clip)."""
    ints = np.stack([part.file, part.clip, part.label], axis=1).astype(np.int64)
    ints = distributed.all_gather_rows(ints)
    feats = distributed.all_gather_rows(part.features.astype(np.float32))
    order = np.lexsort((ints[:, 1], ints[:, 0]))
    return ClipFeatures(feats[order], ints[order, 0], ints[order, 1], ints[order, 2])


# --- the SVM ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SvmResult:
    """Test accuracy over files, the C chosen, and the mean CV accuracy of every C tried."""

    accuracy: float
    c: float
    cv: dict[str, float | None]  # str(C) -> mean CV accuracy (None: CV impossible, see `cv_note`)
    files: int
    cv_note: str = ""


def _samples(data: ClipFeatures, pool: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(X, y, groups) for the SVM: one row per clip (pool "clips") or per file (pool "mean")."""
    if pool == "mean":
        files, means, labels = data.per_file()
        return means, labels, files
    return data.features, data.label, data.file


def _file_scores(model: Any, data: ClipFeatures, pool: str) -> tuple[np.ndarray, np.ndarray]:
    """(labels, predictions) per file: mean decision score over a file's clips, or its mean feature's."""
    _, means, labels = data.per_file()
    if pool == "mean":
        scores = model.decision_function(means)
    else:
        _, scores = sampling.mean_per_video(
            np.asarray(model.decision_function(data.features), np.float64), data.file
        )
    scores = np.asarray(scores)
    if scores.ndim == 1:  # two classes: one score, positive for classes_[1]
        predicted = model.classes_[(scores > 0).astype(int)]
    else:
        predicted = model.classes_[scores.argmax(axis=1)]
    return labels, np.asarray(predicted)


def _pipeline(c: float, seed: int) -> Any:
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import LinearSVC

    return make_pipeline(StandardScaler(), LinearSVC(C=c, dual="auto", max_iter=20_000, random_state=seed))


def fit_svm(
    train: ClipFeatures,
    test: ClipFeatures,
    *,
    pool: str = "clips",
    cs: Iterable[float] = (0.001, 0.01, 0.1, 1.0, 10.0),
    cv_folds: int = 5,
    seed: int = 0,
) -> SvmResult:
    """Choose C by grouped, stratified CV on the training files, refit, score the test files."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.model_selection import StratifiedGroupKFold

    if pool not in ("clips", "mean"):
        raise ConfigError(f"svm pool {pool!r} is not 'clips' or 'mean'")
    if len(train) == 0 or len(test) == 0:
        raise DataError("SVM: no training or no test clips")
    cs = sorted({float(c) for c in cs})
    x, y, groups = _samples(train, pool)
    if len(np.unique(y)) < 2:
        raise DataError(f"SVM: the training files hold {len(np.unique(y))} class(es); need at least 2")
    _, file_counts = np.unique(train.per_file()[2], return_counts=True)
    folds = min(cv_folds, int(file_counts.min()))
    cv: dict[str, float | None] = {}
    note = ""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        if folds >= 2 and len(cs) > 1:
            splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
            fold_list = list(splitter.split(x, y, groups))
            for c in cs:
                accs = []
                for tr, va in fold_list:
                    model = _pipeline(c, seed).fit(x[tr], y[tr])
                    part = ClipFeatures(
                        *(
                            a[np.isin(train.file, groups[va])]
                            for a in (train.features, train.file, train.clip, train.label)
                        )
                    )
                    labels, pred = _file_scores(model, part, pool)
                    accs.append(float((labels == pred).mean()))
                cv[str(c)] = float(np.mean(accs))
            best = max(cs, key=lambda c: (cv[str(c)], -c))
        else:
            best = cs[len(cs) // 2]
            cv = {str(c): None for c in cs}
            note = (
                "single C"
                if len(cs) == 1
                else f"a class has {int(file_counts.min())} training file(s): no CV, middle C"
            )
        model = _pipeline(best, seed).fit(x, y)
    labels, pred = _file_scores(model, test, pool)
    return SvmResult(float((labels == pred).mean()), best, cv, len(labels), note)


# --- the run ---------------------------------------------------------------------------------------


def run_svm(recipe: EvalRecipe, progress: Progress | None = None) -> dict[str, Any]:
    """Extract each set's clip features once, fit and score the SVM per split, merge the results table."""
    if recipe.mode != "svm":
        raise ConfigError(f"mode {recipe.mode!r}: run_svm evaluates mode svm")
    progress = progress or (lambda _msg: None)
    dist, classes, splits, multi_label = start_run(recipe, needs="the SVM")
    if multi_label:
        raise ConfigError(
            f"{recipe.data.shards}/dataset.json: multi_label: mode svm is not supported on a multi-label set "
            "(the SVM gives each file one class); use mode fc or full, which score mAP"
        )
    torch.manual_seed(recipe.seed)
    encoder, source = build_encoder(recipe)
    encoder = encoder.to(dist.device).eval()
    write_recipe(recipe, dist)

    cache: dict[str, ClipFeatures] = {}
    needed = sorted({name for s in splits for name in (*s.train, s.test)})
    for offset, name in enumerate(needed):  # file ids unique across sets: set position * 10^9 + index
        started = time.time()
        cache[name] = _set_features(recipe, encoder, name, len(classes), dist, offset * 1_000_000_000)
        progress(
            f"{name}: features of {len(np.unique(cache[name].file))} files x {recipe.svm.num_clips} clips "
            f"({time.time() - started:.0f} s)"
        )

    per_split: dict[str, SvmResult] = {}
    for split in splits:
        per_split[split.name] = _score_split(recipe, split, cache)
        r = per_split[split.name]
        progress(f"{split.name}: SVM accuracy {100 * r.accuracy:.2f}% ({r.files} files, C {r.c:g})")
    summary = summarise_svm(recipe, source, per_split)
    return finish_run(recipe, dist, SVM_FILE, summary)


def _set_features(
    recipe: EvalRecipe, encoder: nn.Module, name: str, num_classes: int, dist: distributed.Dist, offset: int
) -> ClipFeatures:
    shards = open_sets(recipe.data.shards, [name], video=recipe.data.modality == "video")
    files = check_set_labels(recipe.data.shards, [name], num_classes, video=recipe.data.modality == "video")
    spec = eval_clip_spec(recipe, is_audio_only(shards))
    loader = eval_loader(
        shards,
        batch_size=recipe.svm.batch_size,
        num_clips=recipe.svm.num_clips,
        clip=spec,
        run=loader_runtime(recipe, dist, seed=recipe.seed),
    )
    part = extract_clip_features(
        encoder, loader, modality=recipe.data.modality, device=dist.device, precision=recipe.model.precision
    )
    data = gather_features(part)
    found = len(np.unique(data.file))
    counts = np.unique(data.file, return_counts=True)[1]
    if found != files or not (counts == recipe.svm.num_clips).all():
        raise DataError(
            f"{recipe.data.shards}: set {name}: expected {files} files x {recipe.svm.num_clips} clips, "
            f"got {found} files and {len(data)} clips"
        )
    return ClipFeatures(data.features, data.file + offset, data.clip, data.label)


def _score_split(recipe: EvalRecipe, split: Split, cache: Mapping[str, ClipFeatures]) -> SvmResult:
    train = ClipFeatures.concat(cache[name] for name in split.train)
    s = recipe.svm
    return fit_svm(train, cache[split.test], pool=s.pool, cs=s.cs, cv_folds=s.cv_folds, seed=recipe.seed)


def summarise_svm(
    recipe: EvalRecipe, source: EncoderSource, per_split: Mapping[str, SvmResult]
) -> dict[str, Any]:
    accs = {name: r.accuracy for name, r in per_split.items()}
    details = {
        name: {"accuracy": r.accuracy, "c": r.c, "cv": r.cv, "files": r.files, "note": r.cv_note}
        for name, r in per_split.items()
    }
    setting = {"pool": recipe.svm.pool, "clips": recipe.svm.num_clips}
    return entry_record(
        recipe, source, float(np.mean(list(accs.values()))), accs, setting=setting, svm=details
    )
