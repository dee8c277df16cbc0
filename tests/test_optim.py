"""The lr schedule against hand-computed values, the scheduler state, plain weight decay, early stopping."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from trainer.optim import (
    WARMUP_START,
    EarlyStopper,
    LrSchedule,
    LrScheduler,
    build_optimizer,
    effective_schedule,
    steps_per_epoch,
)
from xdctools.errors import ConfigError, DataError
from xdctools.recipe import Optim


def optim_cfg(**changes) -> Optim:
    base = {"epoch_size": 64, "batch_size": 8, "lr": 0.01, "warmup_epochs": 10, "step_epochs": 10}
    base.update(total_epochs=30, weight_decay=1e-4)
    return Optim.model_validate({**base, **changes})


def kinetics(world_size: int = 8) -> LrSchedule:
    return LrSchedule.from_config(optim_cfg(), world_size)  # Table 10: 0.01, 10/10/30, gamma 0.01


@pytest.mark.parametrize(
    ("epoch", "lr"),
    [
        (0.0, 0.01),  # Goyal et al.'s warmup starts at the one-GPU rate ...
        (2.5, 0.01 + 0.07 * 0.25),
        (5.0, 0.01 + 0.07 * 0.5),
        (9.9, 0.01 + 0.07 * 0.99),
        (10.0, 0.08),  # ... and ends at 8 x 0.01 on 8 GPUs
        (15.0, 0.08),
        (19.999, 0.08),
        (20.0, 8e-4),  # one step of se=10 epochs after warmup ends: x gamma
        (29.999, 8e-4),
        (30.0, 8e-6),  # past the last epoch (never trained) the rule still holds
    ],
)
def test_kinetics_schedule_on_8_gpus_by_hand(epoch: float, lr: float) -> None:
    assert kinetics()(epoch) == pytest.approx(lr, rel=1e-12)


def test_one_gpu_has_no_ramp_unless_warmup_start_is_given() -> None:
    assert [kinetics(1)(e) for e in (0.0, 5.0, 10.0, 20.0)] == pytest.approx([0.01, 0.01, 0.01, 1e-4])
    near_zero = LrSchedule.from_config(optim_cfg(warmup_start=WARMUP_START), 1)
    assert [near_zero(e) for e in (0.0, 5.0, 10.0)] == pytest.approx(
        [0.01 * WARMUP_START, 0.01 * (WARMUP_START + (1 - WARMUP_START) * 0.5), 0.01], rel=1e-12
    )
    on_4 = LrSchedule.from_config(optim_cfg(warmup_start=0.5), 4)  # a fraction of the effective lr
    assert [on_4(0.0), on_4(10.0)] == pytest.approx([0.02, 0.04], rel=1e-12)
    unscaled = LrSchedule.from_config(optim_cfg(lr_scaling="none"), 8)
    assert [unscaled(0.0), unscaled(10.0), unscaled(20.0)] == pytest.approx([0.01, 0.01, 1e-4], rel=1e-12)


def test_effective_schedule_of_the_kinetics_recipe_on_8_gpus() -> None:
    """The paper's toolchain: per-GPU batch 32, lr 0.01 x 8, steps of step_epoch x es / (bs x gpus)."""
    cfg = optim_cfg(epoch_size=1_000_000, batch_size=32)
    e = effective_schedule(cfg, 8)
    assert (e.world_size, e.global_batch, e.lr, e.warmup_start_lr) == (8, 256, 0.08, 0.01)
    assert (e.steps_per_epoch, e.warmup_steps, e.total_steps) == (3906, 39060, 117180)
    assert e.decay_steps == [78120]  # epoch 20: the end of warmup + one step of 10 epochs; 30 is the end
    one = effective_schedule(cfg, 1)
    assert (one.global_batch, one.lr, one.warmup_start_lr, one.steps_per_epoch) == (32, 0.01, 0.01, 31250)
    audioset = effective_schedule(optim_cfg(epoch_size=2_000_000, batch_size=32, total_epochs=45), 16)
    assert audioset.decay_steps == [e * 3906 for e in (20, 30, 40)] and audioset.lr == pytest.approx(0.16)
    no_warmup = effective_schedule(optim_cfg(warmup_epochs=0, step_epochs=9, total_epochs=30), 2)
    assert no_warmup.warmup_start_lr == no_warmup.lr == 0.02 and no_warmup.decay_steps == [36, 72, 108]
    with pytest.raises(ConfigError, match="world size must be at least 1"):
        effective_schedule(cfg, 0)


def test_other_rows_of_table_10_by_hand() -> None:
    ig65m = LrSchedule(0.01, warmup_epochs=1, step_epochs=3, gamma=0.01)
    assert [ig65m(e) for e in (0.5, 1.0, 3.99, 4.0, 6.99, 7.0, 9.99)] == pytest.approx(
        [0.01 * (WARMUP_START + (1 - WARMUP_START) * 0.5), 0.01, 0.01, 1e-4, 1e-4, 1e-6, 1e-6], rel=1e-12
    )
    star = LrSchedule(0.01, warmup_epochs=0, step_epochs=9, gamma=0.01)  # IG65M*: no warmup
    assert [star(e) for e in (0.0, 8.99, 9.0, 18.0, 27.0)] == pytest.approx([0.01, 0.01, 1e-4, 1e-6, 1e-8])
    superv = LrSchedule(0.04, warmup_epochs=10, step_epochs=20, gamma=0.01)  # Superv AudioSet
    assert [superv(e) for e in (10.0, 29.99, 30.0, 44.9)] == pytest.approx([0.04, 0.04, 4e-4, 4e-4])
    with pytest.raises(ValueError, match="bad schedule"):
        LrSchedule(0.01, warmup_epochs=1, step_epochs=0, gamma=0.01)


def test_steps_per_epoch_counts_clips() -> None:
    assert steps_per_epoch(1_000_000, 32) == 31_250
    assert steps_per_epoch(1_000_000, 32, world_size=8) == 3_906
    assert steps_per_epoch(100, 32) == 3  # the remainder is dropped, the same on every rank
    with pytest.raises(ConfigError, match="smaller than one global batch"):
        steps_per_epoch(100, 32, world_size=4)


def test_scheduler_sets_each_steps_lr_on_every_group() -> None:
    model = nn.Linear(3, 2)
    cfg = optim_cfg(warmup_epochs=1, step_epochs=1, total_epochs=3, warmup_start=WARMUP_START)
    groups = [{"params": [model.weight]}, {"params": [model.bias], "lr_scale": 0.5}]
    opt = build_optimizer(groups, cfg)
    sched = LrScheduler(opt, LrSchedule.from_config(cfg), steps_per_epoch=4)
    seen = []
    for _ in range(10):
        seen.append((opt.param_groups[0]["lr"], opt.param_groups[1]["lr"]))
        opt.step()
        sched.step()
    ramp = [0.01 * (WARMUP_START + (1 - WARMUP_START) * s / 4) for s in range(4)]
    expected = [*ramp, *[0.01] * 4, 1e-4, 1e-4]  # steps 0-3 warm up, 4-7 at base, 8+ decayed
    assert [a for a, _ in seen] == pytest.approx(expected, rel=1e-12)
    assert [b for _, b in seen] == pytest.approx([x * 0.5 for x in expected], rel=1e-12)
    assert sched.epoch == 2.5


def test_scheduler_state_restores_mid_run() -> None:
    cfg = optim_cfg(warmup_epochs=2, step_epochs=2, total_epochs=6)
    schedule = LrSchedule.from_config(cfg)
    straight = LrScheduler(build_optimizer(nn.Linear(2, 2).parameters(), cfg), schedule, 5)
    for _ in range(7):
        straight.step()
    saved = straight.state_dict()
    later = [straight.lr for _ in range(15) if straight.step() is None]

    opt = build_optimizer(nn.Linear(2, 2).parameters(), cfg)
    resumed = LrScheduler(opt, schedule, 5)
    resumed.load_state_dict(saved)
    assert opt.param_groups[0]["lr"] == straight.schedule(7 / 5)
    assert [resumed.lr for _ in range(15) if resumed.step() is None] == later
    with pytest.raises(DataError, match="lr schedule"):
        LrScheduler(opt, schedule, 6).load_state_dict(saved)
    with pytest.raises(DataError, match="lr schedule"):
        LrScheduler(opt, LrSchedule(0.02, warmup_epochs=2, step_epochs=2, gamma=0.01), 5).load_state_dict(
            saved
        )


def test_sgd_has_momentum_and_plain_weight_decay() -> None:
    """Weight decay applies to every parameter, BatchNorm and biases included (the paper's plain SGD)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 3))
    cfg = optim_cfg(lr=0.1, weight_decay=0.01, warmup_epochs=0)
    opt = build_optimizer(model.parameters(), cfg)
    (group,) = opt.param_groups
    assert (group["momentum"], group["weight_decay"], group["lr"], group["nesterov"]) == (
        0.9,
        0.01,
        0.1,
        False,
    )
    before = [p.detach().clone() for p in model.parameters()]
    model(torch.randn(8, 4)).pow(2).mean().backward()
    opt.step()
    # first SGD step: the momentum buffer is grad + wd * p, so p' = p - lr * (grad + wd * p) for all
    for old, p in zip(before, model.parameters(), strict=True):
        assert torch.allclose(p.detach(), old - 0.1 * (p.grad + 0.01 * old), atol=1e-7)
    assert len(before) == 6  # two weights, two biases, BN weight and bias: none exempt


def test_training_with_the_schedule_lowers_the_loss() -> None:
    torch.manual_seed(0)
    x = torch.randn(256, 10)
    y = (x[:, :3].sum(1) > 0).long()
    model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 2))
    cfg = optim_cfg(lr=0.1, warmup_epochs=1, step_epochs=3, total_epochs=4, epoch_size=256, batch_size=32)
    opt = build_optimizer(model.parameters(), cfg)
    sched = LrScheduler(opt, LrSchedule.from_config(cfg), steps_per_epoch(cfg.epoch_size, cfg.batch_size))
    first = nn.functional.cross_entropy(model(x), y).item()
    for _ in range(cfg.total_epochs * sched.steps_per_epoch):
        idx = torch.randint(0, 256, (32,))
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
        sched.step()
    assert nn.functional.cross_entropy(model(x), y).item() < 0.5 * first
    assert sched.epoch == cfg.total_epochs


# --- early stopping ---------------------------------------------------------------------------


def feed(stopper: EarlyStopper, losses: list[float]) -> list[bool]:
    return [stopper.update(v) for v in losses]


def test_early_stop_after_three_rises_in_a_row() -> None:
    assert feed(EarlyStopper(3), [5.0, 4.0, 3.0, 3.1, 3.2, 3.3]) == [False] * 5 + [True]
    # a fall or a flat epoch resets the count
    assert not any(feed(EarlyStopper(3), [3.0, 3.1, 3.2, 3.0, 3.1, 3.2, 3.2, 3.3, 3.4]))
    assert feed(EarlyStopper(1), [2.0, 1.0, 1.5]) == [False, False, True]


def test_early_stop_tracks_best_and_counts_nan_as_rise() -> None:
    stopper = EarlyStopper(2)
    assert feed(stopper, [2.0, 1.0, math.nan, math.nan]) == [False, False, False, True]
    assert (stopper.best, stopper.best_epoch, stopper.epochs) == (1.0, 1, 4)
    with pytest.raises(ValueError, match="patience"):
        EarlyStopper(0)


def test_early_stop_state_round_trips() -> None:
    losses = [3.0, 2.0, 2.5, 2.6, 2.4, 2.5, 2.6, 2.7]
    straight = EarlyStopper(3)
    expected = feed(straight, losses)
    first = EarlyStopper(3)
    feed(first, losses[:4])
    resumed = EarlyStopper(3)
    resumed.load_state_dict(first.state_dict())
    assert expected[:4] + feed(resumed, losses[4:]) == expected
    assert resumed.state_dict() == straight.state_dict()
    assert expected[-1] is True
