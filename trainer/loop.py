"""The deep-clustering loop (paper §3): per iteration extract -> cluster -> relabel -> reset heads -> train.

`run(recipe)` is the whole method; every rank of a torchrun job calls it. The steps it calls that train
live here; beside it are what a run holds fixed (trainer.session), where labels come from (trainer.labels),
the probe (trainer.probe_run), what a checkpoint holds (trainer.state: iteration, epoch, labels, optimizer,
schedule, early stopping, RNG, metric lines) and the end of a run (trainer.outcome). A run killed anywhere
restarts from its last checkpoint and reaches the state an uninterrupted run reaches: every random choice
is seeded by (seed, iteration, epoch).

Choices the paper leaves open, made here:
- Each iteration trains with a fresh SGD state and its own lr schedule (warmup, step decay) from
  epoch 0, as Table 10 gives one schedule per iteration; the encoders carry over, the heads are reset.
- Held-out videos (data.val_fraction, seeded, by video) stay in the batches but out of the loss; the
  same forward's loss on them is the validation loss that early stopping watches (trainer.step).
- SDC's uniform sampling over clusters is a per-sample loss weight 1/cluster size (trainer.step);
  empty clusters are re-seeded as faiss does (a perturbed copy of a large cluster), while k-means trains
  on its sample and again after the assignment of every video (clustering.reseed_empty).
- On N ranks the loss is normalised over the global batch and rank 0's BatchNorm statistics are copied
  to every rank after each epoch, so N ranks of b clips step as one process on N x b clips
  (trainer.step) and extraction never depends on the rank; the lr scales with N (trainer.optim).
- A retrain run (the paper's 32-frame protocol) has no clustering: it learns the last assignment of
  a finished run (trainer.retrain) with one encoder, from random weights.
- After the last iteration the final encoders' features are extracted and clustered once more (and
  probed), so the report shows what the run ends with, next to iteration 0's random encoders.
"""

from __future__ import annotations

import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trainer import distributed
from trainer.checkpoint import diverged_error
from trainer.data import TrainLoader, train_loader
from trainer.extract import extract_features
from trainer.labels import label_tables, make_labels, route_labels
from trainer.optim import effective_schedule
from trainer.outcome import RunResult, finish
from trainer.probe_run import probe_iteration
from trainer.session import Progress, Session, open_session
from trainer.state import State, new_optimizer, save
from trainer.step import LabelTables, NonFiniteWatch, summarise, train_step
from xdctools.errors import DivergedError
from xdctools.features.store import FeatureStore
from xdctools.recipe import Recipe


def run(recipe: Recipe, *, resume: bool = True, progress: Progress | None = None) -> RunResult:
    """Train `recipe` from scratch or from its newest checkpoint; returns what came out (on every rank)."""
    s = open_session(recipe, resume=resume, progress=progress)
    if s.done is not None:
        return s.done
    state = s.state
    for it in range(state.iteration, recipe.iterations):
        if state.labels is None:
            # Features of every training video from the current encoders (-> Zarr, one row per video)
            store = extract(s, f"it{it:03d}", it) if needs_features(recipe) else None
            # k-means of each view the method needs, on rank 0; labels broadcast (superv: true labels;
            # retrain: the finished run's last assignment)
            state.labels = make_labels(s, store, it)
            # A linear probe of these features on the true labels (iteration 0: random encoders)
            probe_iteration(s, store, it)
            # New classification heads: the cluster ids are a new permutation
            reset_heads(s, it)
            # A fresh optimizer, lr schedule and early stopper for this iteration
            start_iteration(s, state, it)
            # Checkpoint the labels; then the feature stores of earlier iterations are not needed
            save(s, state)
            prune_feature_stores(s, it)
        # Pseudo-labels by method: XDC's video head learns the audio clusters, its audio head the video's
        tables = label_tables(s, route_labels(recipe.heads, state.labels))
        while not state.finished:
            # One epoch of SGD on the pseudo-labels
            summary = train_epoch(s, state, tables)
            # Stop when the held-out val loss rose `patience` epochs running, or the epoch budget is spent
            state.finished = should_stop(s, state, summary)
            save(s, state)
        end_iteration(s, state)
    # The final encoders: features, clusters and probe once more; then the report
    store = extract(s, "final", recipe.iterations) if needs_features(recipe) else None
    make_labels(s, store, recipe.iterations, final=True)
    probe_iteration(s, store, recipe.iterations)
    return finish(s, state)


def needs_features(recipe: Recipe) -> bool:
    """Features are extracted to be clustered, or probed."""
    return recipe.clustering is not None or recipe.run.probe


def extract(s: Session, name: str, iteration: int) -> FeatureStore:
    """The store of the current encoders' features of every training video: run_dir/features/<name>.zarr."""
    encoders = dict(s.learner.encoders)
    optim = s.recipe.optim_for(min(iteration, s.recipe.iterations - 1))
    stores = {}
    sets = [(s.recipe.data.train_set, s.shards, s.catalog)]
    if s.eval_set is not None:
        sets.append((s.recipe.run.eval_set, *s.eval_set))
    for set_name, shards, catalog in sets:
        suffix = "" if set_name == s.recipe.data.train_set else f"-{set_name}"
        stores[set_name] = extract_features(
            encoders,
            shards,
            s.run_dir / "features" / f"{name}{suffix}.zarr",
            batch_size=optim.batch_size,
            clip=s.clip,
            run=s.runtime(seed=s.recipe.seed),
            catalog=catalog,
            device=s.device,
            precision=s.recipe.model.precision,
            channels_last=s.recipe.model.channels_last,
            attrs={"iteration": iteration, "set": set_name, "recipe": s.digest},
            overwrite=True,
            progress=s.tick,
            stage=f"{name} extract {set_name}",
        )
    s.eval_stores = stores  # the probe reads the eval set's store from here
    return stores[s.recipe.data.train_set]


def reset_heads(s: Session, iteration: int) -> None:
    """Every head re-initialised, seeded by (seed, iteration): the same heads on every rank and on resume."""
    generator = torch.Generator().manual_seed(derived_seed(s.recipe.seed, iteration, 1))
    for name in sorted(s.learner.heads):
        s.learner.heads[name].reset_(generator=generator)


def start_iteration(s: Session, state: State, iteration: int) -> None:
    """A fresh optimizer, schedule, early stopper and scaler for this iteration; its schedule logged."""
    state.iteration, state.epoch, state.finished, state.seconds = iteration, 0, False, 0.0
    new_optimizer(s, state)
    schedule = effective_schedule(s.recipe.optim_for(iteration), s.dist.world_size)
    s.logger.log("schedule", state.step, iteration=iteration, **schedule.to_dict())


def prune_feature_stores(s: Session, iteration: int) -> None:
    """Delete the feature stores of earlier iterations (rank 0), unless run.keep_features: the labels made
    from them are in the checkpoint just written."""
    if not s.dist.is_main or s.recipe.run.keep_features:
        return
    for old in (s.run_dir / "features").glob("it*.zarr"):
        if old.name < f"it{iteration:03d}":
            remove_store(old)


def remove_store(path: Path) -> None:
    """Delete a feature store no longer needed; a failure is warned about (the run need not stop for it)."""
    try:
        shutil.rmtree(path)
    except OSError as e:
        warnings.warn(f"{path}: could not delete an old feature store ({e}); delete it by hand", stacklevel=2)


def derived_seed(*parts: int) -> int:
    """A 31-bit seed fixed by its parts (seed, iteration, epoch): a resumed epoch gets the same clips."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0] % (1 << 31))


def train_epoch(s: Session, state: State, tables: LabelTables) -> dict[str, Any]:
    """One epoch of `epoch_size` clips over all ranks, `step` records every `log_every` steps and an `epoch`
    record; returns the epoch's losses over all ranks (`summarise`)."""
    recipe, it = s.recipe, state.iteration
    optim = recipe.optim_for(it)
    loader = epoch_loader(s, state)
    keys = s.learner.head_keys
    sums = torch.zeros(len(keys), 5, dtype=torch.float64, device=s.device)
    window = torch.zeros_like(sums)  # the steps since the last log point, summed on the device
    clips = optim.batch_size * s.dist.world_size
    total, t0, tw, steps = len(loader) * clips, time.perf_counter(), time.perf_counter(), 0
    stage = f"it{it:03d} epoch {state.epoch + 1}/{optim.total_epochs}"
    watch = NonFiniteWatch(s.device)
    s.learner.train()
    for i, batch in enumerate(loader):
        targets = tables.batch(batch["index"], s.device)
        stats = train_step(
            s.model,
            state.optimizer,
            state.scaler,
            batch,
            targets,
            device=s.device,
            precision=recipe.model.precision,
            channels_last=recipe.model.channels_last,
        )
        lr = state.scheduler.lr
        state.scheduler.step()
        state.step += 1
        steps += 1
        window += stats
        watch.update(stats, state.step)
        if state.step % recipe.run.log_every == 0 or i + 1 == len(loader):
            if (bad := watch.first()) is not None:
                raise diverged(s, state, bad)
            w = window.cpu().numpy()
            now = time.perf_counter()
            loss = summarise(w, keys)["train_loss"]
            rate = steps * clips / max(now - tw, 1e-9)
            epoch = state.epoch + (i + 1) / len(loader)
            s.logger.log("step", state.step, iteration=it, epoch=epoch, lr=lr, loss=loss, clips_per_s=rate)
            sums += window
            window.zero_()
            tw, steps = now, 0
            s.tick(stage, (i + 1) * clips, total, loss=loss)
        else:
            s.tick(stage, (i + 1) * clips, total)
    sums += window
    return end_epoch(s, state, sums, lr=lr, started=t0, clips=total)


def epoch_loader(s: Session, state: State) -> TrainLoader:
    """The DALI loader of this epoch's clips, seeded by (seed, iteration, epoch): a resumed epoch reads
    the clips an uninterrupted one reads."""
    optim = s.recipe.optim_for(state.iteration)
    return train_loader(
        s.shards,
        batch_size=optim.batch_size,
        epoch_size=optim.epoch_size,
        clip=s.clip,
        run=s.runtime(seed=derived_seed(s.recipe.seed, state.iteration, state.epoch, 2)),
        spec_augment=s.recipe.data.spec_augment,
        flip=s.recipe.data.flip,
    )


def end_epoch(
    s: Session, state: State, sums: torch.Tensor, *, lr: float, started: float, clips: int
) -> dict[str, Any]:
    """Rank 0's BatchNorm statistics to every rank, the epoch's losses over all ranks, its `epoch` record."""
    distributed.broadcast_buffers_(s.learner)  # one set of BatchNorm statistics for extraction, checkpoints
    summary = summarise(distributed.all_reduce_sum(sums.cpu().numpy()), s.learner.head_keys)
    seconds = time.perf_counter() - started
    state.epoch += 1
    state.seconds += seconds
    s.logger.log(
        "epoch",
        state.step,
        iteration=state.iteration,
        epoch=state.epoch,
        lr=lr,
        seconds=seconds,
        clips=clips,
        **summary,
    )
    return summary


def should_stop(s: Session, state: State, summary: dict[str, Any]) -> bool:
    """Whether this iteration's training ends: early stopping on the held-out val loss (optim.early_stop,
    `patience` epochs of rise), or the epoch budget spent."""
    optim = s.recipe.optim_for(state.iteration)
    stop = False
    if optim.early_stop and summary["val_loss"] is not None:
        stop = state.stopper.update(summary["val_loss"])
    return stop or state.epoch >= optim.total_epochs


def diverged(s: Session, state: State, step: int) -> DivergedError:
    """The error that stops a run whose loss went non-finite at `step`, logged first. The check comes
    before the epoch's checkpoint, so no checkpoint of the diverged weights is written."""
    it, epoch = state.iteration, state.epoch + 1
    s.logger.log("diverged", step, iteration=it, epoch=epoch)
    s.logger.flush()
    where = f"at step {step} (iteration {it}, epoch {epoch})"
    return diverged_error(s.run_dir, where, "Lower optim.lr, or use model.precision: fp32")


def end_iteration(s: Session, state: State) -> None:
    """The `iteration` record; the next iteration starts by making its labels."""
    s.logger.log(
        "iteration",
        state.step,
        iteration=state.iteration,
        epochs=state.epoch,
        stopped_early=bool(state.stopper is not None and state.stopper.should_stop),
        seconds=state.seconds,
    )
    state.iteration += 1
    state.labels = None
