"""One training step: both encoders, their heads, cross-entropy against the labels each head learns.

The labels of a batch come from its `index` column (the source video) through `LabelTables`, one row
per video, aligned with the feature store (`trainer.extract.Catalog.videos`). Held-out videos are in
every training batch (the loader streams all shards) but masked out of the loss; the same forward's
logits on them give the validation loss, so measuring it costs nothing. They still take part in
BatchNorm's batch statistics (their pixels, never their labels).

Per-step statistics stay on the device as one (heads, 5) tensor of sums, so a step never waits for the
device; the loop reads them when it logs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from trainer import distributed
from trainer.models import MultiHead, autocast
from xdctools.errors import ConfigError, DataError

HeadKey = tuple[str, str]  # (encoder, head), e.g. ("video", "other")
STAT_FIELDS = ("train_sum", "train_n", "val_sum", "val_n", "val_correct")


class Learner(nn.Module):
    """Both encoders and their heads as one module, so DDP reduces all gradients in one pass.

    forward({"video": (B,3,L,H,W), "audio": (B,1,40,100)}) -> {encoder: {head: (B, k) logits}}.
    """

    def __init__(self, encoders: Mapping[str, nn.Module], heads: Mapping[str, MultiHead]) -> None:
        super().__init__()
        if set(encoders) != set(heads):
            raise ConfigError(f"Learner: encoders {sorted(encoders)} and heads {sorted(heads)} differ")
        self.encoders = nn.ModuleDict(dict(encoders))
        self.heads = nn.ModuleDict(dict(heads))

    def forward(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
        return {m: self.heads[m](self.encoders[m].forward_features(inputs[m])) for m in self.encoders}

    @property
    def head_keys(self) -> list[HeadKey]:
        return [(m, h) for m in self.heads for h in self.heads[m].heads]


@dataclass(frozen=True)
class LabelTables:
    """What each head learns, per video row: labels (-1: none), loss weights, and the held-out mask.

    videos: (N,) int64 ascending video indices; labels[(enc, head)]: (N,) int64; weights[(enc, head)]:
    (N,) float32 or absent (uniform); held_out: (N,) bool. A multi-label head (Superv on AudioSet) has
    `multi_hot[(enc, head)]`: store rows -> (n, classes) float32 targets, and its labels only say which
    rows have any class (0) or none (-1).
    """

    videos: np.ndarray
    labels: Mapping[HeadKey, np.ndarray]
    held_out: np.ndarray
    weights: Mapping[HeadKey, np.ndarray] | None = None
    multi_hot: Mapping[HeadKey, Callable[[np.ndarray], np.ndarray]] | None = None

    def rows(self, index: torch.Tensor) -> np.ndarray:
        idx = index.numpy() if isinstance(index, torch.Tensor) else np.asarray(index)
        rows = np.minimum(np.searchsorted(self.videos, idx), len(self.videos) - 1)
        if not np.array_equal(self.videos[rows], idx):
            raise DataError(
                f"batch video indices {idx[self.videos[rows] != idx][:5].tolist()} have no labels"
            )
        return rows

    def batch(self, index: torch.Tensor, device: torch.device) -> dict[HeadKey, dict[str, torch.Tensor]]:
        """Per head: labels (B,) int64, train (B,) float mask (times the loss weight), val (B,) float mask."""
        rows = self.rows(index)
        held = torch.from_numpy(self.held_out[rows])
        out = {}
        for key, table in self.labels.items():
            labels = torch.from_numpy(table[rows].astype(np.int64))
            known = labels >= 0
            train = (known & ~held).float()
            if self.weights is not None and key in self.weights:
                train = train * torch.from_numpy(self.weights[key][rows])
            out[key] = {
                "labels": labels.clamp(min=0).to(device, non_blocking=True),
                "train": train.to(device, non_blocking=True),
                "val": (known & held).float().to(device, non_blocking=True),
            }
            if self.multi_hot is not None and key in self.multi_hot:
                targets = torch.from_numpy(self.multi_hot[key](rows))
                out[key]["targets"] = targets.to(device, non_blocking=True)
        return out


def balanced_weights(labels: np.ndarray, held_out: np.ndarray) -> np.ndarray:
    """DeepCluster's uniform sampling over clusters as a loss weight: 1/size of the video's cluster.

    Sizes count training videos (not held out). A batch's loss is the weighted mean
    sum(w * ce) / sum(w), so each cluster weighs the same in expectation whatever its size. (Our loader
    streams shards, so a torch sampler cannot draw videos by cluster; the weight does it instead.)
    """
    labels = np.asarray(labels)
    train = (labels >= 0) & ~held_out
    sizes = np.bincount(labels[train], minlength=int(labels.max()) + 1 if labels.size else 0)
    weights = np.zeros(len(labels), dtype=np.float32)
    ok = labels >= 0
    weights[ok] = 1.0 / np.maximum(sizes[labels[ok]], 1)
    weights *= train.sum() / max(float(weights[train].sum()), 1e-12)  # mean 1 over training videos
    return weights


def head_losses(
    logits: torch.Tensor, target: Mapping[str, torch.Tensor], weight: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss to minimise, stats (5,)): weighted mean CE over training rows; sums over held-out rows.

    `weight` divides the weighted CE sum: by default this batch's training weight; `train_step` passes
    the global one (see there). A batch without training rows gives a zero loss that still reaches
    every parameter (DDP needs it). With multi-hot `targets` (a multi-label head) a row's loss is its
    binary cross-entropy averaged over the classes (sigmoid outputs, as AudioSet's supervised models),
    and "correct" means its top class is one of its true classes.
    """
    if "targets" in target:
        ce = F.binary_cross_entropy_with_logits(logits.float(), target["targets"], reduction="none").mean(1)
    else:
        ce = F.cross_entropy(logits.float(), target["labels"], reduction="none")
    train, val = target["train"], target["val"]
    weight = train.sum() if weight is None else weight
    loss = (ce * train).sum() / weight.clamp(min=1e-12)
    with torch.no_grad():
        seen = (train > 0).float()
        top = logits.argmax(1)
        if "targets" in target:
            correct = target["targets"].gather(1, top[:, None])[:, 0]
        else:
            correct = (top == target["labels"]).float()
        stats = torch.stack(
            [(ce * seen).sum(), seen.sum(), (ce * val).sum(), val.sum(), (correct * val).sum()]
        ).detach()
    return loss, stats


def to_inputs(
    batch: Mapping[str, torch.Tensor], modalities: list[str], device: torch.device, channels_last: bool
) -> dict[str, torch.Tensor]:
    out = {}
    for m in modalities:
        x = batch[m].to(device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last_3d if x.ndim == 5 else torch.channels_last)
        out[m] = x
    return out


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    batch: Mapping[str, torch.Tensor],
    targets: Mapping[HeadKey, Mapping[str, torch.Tensor]],
    *,
    device: torch.device,
    precision: str = "fp32",
    channels_last: bool = False,
) -> torch.Tensor:
    """Forward both encoders, sum the heads' losses, one SGD step; returns the (heads, 5) stats tensor.

    `model` is a Learner or its DDP wrapper; rows of the stats follow `targets`' order. fp16 goes
    through `scaler` (a disabled scaler for fp32/bf16 passes the loss through unchanged).

    Each head's loss is its weighted CE sum over this rank's rows divided by the mean training weight
    per rank (the global sum / world size, one small all-reduce), so that DDP's gradient average
    equals the gradient of the weighted mean over the global batch, however the held-out rows and
    SDC's balancing weights fall on the ranks: W ranks of b clips step as one process on W x b clips
    (with BatchNorm statistics per rank, as the authors' per-GPU BatchNorm).
    """
    modalities = sorted({m for m, _ in targets})
    inputs = to_inputs(batch, modalities, device, channels_last)
    with autocast(device, precision):
        logits = model(inputs)
    weights = torch.stack([targets[key]["train"].sum() for key in targets])
    weights = distributed.global_sum_(weights) / distributed.world_size()
    total = torch.zeros((), device=device)
    rows = []
    for (m, h), weight in zip(targets, weights, strict=True):
        loss, stats = head_losses(logits[m][h], targets[(m, h)], weight)
        total = total + loss
        rows.append(stats)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(total).backward()
    scaler.step(optimizer)
    scaler.update()
    return torch.stack(rows)


class NonFiniteWatch:
    """The first step whose loss statistics were not finite (NaN or inf), tracked on the device so
    that no step waits for the host; `first()`, called where the loop syncs anyway (its log points),
    is the earliest such step over all ranks (one small all-reduce, so every rank stops together)."""

    NONE = 2**62

    def __init__(self, device: torch.device) -> None:
        self.step = torch.full((), self.NONE, dtype=torch.int64, device=device)

    def update(self, stats: torch.Tensor, step: int) -> None:
        """Note `step` if `stats` (a step's (heads, 5) statistics) holds a non-finite value."""
        bad = ~torch.isfinite(stats).all()
        self.step = torch.where(bad & (self.step == self.NONE), step, self.step)

    def first(self) -> int | None:
        value = int(distributed.global_min_(self.step.clone()).item())
        return None if value == self.NONE else value


def make_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler:
    """A GradScaler that is active only for fp16 (bf16 and fp32 need none)."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")


def summarise(stats: np.ndarray, keys: list[HeadKey]) -> dict[str, float | None]:
    """Epoch sums (heads, 5), reduced over ranks -> train/val loss and val accuracy per head and in total.

    Names: train_loss_<enc>_<head>, val_loss_..., val_acc_...; train_loss and val_loss are the sums
    over heads (what the step minimises). None where a head saw no rows.
    """
    out: dict[str, float | None] = {}
    totals = {"train_loss": 0.0, "val_loss": 0.0}
    seen = {"train_loss": False, "val_loss": False}
    for (m, h), row in zip(keys, stats, strict=True):
        train_sum, train_n, val_sum, val_n, val_correct = (float(v) for v in row)
        train = train_sum / train_n if train_n else None
        val = val_sum / val_n if val_n else None
        out[f"train_loss_{m}_{h}"] = train
        out[f"val_loss_{m}_{h}"] = val
        out[f"val_acc_{m}_{h}"] = val_correct / val_n if val_n else None
        for name, value in (("train_loss", train), ("val_loss", val)):
            if value is not None:
                totals[name] += value
                seen[name] = True
    out.update({name: totals[name] if seen[name] else None for name in totals})
    return out
