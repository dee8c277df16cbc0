"""SGD, the paper's learning-rate schedule (linear warmup, step decay by gamma) and early stopping.

Scaling with the number of GPUs (the paper's toolchain, Goyal et al.'s linear rule): `batch_size` is
per rank and the recipe's `lr` is the base rate of one GPU; on W ranks the run takes global batches of
batch_size x W at the effective rate peak = lr x W (`lr_scaling: linear`; `none` keeps lr), and an
epoch of `epoch_size` clips is epoch_size // (batch_size x W) steps. `effective_schedule` resolves it.

Schedule convention (the paper's Table 9: "every se epochs, the lr is decayed by multiplying with
γ"; warmup as Goyal et al.), as a function of the epoch position e (a float: steps done / steps per
epoch) at the start of a step:

    e <  we:  lr = peak * (s + (1 - s) * e / we)          linear warmup from s*peak
    e >= we:  lr = peak * gamma ** floor((e - we) / se)    step decay, counted from the END of warmup

with s = lr / peak = 1 / W by default (Goyal et al.: the ramp starts at the one-GPU rate, so one rank
has no ramp), or the recipe's `warmup_start` (0.001 starts "~0", as the small CPU recipes do).

Counting decay steps from the end of warmup is a choice: counted from epoch 0, the paper's Kinetics
row (10/10/30) would decay at epoch 10, the very moment warmup reaches the base lr, so the base lr
would never be used. From the end of warmup: Kinetics decays at 20; AudioSet (10/10/45) at 20, 30,
40; IG65M (1/3/10) at 4 and 7; IG65M* (0/9/30) at 9, 18, 27; Superv AudioSet (10/20/45) at 30.
The warmup starts just above zero (not at zero) so that the first step already moves the weights.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

import torch

from trainer import sampling
from xdctools.errors import ConfigError, DataError
from xdctools.recipe import Optim, Recipe

WARMUP_START = 1e-3  # first warmup lr, as a fraction of the base lr


def build_optimizer(
    params: Iterable[torch.nn.Parameter] | Iterable[dict], cfg: Optim, world_size: int = 1
) -> torch.optim.SGD:
    """SGD with momentum and plain weight decay on every parameter (the paper; no BN/bias exemption).

    The lr it starts with is the schedule's at epoch 0; `LrScheduler` sets it before every step.
    """
    schedule = LrSchedule.from_config(cfg, world_size)
    return torch.optim.SGD(params, lr=schedule(0.0), momentum=cfg.momentum, weight_decay=cfg.weight_decay)


@dataclass(frozen=True)
class EffectiveSchedule:
    """What a recipe's optim section means on `world_size` ranks, in optimizer steps.

    decay_steps: the steps at which the lr is multiplied by gamma (within total_steps); total_steps
    is the budget when early stopping does not end the iteration first.
    """

    world_size: int
    global_batch: int
    lr: float  # the effective (peak) lr
    warmup_start_lr: float
    steps_per_epoch: int
    warmup_steps: int
    decay_steps: list[int]
    total_steps: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def effective_lr(cfg: Optim, world_size: int) -> float:
    """The peak lr on `world_size` ranks: lr x world_size under linear scaling, else lr."""
    if world_size < 1:
        raise ConfigError(f"world size must be at least 1, got {world_size}")
    return cfg.lr * world_size if cfg.lr_scaling == "linear" else cfg.lr


def warmup_fraction(cfg: Optim, world_size: int) -> float:
    """First warmup lr / peak lr: the recipe's warmup_start, else the base rate (Goyal et al.)."""
    if cfg.warmup_start is not None:
        return cfg.warmup_start
    return cfg.lr / effective_lr(cfg, world_size)


def effective_schedule(cfg: Optim, world_size: int = 1) -> EffectiveSchedule:
    """The recipe's schedule on `world_size` ranks (pure); ConfigError if a global batch exceeds an epoch."""
    peak = effective_lr(cfg, world_size)
    spe = steps_per_epoch(cfg.epoch_size, cfg.batch_size, world_size)
    decays = range(cfg.warmup_epochs + cfg.step_epochs, cfg.total_epochs, cfg.step_epochs)
    return EffectiveSchedule(
        world_size=world_size,
        global_batch=cfg.batch_size * world_size,
        lr=peak,
        warmup_start_lr=peak * warmup_fraction(cfg, world_size) if cfg.warmup_epochs else peak,
        steps_per_epoch=spe,
        warmup_steps=cfg.warmup_epochs * spe,
        decay_steps=[epoch * spe for epoch in decays],
        total_steps=cfg.total_epochs * spe,
    )


def effective_block(recipe: Recipe, world_size: int = 1) -> dict[str, Any]:
    """The `effective:` block of `xdctools train --print-config`, the run log and report.md.

    The base optim section's schedule on `world_size` ranks, plus `last_iteration` (the same keys)
    when `clustering.last_iteration` changes the last iteration's optim fields.
    """
    block = effective_schedule(recipe.optim, world_size).to_dict()
    last = recipe.optim_for(recipe.iterations - 1)
    if last is not recipe.optim:
        block["last_iteration"] = effective_schedule(last, world_size).to_dict()
    return block


def sgd_with_schedule(
    params: Iterable[torch.nn.Parameter] | Iterable[dict], cfg: Optim, world_size: int = 1
) -> tuple[torch.optim.SGD, LrScheduler]:
    """The optimizer and its per-step lr driver for `cfg` on `world_size` ranks (pretraining, finetuning)."""
    optimizer = build_optimizer(params, cfg, world_size)
    steps = steps_per_epoch(cfg.epoch_size, cfg.batch_size, world_size)
    return optimizer, LrScheduler(optimizer, LrSchedule.from_config(cfg, world_size), steps)


def steps_per_epoch(epoch_size: int, batch_size: int, world_size: int = 1) -> int:
    """Optimizer steps per epoch on every rank: epoch_size // (batch_size * world_size).

    epoch_size counts clips over all ranks (the paper's "epoch size"), not videos. ConfigError when
    one global batch does not fit in an epoch. The loaders use the same rule (trainer.sampling).
    """
    return sampling.batches_per_epoch(epoch_size, batch_size, world_size)


class LrSchedule:
    """lr as a pure function of the epoch position (float); see the module docstring for the rule."""

    def __init__(
        self,
        base_lr: float,
        *,
        warmup_epochs: float,
        step_epochs: float,
        gamma: float,
        warmup_start: float = WARMUP_START,
    ) -> None:
        if base_lr <= 0 or step_epochs <= 0 or warmup_epochs < 0 or not 0 < gamma <= 1:
            raise ValueError(
                f"bad schedule: base_lr {base_lr}, warmup {warmup_epochs}, step {step_epochs}, gamma {gamma}"
            )
        self.base_lr = base_lr
        self.warmup_epochs = warmup_epochs
        self.step_epochs = step_epochs
        self.gamma = gamma
        self.warmup_start = warmup_start

    @classmethod
    def from_config(cls, cfg: Optim, world_size: int = 1) -> LrSchedule:
        """The schedule of `cfg` on `world_size` ranks: peak lr and warmup start as `effective_schedule`."""
        return cls(
            effective_lr(cfg, world_size),
            warmup_epochs=cfg.warmup_epochs,
            step_epochs=cfg.step_epochs,
            gamma=cfg.gamma,
            warmup_start=warmup_fraction(cfg, world_size),
        )

    def __call__(self, epoch: float) -> float:
        if epoch < self.warmup_epochs:
            frac = max(epoch, 0.0) / self.warmup_epochs
            return self.base_lr * (self.warmup_start + (1.0 - self.warmup_start) * frac)
        decays = math.floor((epoch - self.warmup_epochs) / self.step_epochs + 1e-9)
        return self.base_lr * self.gamma**decays

    def params(self) -> dict[str, float]:
        return {
            "base_lr": self.base_lr,
            "warmup_epochs": float(self.warmup_epochs),
            "step_epochs": float(self.step_epochs),
            "gamma": self.gamma,
            "warmup_start": self.warmup_start,
        }


class LrScheduler:
    """Drives an optimizer's lr per step from an `LrSchedule`; its state saves and restores.

    Use: `sched.step()` after every `optimizer.step()`. The lr of step s is schedule(s / steps_per_epoch),
    set on every param group (times the group's optional "lr_scale").
    """

    def __init__(self, optimizer: torch.optim.Optimizer, schedule: LrSchedule, steps_per_epoch: int) -> None:
        if steps_per_epoch < 1:
            raise ValueError(f"steps_per_epoch must be positive, got {steps_per_epoch}")
        self.optimizer = optimizer
        self.schedule = schedule
        self.steps_per_epoch = steps_per_epoch
        self.steps = 0
        self._apply()

    @property
    def epoch(self) -> float:
        """Epoch position of the next step (steps done / steps per epoch)."""
        return self.steps / self.steps_per_epoch

    @property
    def lr(self) -> float:
        """The lr of the next step (before any per-group lr_scale)."""
        return self.schedule(self.epoch)

    def step(self) -> None:
        self.steps += 1
        self._apply()

    def _apply(self) -> None:
        lr = self.lr
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)

    def state_dict(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "steps_per_epoch": self.steps_per_epoch,
            "schedule": self.schedule.params(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the step count; DataError if the saved schedule differs from this one."""
        mine = {"steps_per_epoch": self.steps_per_epoch, "schedule": self.schedule.params()}
        theirs = {"steps_per_epoch": state.get("steps_per_epoch"), "schedule": state.get("schedule")}
        if mine != theirs:
            raise DataError(f"checkpoint's lr schedule {theirs} differs from this run's {mine}")
        self.steps = int(state["steps"])
        self._apply()


class EarlyStopper:
    """The paper's rule: stop when the validation loss has risen `patience` epochs in a row.

    A rise is a loss strictly above the previous epoch's; an equal or lower loss resets the count.
    A non-finite loss counts as a rise (a diverging run should stop, not compare NaN as "not higher").
    """

    def __init__(self, patience: int = 3) -> None:
        if patience < 1:
            raise ValueError(f"patience must be at least 1, got {patience}")
        self.patience = patience
        self.previous: float | None = None
        self.rises = 0
        self.best: float | None = None
        self.best_epoch: int | None = None
        self.epochs = 0

    def update(self, val_loss: float) -> bool:
        """Record one epoch's validation loss; True when training should stop now."""
        loss = float(val_loss)
        finite = math.isfinite(loss)
        if self.previous is not None:
            rose = not finite or loss > self.previous
            self.rises = self.rises + 1 if rose else 0
        if finite and (self.best is None or loss < self.best):
            self.best, self.best_epoch = loss, self.epochs
        self.previous = loss if finite else math.inf
        self.epochs += 1
        return self.should_stop

    @property
    def should_stop(self) -> bool:
        return self.rises >= self.patience

    def state_dict(self) -> dict[str, Any]:
        return {
            "patience": self.patience,
            "previous": self.previous,
            "rises": self.rises,
            "best": self.best,
            "best_epoch": self.best_epoch,
            "epochs": self.epochs,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.patience = int(state["patience"])
        self.previous = state["previous"]
        self.rises = int(state["rises"])
        self.best = state["best"]
        self.best_epoch = state["best_epoch"]
        self.epochs = int(state["epochs"])
