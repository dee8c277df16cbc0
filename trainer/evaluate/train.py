"""Training a classifier on a split's true labels (paper Table 11): its SGD schedule, one epoch, the loss.

SGD, momentum 0.9, batch 32, warmup/step/total 2/2/8 epochs, wd 0.005, γ 0.01, an epoch being
`epoch_size` clips (106K UCF101, 40K HMDB51, 20K ESC-50), in the pretraining terms (per-GPU batch,
lr × GPUs). On an audio-only set (ESC-50) a training clip is one 2-s mel window drawn at random in its
file. The loss is softmax cross-entropy on the clip's class, or, on a multi-label set (AudioSet),
binary cross-entropy on its video's multi-hot row, looked up by the batch's video index in the train
set's catalog as the pretraining loop looks up pseudo-labels (`MultiHot`, `batch_loss`). Under
torchrun each rank trains on its share of the clips and DDP reduces the gradients.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from trainer import distributed
from trainer.evaluate.encoders import set_mode
from trainer.evaluate.splits import MultiHot
from trainer.models import Classifier, autocast
from trainer.optim import LrScheduler, sgd_with_schedule
from xdctools import recipe as train_recipe
from xdctools.errors import ConfigError
from xdctools.eval_recipe import EvalRecipe


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


def wrap_ddp(model: nn.Module, dist: distributed.Dist) -> nn.Module:
    """The module the training step calls: DDP over ranks, the model itself in one process."""
    if not dist.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [dist.device.index] if dist.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


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
