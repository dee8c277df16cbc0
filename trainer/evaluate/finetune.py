"""Downstream transfer (paper §4.1, Tables 4, 11, 12): finetune or fc-only on official splits, 10-clip test.

`run_finetune` trains every (lr, split) pair of the recipe, one after the other (`finetune_split`):
the encoder (`trainer.evaluate.encoders`) with a fresh linear head, trained on the split's train sets
at Table 11's schedule (`trainer.evaluate.train`), tested on its test set with 10 clips per video
(`trainer.evaluate.scoring`). The base lr is either one value or the sweep of Table 12 (full:
0.001..0.01; fc adds 0.02, 0.04); like the paper, the sweep reports the best lr by mean test accuracy
over the splits (there is no separate validation set; a multi-label set: by mean mAP), and every lr's
accuracies beside it. UCF101/HMDB51 have 3 splits; ESC-50 5 folds, each tested after training on the
4 others.

Files under `<run.out>/<dataset>/<method>/<mode>/`:
  lr<lr>/<split>/checkpoints/it000-ep<e>.pt   after every epoch (resume point; pruned when the split ends)
  lr<lr>/<split>/metrics.jsonl                epoch and test records (trainer.log)
  lr<lr>/<split>/predictions.csv              per test video: name, label, prediction, confidence
                                              (multi-label: name, its classes, top classes and scores)
  lr<lr>/<split>/result.json                  the split's accuracy (multi-label: `map`): its presence
                                              marks the split done
  sweep.json, recipe.yaml                     every lr and split of this run, the resolved recipe
and `<run.out>/results.{json,md}`, the table every run merges its rows into (`trainer.evaluate.results`).
A rerun skips finished (lr, split) pairs and resumes an unfinished one from its last epoch; all of
it is refused when the recipe changed what that pair computes (digest mismatch). The loader is seeded
per epoch and the RNG state is checkpointed, so a pair killed mid-way and resumed ends with the weights,
result and predictions of an uninterrupted one (tests/test_faults.py).

Distributed: under torchrun each rank trains on its share of the clips (DDP reduces gradients) and
tests on its share of the segments; clip rows are gathered before averaging, rank 0 writes.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from trainer import distributed
from trainer.checkpoint import (
    checkpoint_path,
    diverged_error,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    prune_checkpoints,
    rng_state,
    save_checkpoint,
    seed_all,
    set_rng_state,
)
from trainer.data import eval_loader, train_loader
from trainer.evaluate.encoders import EncoderSource, build_encoder, make_classifier, set_mode
from trainer.evaluate.run import Progress, entry_record, finish_run, run_dir, start_run, write_recipe
from trainer.evaluate.scoring import (
    MultiLabelScores,
    VideoScores,
    clip_probabilities,
    gather_clip_rows,
    multi_label_scores,
    predictions_csv,
    score_extra,
    score_fields,
    score_record,
    video_scores,
)
from trainer.evaluate.splits import (
    Split,
    SplitData,
    check_multi_label_splits,
    loader_runtime,
    open_split,
    video_names,
)
from trainer.evaluate.train import make_optimizer, optim_config, train_epoch, wrap_ddp
from trainer.log import RunLogger
from trainer.models import Classifier
from trainer.optim import LrScheduler, effective_schedule
from xdctools.atomic import write_bytes_atomic
from xdctools.errors import ConfigError, DataError
from xdctools.eval_recipe import EvalRecipe, eval_digest

RESULT_FILE = "result.json"
PREDICTIONS_FILE = "predictions.csv"
SWEEP_FILE = "sweep.json"
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


# --- the run: every lr of the sweep on every split, then the table -----------------------------------


@dataclass
class _Context:
    """What every (lr, split) of a run shares."""

    recipe: EvalRecipe
    dist: distributed.Dist
    classes: list[str]
    source: EncoderSource
    progress: Progress
    multi_label: bool = False


def run_finetune(recipe: EvalRecipe, progress: Progress | None = None) -> dict[str, Any]:
    """Finetune (mode full) or train fc-only (mode fc) for every lr and split; merge the results table.

    Returns the sweep summary (see `summarise_sweep`); rank 0 also writes sweep.json, recipe.yaml
    and the merged results table under `run.out`.
    """
    if recipe.mode not in ("full", "fc"):
        raise ConfigError(
            f"mode {recipe.mode!r}: run_finetune trains (full or fc); use trainer.evaluate.svm for svm"
        )
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


# --- one (lr, split): open, train, test, record ------------------------------------------------------


@dataclass(frozen=True)
class _Pair:
    """One (lr, split) of a run: its folder and the digest of what it computes."""

    split: Split
    lr: float
    folder: Path
    digest: str

    @property
    def label(self) -> str:
        """How progress lines name it: "split1 lr 0.01"."""
        return f"{self.split.name} lr {self.lr:g}"


@dataclass
class _Training:
    """A pair's classifier in training: its optimizer and schedule, the module the step calls (DDP under
    torchrun), the metrics logger, and the epochs done before (a resumed pair)."""

    model: Classifier
    optimizer: torch.optim.SGD
    scheduler: LrScheduler
    step: nn.Module
    logger: RunLogger
    start_epoch: int


def finetune_split(ctx: _Context, split: Split, lr: float) -> SplitResult:
    """Train a fresh head (and the encoder with mode full) on the split's train sets, test, record.

    Skips a pair whose result.json exists (same digest) and resumes from its last epoch checkpoint.
    """
    pair = pair_of(ctx, split, lr)  # its folder, and the digest of what it computes
    done = _finished(pair.folder, pair.digest)
    if done is not None:  # its result.json, of the same digest
        score = f"mAP {done.map:.3f}" if done.map is not None else f"{100 * done.score:.1f}%"
        ctx.progress(f"{pair.label}: done before ({score}), skipped")
        return done
    started = time.time()
    # the split's sets, their labels checked; the classifier, resumed from its last epoch if any
    data = open_split(ctx.recipe, split, len(ctx.classes), multi_label=ctx.multi_label, warn=ctx.dist.is_main)
    training = start_training(ctx, pair)
    try:
        # the epochs left, then every clip of every test video
        train_loss = train_epochs(ctx, pair, data, training)
        scores = score_test(ctx, split, data, training.model)
        result = split_result(ctx, pair, scores, train_loss, started)
        training.logger.log(
            "test", training.scheduler.steps, split=split.name, **score_record(scores), videos=result.videos
        )
    finally:
        training.logger.close()
    if ctx.dist.is_main:  # predictions.csv, then result.json: the pair is done
        write_split(ctx, pair, data, scores, result)
    distributed.barrier()
    ctx.progress(f"{pair.label}: {tested_text(result)}")
    return result


def pair_of(ctx: _Context, split: Split, lr: float) -> _Pair:
    """The pair's folder, and the digest of what it computes: the recipe, lr, sets and checkpoint."""
    folder = run_dir(ctx.recipe) / lr_dirname(lr) / split.name
    what = {
        "lr": lr,
        "split": split.name,
        "train": split.train,
        "test": split.test,
        "checkpoint": ctx.source.path,
        "checkpoint_bytes": ctx.source.bytes,
    }
    return _Pair(split, lr, folder, eval_digest(ctx.recipe, what))


def lr_dirname(lr: float) -> str:
    return f"lr{lr:g}"


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


def start_training(ctx: _Context, pair: _Pair) -> _Training:
    """The encoder from the checkpoint (or random) and a fresh linear head, SGD on what may learn, resumed
    from the pair's last finished epoch if any; a fresh pair's metrics open with its schedule."""
    recipe, dist = ctx.recipe, ctx.dist
    seed_all(recipe.seed)
    encoder, _ = build_encoder(recipe)
    model = make_classifier(encoder, len(ctx.classes), recipe.mode, recipe.model.head_norm).to(dist.device)
    optimizer, scheduler = make_optimizer(model, recipe, pair.lr, dist.world_size)
    start_epoch, logger_state = resume(pair, model, optimizer, scheduler, ctx.progress)
    step = wrap_ddp(model, dist)
    logger = RunLogger(pair.folder, enabled=dist.is_main, resume=logger_state, tensorboard=False)
    if start_epoch == 0:  # a resumed pair keeps the record in the metrics lines it restores
        schedule = effective_schedule(optim_config(recipe, pair.lr), dist.world_size)
        logger.log("schedule", 0, base_lr=float(pair.lr), **schedule.to_dict())
    return _Training(model, optimizer, scheduler, step, logger, start_epoch)


def resume(
    pair: _Pair, model: Classifier, optimizer: torch.optim.SGD, scheduler: LrScheduler, progress: Progress
) -> tuple[int, dict[str, Any] | None]:
    """(epochs done, the logger's state) from the pair's last epoch checkpoint, loaded into the model,
    optimizer, schedule and RNGs; (0, None) when it has none."""
    last = latest_checkpoint(pair.folder)
    if last is None:
        return 0, None
    state = load_checkpoint(last, digest=pair.digest)
    model.head.load_state_dict(state["head"])
    if "encoder" in state:
        model.encoder.load_state_dict(state["encoder"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    start_epoch = int(state["epoch"])
    progress(f"{pair.label}: resuming after epoch {start_epoch}")
    return start_epoch, state["logger"]


def train_epochs(ctx: _Context, pair: _Pair, data: SplitData, t: _Training) -> float | None:
    """The epochs left, each on a loader seeded by its number, logged and checkpointed; the last epoch's
    mean loss (None when every epoch was done before). DivergedError on a non-finite loss."""
    recipe = ctx.recipe
    o = recipe.optim
    train_loss = None
    for epoch in range(t.start_epoch, o.total_epochs):
        loader = train_loader(
            data.train,
            batch_size=o.batch_size,
            epoch_size=o.epoch_size,
            clip=data.clip,
            run=loader_runtime(recipe, ctx.dist, seed=recipe.seed + 1009 * epoch),
            spec_augment=recipe.data.spec_augment and recipe.data.modality == "audio",
            flip=recipe.data.flip,
        )
        train_loss, train_acc, seconds = train_epoch(
            t.model,
            loader,
            t.optimizer,
            t.scheduler,
            mode=recipe.mode,
            modality=recipe.data.modality,
            precision=recipe.model.precision,
            step=t.step,
            targets=data.targets,
        )
        del loader
        if not math.isfinite(train_loss):  # checked on every rank before this epoch's checkpoint
            raise diverged_error(pair.folder, f"in epoch {epoch + 1} at lr {pair.lr:g}", "Lower the lr")
        distributed.broadcast_buffers_(t.model)  # rank 0's BatchNorm statistics: the test is sharded
        log_epoch(ctx, pair, t, epoch + 1, (train_loss, train_acc, seconds))
        if ctx.dist.is_main:
            save_epoch(pair, t, epoch + 1, encoder=recipe.mode == "full")
        distributed.barrier()
    return train_loss


def log_epoch(
    ctx: _Context, pair: _Pair, t: _Training, epoch: int, done: tuple[float, float | None, float]
) -> None:
    """The epoch's metrics record and progress line; `done` is `train_epoch`'s (loss, accuracy, seconds)."""
    train_loss, train_acc, seconds = done
    accuracy = {} if train_acc is None else {"train_acc": train_acc}  # no single class to hit
    t.logger.log(
        "epoch",
        t.scheduler.steps,
        epoch=epoch,
        lr=t.scheduler.lr,
        train_loss=train_loss,
        **accuracy,
        seconds=seconds,
    )
    shown = "" if train_acc is None else f"acc {100 * train_acc:.1f}% "
    total = ctx.recipe.optim.total_epochs
    ctx.progress(f"{pair.label}: epoch {epoch}/{total} loss {train_loss:.4f} {shown}({seconds:.0f} s)")


def save_epoch(pair: _Pair, t: _Training, epoch: int, *, encoder: bool) -> None:
    """Rank 0's checkpoint after `epoch`: the head (and the `encoder` when it learns), optimizer,
    schedule, RNGs and the logger's state, under the pair's digest."""
    state = {
        "epoch": epoch,
        "head": t.model.head.state_dict(),
        "optimizer": t.optimizer.state_dict(),
        "scheduler": t.scheduler.state_dict(),
        "rng": rng_state(),
        "logger": t.logger.state_dict(),
    }
    if encoder:
        state["encoder"] = t.model.encoder.state_dict()
    save_checkpoint(checkpoint_path(pair.folder, 0, epoch), state, digest=pair.digest)


def score_test(
    ctx: _Context, split: Split, data: SplitData, model: Classifier
) -> VideoScores | MultiLabelScores:
    """Every clip of every test video, softmax (multi-label: sigmoid) averaged per video; DataError when
    the test did not see every video of the set."""
    recipe, root = ctx.recipe, ctx.recipe.data.shards
    set_mode(model, recipe.mode, training=False)
    test = eval_loader(
        data.test,
        batch_size=recipe.test.batch_size,
        num_clips=recipe.test.num_clips,
        clip=data.clip,
        run=loader_runtime(recipe, ctx.dist, seed=recipe.seed),
    )
    rows = clip_probabilities(
        model,
        test,
        modality=recipe.data.modality,
        device=ctx.dist.device,
        precision=recipe.model.precision,
        multi_label=ctx.multi_label,
    )
    del test
    rows = gather_clip_rows(rows, len(ctx.classes))
    source = f"{root} set {split.test}"
    scores: VideoScores | MultiLabelScores
    if data.test_catalog is not None:
        scores = multi_label_scores(
            rows, recipe.test.num_clips, data.test_catalog, len(ctx.classes), source=source
        )
    else:
        scores = video_scores(rows, recipe.test.num_clips, source=source)
    if len(scores.videos) != data.test_videos:
        raise DataError(
            f"{root}: set {split.test} has {data.test_videos} videos, the test saw {len(scores.videos)}"
        )
    return scores


def split_result(
    ctx: _Context,
    pair: _Pair,
    scores: VideoScores | MultiLabelScores,
    train_loss: float | None,
    started: float,
) -> SplitResult:
    """What result.json will hold: the test's score, the sets, the time since `started`."""
    split, num_clips = pair.split, ctx.recipe.test.num_clips
    return SplitResult(
        split=split.name,
        lr=float(pair.lr),
        videos=len(scores.videos),
        epochs=ctx.recipe.optim.total_epochs,
        train_loss=train_loss,
        seconds=round(time.time() - started, 1),
        digest=pair.digest,
        extra={
            "train_sets": list(split.train),
            "test_set": split.test,
            "num_clips": num_clips,
            **score_extra(scores),
        },
        **score_fields(scores),
    )


def write_split(
    ctx: _Context, pair: _Pair, data: SplitData, scores: VideoScores | MultiLabelScores, result: SplitResult
) -> None:
    """Rank 0's files of a finished pair: predictions.csv, then result.json (which marks it done), then
    the epoch checkpoints pruned to `run.keep_checkpoints` (0: all removed)."""
    keep = ctx.recipe.run.keep_checkpoints
    names = video_names(data.test)
    write_bytes_atomic(pair.folder / PREDICTIONS_FILE, predictions_csv(scores, names, ctx.classes))
    write_bytes_atomic(pair.folder / RESULT_FILE, (json.dumps(result.to_json(), indent=1) + "\n").encode())
    prune_checkpoints(pair.folder, keep_last=keep)
    if keep == 0:
        for _, _, path in list_checkpoints(pair.folder):
            path.unlink(missing_ok=True)


def tested_text(result: SplitResult) -> str:
    """The progress line's account of a test: accuracy, or mAP and over how many classes."""
    if result.map is not None:
        classes = result.extra["map_classes"]
        return f"test mAP {result.map:.4f} ({result.videos} videos, mean over {classes} classes)"
    return f"test accuracy {100 * result.score:.2f}% ({result.videos} videos)"
