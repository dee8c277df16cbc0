"""What a run's checkpoint holds: the training `State`, packed for `weights_only` loading, saved, restored.

A checkpoint (trainer.checkpoint's file format) of a run holds the iteration, the finished epochs, the
labels per view, the optimizer, lr schedule, early stopper and grad scaler, the RNG states, the logger's
line count and both encoders with their heads: enough for a resumed run to reach the state an
uninterrupted run reaches. Its keys are what old runs resume from: change them only with a migration.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from trainer.checkpoint import (
    checkpoint_path,
    pack_array,
    prune_checkpoints,
    rng_state,
    save_checkpoint,
    set_rng_state,
    unpack_array,
)
from trainer.optim import EarlyStopper, LrScheduler, sgd_with_schedule
from trainer.step import make_scaler
from xdctools.errors import DataError
from xdctools.recipe import Recipe

if TYPE_CHECKING:
    from trainer.session import Session


@dataclass
class State:
    """What a checkpoint restores. `epoch` counts finished epochs of `iteration`; `labels` are per view."""

    iteration: int = 0
    epoch: int = 0
    finished: bool = False
    step: int = 0
    seconds: float = 0.0
    labels: dict[str, np.ndarray] | None = None
    optimizer: torch.optim.Optimizer | None = None
    scheduler: LrScheduler | None = None
    stopper: EarlyStopper | None = None
    scaler: torch.amp.GradScaler | None = None


def new_optimizer(s: Session, state: State) -> None:
    """A fresh SGD, lr schedule, early stopper and grad scaler for `state.iteration`'s optim settings."""
    optim = s.recipe.optim_for(state.iteration)
    state.optimizer, state.scheduler = sgd_with_schedule(s.learner.parameters(), optim, s.dist.world_size)
    state.stopper = EarlyStopper(optim.patience)
    state.scaler = make_scaler(s.device, s.recipe.model.precision)


def encoder_config(recipe: Recipe) -> dict[str, Any]:
    """How to rebuild the encoders of a checkpoint (read by `xdctools extract`)."""
    return {
        "width": recipe.model.width,
        "video_layout": recipe.model.video_layout,
        "bn_eps": 1e-5,
        "audio_maxpool": False,
    }


def save(s: Session, state: State) -> None:
    """Checkpoint after the labels are made (epoch 0), every `checkpoint_every` epochs and when the
    iteration's training finished (rank 0); older checkpoints are pruned."""
    every = s.recipe.run.checkpoint_every
    if not (state.epoch == 0 or state.finished or state.epoch % every == 0):
        return
    if s.dist.is_main:
        s.logger.flush()
        save_checkpoint(
            checkpoint_path(s.run_dir, state.iteration, state.epoch), pack(s, state), digest=s.digest
        )
        prune_checkpoints(s.run_dir, keep_last=2)


def pack(s: Session, state: State) -> dict[str, Any]:
    """The checkpoint's state: only what `torch.load(weights_only=True)` reads back."""
    return {
        "iteration": state.iteration,
        "epoch": state.epoch,
        "finished": state.finished,
        "step": state.step,
        "seconds": state.seconds,
        "world_size": s.dist.world_size,
        "config": encoder_config(s.recipe),
        "model": {k: v.detach().cpu() for k, v in s.learner.state_dict().items()},
        "videos": pack_array(s.catalog.videos),
        "labels": {view: pack_array(labels) for view, labels in (state.labels or {}).items()},
        "optimizer": state.optimizer.state_dict(),
        "scheduler": state.scheduler.state_dict(),
        "stopper": state.stopper.state_dict(),
        "scaler": state.scaler.state_dict(),
        "rng": rng_state(),
        "logger": s.logger.state_dict(),
    }


def restore(s: Session, saved: Mapping[str, Any]) -> None:
    """Put a checkpoint's state back into the session (models in place, optimizer rebuilt then loaded)."""
    videos = unpack_array(saved["videos"])
    if not np.array_equal(videos, s.catalog.videos):
        raise DataError(f"{s.run_dir}: the checkpoint's videos differ from {s.recipe.data.shards}'s")
    s.learner.load_state_dict(saved["model"])
    state = s.state
    state.iteration, state.epoch = int(saved["iteration"]), int(saved["epoch"])
    state.finished, state.step, state.seconds = bool(saved["finished"]), int(saved["step"]), saved["seconds"]
    state.labels = {view: unpack_array(t) for view, t in saved["labels"].items()}
    new_optimizer(s, state)
    state.optimizer.load_state_dict(saved["optimizer"])
    state.scheduler.load_state_dict(saved["scheduler"])
    state.stopper.load_state_dict(saved["stopper"])
    state.scaler.load_state_dict(saved["scaler"])
    set_rng_state(saved["rng"])
