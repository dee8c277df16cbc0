"""What a run holds fixed: process group, shards, catalog, held-out videos, models and run folder.

`open_session` builds a `Session` once per run on every rank: it checks the recipe against the shards
before anything is extracted, builds the same seeded models on every rank, starts the run folder (or
clears it, --no-resume) and restores the newest checkpoint, or finds the run already finished.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from trainer import distributed
from trainer.checkpoint import latest_checkpoint, load_checkpoint, seed_all
from trainer.data import ClipSpec, Runtime, ShardSet, find_shards, warn_if_name_ordered
from trainer.extract import Catalog, read_catalog
from trainer.labels import fixed_labels
from trainer.log import RECIPE_FILE, RunLogger
from trainer.models import MultiHead, prepare_for_speed, r2plus1d_18, resnet18_audio
from trainer.outcome import ENCODERS_FILE, RESULT_FILE, RunResult, finished_result
from trainer.retrain import final_encoder
from trainer.state import State, encoder_config, restore
from trainer.step import Learner
from xdctools.atomic import write_bytes_atomic
from xdctools.errors import ConfigError, DataError
from xdctools.features.store import FeatureStore
from xdctools.recipe import Recipe, dump_recipe, recipe_digest

Progress = Callable[..., None]  # progress(stage, done, total, **info); done/total in clips or rows
OUTPUTS = ("checkpoints", "features", "clusters", "tensorboard", "metrics.jsonl", RESULT_FILE, ENCODERS_FILE)


@dataclass
class Session:
    recipe: Recipe
    dist: distributed.Dist
    run_dir: Path
    shards: ShardSet
    catalog: Catalog
    held_out: np.ndarray  # (N,) bool over catalog.videos
    clip: ClipSpec
    learner: Learner
    model: nn.Module  # the learner, in DDP under several ranks (compile acts on the encoders in place)
    logger: RunLogger
    progress: Progress | None
    state: State = field(default_factory=State)
    # Labels that no clustering makes: superv's true labels, or a retrain run's source assignment
    fixed_labels: dict[str, np.ndarray] = field(default_factory=dict)
    eval_set: tuple[ShardSet, Catalog] | None = None
    eval_stores: dict[str, FeatureStore] = field(default_factory=dict)
    started: float = field(default_factory=time.time)
    done: RunResult | None = None

    @property
    def device(self) -> torch.device:
        return self.dist.device

    @property
    def digest(self) -> str:
        return recipe_digest(self.recipe)

    def runtime(self, seed: int) -> Runtime:
        d = self.recipe.data
        return Runtime(
            device=d.device,
            device_id=self.dist.local_rank,
            num_threads=d.num_threads,
            prefetch_queue_depth=d.prefetch,
            seed=seed,
            rank=self.dist.rank,
            world_size=self.dist.world_size,
        )

    def tick(self, stage: str, done: int, total: int, **info: Any) -> None:
        if self.progress is not None and self.dist.is_main:
            self.progress(stage, done, total, **info)


def open_session(recipe: Recipe, *, resume: bool, progress: Progress | None) -> Session:
    """Join the process group, read the shards' catalog, build the models, resume or start the run folder."""
    dist = distributed.init("cuda" if torch.cuda.is_available() else "cpu")
    run_dir = Path(recipe.run.out)
    shards, catalog = read_train_set(recipe, dist)
    held = held_out_videos(catalog.num_videos, recipe.data.val_fraction, recipe.seed)
    fixed, classes = fixed_labels(recipe, shards, catalog)
    learner = build_learner(recipe, classes)
    if recipe.retrain is not None and recipe.retrain.init == "final":
        enc = recipe.retrain.encoder
        learner.encoders[enc].load_state_dict(
            final_encoder(Path(recipe.retrain.run), enc, encoder_config(recipe))
        )
    learner.to(dist.device)
    eval_set = read_eval_set(recipe)
    start_run_dir(run_dir, recipe, dist, resume=resume)
    done = finished_result(run_dir, recipe) if resume else None
    saved = checkpoint_to_resume(run_dir, recipe, dist, wanted=resume and done is None)
    logger = RunLogger(
        run_dir, enabled=dist.is_main and done is None, resume=saved["logger"] if saved else None
    )
    model = wrap_for_training(learner, recipe, dist)
    s = Session(
        recipe,
        dist,
        run_dir,
        shards,
        catalog,
        held,
        clip_spec(recipe, shards),
        learner,
        model,
        logger,
        progress,
    )
    s.fixed_labels, s.eval_set, s.done = fixed, eval_set, done
    if saved is not None:
        restore(s, saved)
    return s


def read_train_set(recipe: Recipe, dist: distributed.Dist) -> tuple[ShardSet, Catalog]:
    """The training set's shards and catalog, checked against the recipe before anything is built."""
    shards = find_shards(recipe.data.shards, recipe.data.train_set)
    check_clip(recipe, shards)
    if dist.is_main:  # once, not once per rank
        warn_if_name_ordered(shards)
    catalog = read_catalog(shards)
    check_labels(recipe, catalog)
    check_k(recipe, catalog)
    check_probe(recipe, catalog)
    return shards, catalog


def read_eval_set(recipe: Recipe) -> tuple[ShardSet, Catalog] | None:
    """The probe's `run.eval_set`: its shards and catalog, or None when the probe scores the train set."""
    if not (recipe.run.probe and recipe.run.eval_set is not None):
        return None
    eval_shards = find_shards(recipe.data.shards, recipe.run.eval_set)
    return eval_shards, read_catalog(eval_shards)


def check_clip(recipe: Recipe, shards: ShardSet) -> None:
    """Frames are never upscaled: the recipe's short side must not exceed what the shards store."""
    want, stored = recipe.data.short_side, shards.short_side
    if want is not None and stored is not None and want > stored:
        raise ConfigError(
            f"data.short_side: {want} is larger than the {stored} pixels the shards store "
            f"({recipe.data.shards}); set it to {stored} or null"
        )


def check_labels(recipe: Recipe, catalog: Catalog) -> None:
    """Superv trains on the class labels: the set must carry them."""
    if recipe.method == "superv" and not (catalog.has_labels or catalog.multi_label):
        raise DataError(
            f"{recipe.data.shards}: set {recipe.data.train_set!r} carries no class labels; method superv "
            "trains on them (shard a labelled layout, or use a clustering method)"
        )


def check_k(recipe: Recipe, catalog: Catalog) -> None:
    """Fail before extraction when a view's k exceeds the videos its k-means would cluster."""
    if recipe.clustering is None:
        return
    for view in recipe.views:
        k = recipe.clustering.k_for(view)
        if k > catalog.num_videos:
            raise ConfigError(
                f"clustering.k: {k} {view} clusters need at least {k} videos; set {recipe.data.train_set!r} "
                f"of {recipe.data.shards} has {catalog.num_videos}"
            )


def check_probe(recipe: Recipe, catalog: Catalog) -> None:
    """Cross-validation scores accuracy: a multi-label set is probed by mAP on the held-out videos."""
    if recipe.run.probe and recipe.run.probe_folds is not None and catalog.multi_label:
        raise ConfigError(
            f"run.probe_folds: cross-validation scores single-label sets; set {recipe.data.train_set!r} of "
            f"{recipe.data.shards} is multi-label (leave probe_folds null: mAP on the held-out videos)"
        )


def held_out_videos(n: int, fraction: float, seed: int) -> np.ndarray:
    """(n,) bool: a seeded `fraction` of the videos (at least one when > 0, never all) held out."""
    mask = np.zeros(n, dtype=bool)
    if fraction <= 0 or n < 2:
        return mask
    count = min(n - 1, max(1, round(fraction * n)))
    mask[np.random.default_rng([seed, 0x7A1]).permutation(n)[:count]] = True
    return mask


def build_learner(recipe: Recipe, classes: Mapping[str, int]) -> Learner:
    """The encoders the heads need (seeded: every rank builds the same weights), one head per label source.

    `classes`: the number of classes of each label view the heads learn (k of a clustering view).
    """
    seed_all(recipe.seed)
    encoders = build_encoders(recipe, [name for name in ("video", "audio") if name in recipe.heads])
    heads = {
        enc: MultiHead(
            encoders[enc].feature_dim, {head: classes[view] for head, view in recipe.heads[enc].items()}
        )
        for enc in encoders
    }
    return Learner(encoders, heads)


def build_encoders(recipe: Recipe, names: Sequence[str] = ("video", "audio")) -> dict[str, nn.Module]:
    """The recipe's encoders of `names`, from torch's global generator, or from `model.init_seed` when set
    (the generator is then left as it was, for whatever `seed` decides next)."""
    m = recipe.model
    zero = m.zero_init_residual
    builders = {
        "video": lambda: r2plus1d_18(width=m.width, layout=m.video_layout, zero_init_residual=zero),
        "audio": lambda: resnet18_audio(width=m.width, zero_init_residual=zero),
    }
    with torch.random.fork_rng(devices=[], enabled=m.init_seed is not None):
        if m.init_seed is not None:
            torch.manual_seed(m.init_seed)
        return {name: builders[name]() for name in names}


def wrap_for_training(learner: Learner, recipe: Recipe, dist: distributed.Dist) -> nn.Module:
    """The recipe's speed options on the encoders, then DDP across ranks: what the training forward runs.

    channels_last and compile act on CPU as on GPU (the recipe's fields decide). Both change the
    encoders in place (`prepare_for_speed`), so the extraction of every iteration, which runs
    `learner.encoders`, gets them too, and checkpoints keep their keys.
    """
    for encoder in learner.encoders.values():
        prepare_for_speed(encoder, channels_last=recipe.model.channels_last, compile=recipe.model.compile)
    model: nn.Module = learner
    if dist.distributed:
        ids = [dist.local_rank] if dist.device.type == "cuda" else None
        model = nn.parallel.DistributedDataParallel(learner, device_ids=ids)
    return model


def clip_spec(recipe: Recipe, shards: ShardSet) -> ClipSpec:
    """The clips training and extraction read; frames resized only where the recipe's short side differs."""
    return ClipSpec(
        length=recipe.data.clip_frames,
        stride=recipe.data.stride,
        crop=recipe.data.crop,
        short_side=None if recipe.data.short_side == shards.short_side else recipe.data.short_side,
    )


def start_run_dir(run_dir: Path, recipe: Recipe, dist: distributed.Dist, *, resume: bool) -> None:
    """The run folder with the resolved recipe in it (rank 0; --no-resume clears it first); all ranks wait."""
    if dist.is_main:
        if not resume:
            clear_outputs(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(run_dir / RECIPE_FILE, dump_recipe(recipe).encode())
    distributed.barrier()


def checkpoint_to_resume(
    run_dir: Path, recipe: Recipe, dist: distributed.Dist, *, wanted: bool
) -> dict[str, Any] | None:
    """The newest checkpoint's state when `wanted` (rank 0 names it to all ranks), or None."""
    path = distributed.broadcast_object(str(latest_checkpoint(run_dir) or "") if dist.is_main else None)
    saved = load_checkpoint(path, digest=recipe_digest(recipe)) if wanted and path else None
    if saved is not None and saved.get("world_size", dist.world_size) != dist.world_size:
        raise DataError(
            f"{path}: written by {saved['world_size']} processes; resume with the same number "
            f"(now {dist.world_size}), or start over with --no-resume"
        )
    return saved


def clear_outputs(run_dir: Path) -> None:
    """--no-resume: remove what an earlier run wrote in this folder (and only that)."""
    for name in (*OUTPUTS, "report.md", "losses.png", "cluster_sizes.png", "nmi.png", "probe.png"):
        path = run_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
