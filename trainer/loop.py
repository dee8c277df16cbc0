"""The deep-clustering loop (paper §3): per iteration extract -> cluster -> relabel -> reset heads -> train.

`run(recipe)` is the whole method; every rank of a torchrun job calls it. The helpers below it each do
one step; what a checkpoint holds is `State` (iteration, epoch, labels, optimizer, schedule, early
stopping, RNG, metric lines), so a run killed anywhere restarts from its last checkpoint and reaches
the state an uninterrupted run reaches: every random choice is seeded by (seed, iteration, epoch).

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

import json
import shutil
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
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
    load_checkpoint,
    pack_array,
    prune_checkpoints,
    rng_state,
    save_checkpoint,
    set_rng_state,
    unpack_array,
)
from trainer.data import ClipSpec, Runtime, ShardSet, find_shards, train_loader, warn_if_name_ordered
from trainer.extract import Catalog, extract_features, read_catalog
from trainer.handcrafted import write_handcrafted_store
from trainer.log import RECIPE_FILE, RunLogger, hardware_info, read_metrics, write_report
from trainer.models import MultiHead, prepare_for_speed, r2plus1d_18, resnet18_audio
from trainer.optim import EarlyStopper, LrScheduler, effective_block, effective_schedule, sgd_with_schedule
from trainer.probe import (
    binomial_se,
    cross_validated_probe,
    linear_probe,
    multilabel_probe,
    usable_folds,
)
from trainer.retrain import final_encoder, last_assignment
from trainer.step import (
    HeadKey,
    LabelTables,
    Learner,
    NonFiniteWatch,
    balanced_weights,
    make_scaler,
    summarise,
    train_step,
)
from xdctools.atomic import write_bytes_atomic
from xdctools.errors import ConfigError, DataError, DivergedError
from xdctools.features.store import FeatureStore
from xdctools.recipe import Recipe, dump_recipe, recipe_digest

Progress = Callable[..., None]  # progress(stage, done, total, **info); done/total in clips or rows
RESULT_FILE = "result.json"
ENCODERS_FILE = "encoders.pt"
OUTPUTS = ("checkpoints", "features", "clusters", "tensorboard", "metrics.jsonl", RESULT_FILE, ENCODERS_FILE)
PROBE_ROWS = 50_000  # at most this many videos fit / score a probe


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
            probe(s, store, it)
            # Reset the classification heads (cluster ids are a new permutation) and the optimizer
            start_iteration(s, state, it)
            save(s, state)
        # Pseudo-labels by method: XDC's video head learns the audio clusters, its audio head the video's
        tables = label_tables(s, route_labels(recipe.heads, state.labels))
        # Train until the held-out val loss rose `patience` epochs running, or the epoch budget is spent
        while not state.finished:
            train_epoch(s, state, tables)
            save(s, state)
        end_iteration(s, state)
    # The final encoders: features, clusters and probe once more; then the report
    store = extract(s, "final", recipe.iterations) if needs_features(recipe) else None
    make_labels(s, store, recipe.iterations, final=True)
    probe(s, store, recipe.iterations)
    return finish(s, state)


# --- the session: everything fixed for a run ----------------------------------------------------


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
    shards = find_shards(recipe.data.shards, recipe.data.train_set)
    check_clip(recipe, shards)
    if dist.is_main:  # once, not once per rank
        warn_if_name_ordered(shards)
    catalog = read_catalog(shards)
    if recipe.method == "superv" and not (catalog.has_labels or catalog.multi_label):
        raise DataError(
            f"{recipe.data.shards}: set {recipe.data.train_set!r} carries no class labels; method superv "
            "trains on them (shard a labelled layout, or use a clustering method)"
        )
    check_k(recipe, catalog)
    if recipe.run.probe and recipe.run.probe_folds is not None and catalog.multi_label:
        raise ConfigError(
            f"run.probe_folds: cross-validation scores single-label sets; set {recipe.data.train_set!r} of "
            f"{recipe.data.shards} is multi-label (leave probe_folds null: mAP on the held-out videos)"
        )
    held = held_out_videos(catalog.num_videos, recipe.data.val_fraction, recipe.seed)
    fixed, classes = fixed_labels(recipe, shards, catalog)
    learner = build_learner(recipe, classes)
    if recipe.retrain is not None and recipe.retrain.init == "final":
        enc = recipe.retrain.encoder
        learner.encoders[enc].load_state_dict(
            final_encoder(Path(recipe.retrain.run), enc, encoder_config(recipe))
        )
    learner.to(dist.device)
    eval_set = None
    if recipe.run.probe and recipe.run.eval_set is not None:
        eval_shards = find_shards(recipe.data.shards, recipe.run.eval_set)
        eval_set = (eval_shards, read_catalog(eval_shards))

    if dist.is_main:
        if not resume:
            clear_outputs(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(run_dir / RECIPE_FILE, dump_recipe(recipe).encode())
    distributed.barrier()
    done = finished_result(run_dir, recipe) if resume else None
    path = distributed.broadcast_object(str(latest_checkpoint(run_dir) or "") if dist.is_main else None)
    saved = load_checkpoint(path, digest=recipe_digest(recipe)) if resume and path and done is None else None
    if saved is not None and saved.get("world_size", dist.world_size) != dist.world_size:
        raise DataError(
            f"{path}: written by {saved['world_size']} processes; resume with the same number "
            f"(now {dist.world_size}), or start over with --no-resume"
        )
    logger = RunLogger(
        run_dir, enabled=dist.is_main and done is None, resume=saved["logger"] if saved else None
    )
    model = wrap_for_training(learner, recipe, dist)
    clip = ClipSpec(
        length=recipe.data.clip_frames,
        stride=recipe.data.stride,
        crop=recipe.data.crop,
        short_side=None if recipe.data.short_side == shards.short_side else recipe.data.short_side,
    )
    s = Session(recipe, dist, run_dir, shards, catalog, held, clip, learner, model, logger, progress)
    s.fixed_labels, s.eval_set, s.done = fixed, eval_set, done
    if saved is not None:
        restore(s, saved)
    return s


def check_clip(recipe: Recipe, shards: ShardSet) -> None:
    """Frames are never upscaled: the recipe's short side must not exceed what the shards store."""
    want, stored = recipe.data.short_side, shards.short_side
    if want is not None and stored is not None and want > stored:
        raise ConfigError(
            f"data.short_side: {want} is larger than the {stored} pixels the shards store "
            f"({recipe.data.shards}); set it to {stored} or null"
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


def held_out_videos(n: int, fraction: float, seed: int) -> np.ndarray:
    """(n,) bool: a seeded `fraction` of the videos (at least one when > 0, never all) held out."""
    mask = np.zeros(n, dtype=bool)
    if fraction <= 0 or n < 2:
        return mask
    count = min(n - 1, max(1, round(fraction * n)))
    mask[np.random.default_rng([seed, 0x7A1]).permutation(n)[:count]] = True
    return mask


def fixed_labels(
    recipe: Recipe, shards: ShardSet, catalog: Catalog
) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """Labels no clustering makes (superv: the true classes; retrain: the source run's last assignment),
    and the classes each label view has: the heads' sizes."""
    if recipe.retrain is not None:
        assignment = last_assignment(recipe, catalog)
        return assignment.labels, assignment.classes
    if recipe.clustering is None:
        return {"true": true_labels(catalog)}, {"true": num_classes(shards, catalog)}
    return {}, {view: recipe.clustering.k_for(view) for view in recipe.views}


def true_labels(catalog: Catalog) -> np.ndarray:
    """(N,) int32 class per video, -1 unknown; a multi-label set: 0 where a video has classes (the
    multi-hot targets come from the catalog), -1 where it has none."""
    if catalog.multi_label:
        return np.where(np.diff(catalog.label_offsets) > 0, 0, -1).astype(np.int32)
    return catalog.labels.astype(np.int32)


def num_classes(shards: ShardSet, catalog: Catalog) -> int:
    """Superv's classes: those dataset.json lists (else, in a folder without one, the largest label + 1)."""
    values = catalog.label_values if catalog.multi_label else catalog.labels
    largest = int(values.max()) + 1 if values.size else 0
    return largest if shards.classes is None else max(len(shards.classes), largest)


def build_learner(recipe: Recipe, classes: Mapping[str, int]) -> Learner:
    """The encoders the heads need (seeded: every rank builds the same weights), one head per label source.

    `classes`: the number of classes of each label view the heads learn (k of a clustering view).
    """
    torch.manual_seed(recipe.seed)
    m = recipe.model
    builders = {
        "video": lambda: r2plus1d_18(width=m.width, layout=m.video_layout),
        "audio": lambda: resnet18_audio(width=m.width),
    }
    encoders = {name: build() for name, build in builders.items() if name in recipe.heads}
    heads = {
        enc: MultiHead(
            encoders[enc].feature_dim, {head: classes[view] for head, view in recipe.heads[enc].items()}
        )
        for enc in encoders
    }
    return Learner(encoders, heads)


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


def clear_outputs(run_dir: Path) -> None:
    """--no-resume: remove what an earlier run wrote in this folder (and only that)."""
    for name in (*OUTPUTS, "report.md", "losses.png", "cluster_sizes.png", "nmi.png", "probe.png"):
        path = run_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


# --- the steps of an iteration ----------------------------------------------------------------------


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


def make_labels(s: Session, store: FeatureStore | None, iteration: int, *, final: bool = False) -> dict:
    """view -> (N,) int32 labels on every rank: k-means on rank 0, broadcast; superv: the true labels;
    retrain: the source run's last assignment."""
    recipe = s.recipe
    if recipe.clustering is None:
        return dict(s.fixed_labels)
    from xdctools.cluster.kmeans import cluster_store_to
    from xdctools.cluster.report import cluster_metrics

    c = recipe.clustering
    handcrafted = c.init != "random" and iteration == 0 and not final
    if handcrafted and s.dist.is_main:  # the audio side from the stored log-mel (trainer/handcrafted.py)
        store = write_handcrafted_store(
            s.run_dir / "features" / "it000-handcrafted.zarr", store, s.shards, s.catalog, {"iteration": 0}
        )
    labels = {}
    for view in recipe.views:
        result = None
        if s.dist.is_main:
            name = "final" if final else f"it{iteration:03d}"
            # the features clustered: handcrafted-only gives every view the mel statistics' clusters
            source = "audio" if handcrafted and c.init == "handcrafted-only" else view
            # PCA-whitening to at most the dimension of the handcrafted features
            pca = c.pca if not handcrafted or c.pca is None else min(c.pca, handcrafted_dim(store, source))
            result = cluster_store_to(  # per-row files written into the run folder as they are made
                s.run_dir / "clusters" / f"{name}-{view}",
                store.path,
                overwrite=True,
                k=c.k_for(view),
                view=source,
                niter=c.niter,
                seed=recipe.seed + iteration,
                sample_per_centroid=c.sample_per_centroid,
                refine=c.refine,
                spherical=c.spherical,
                pca=pca,
                reseed_empty=c.reseed_empty,
                progress=lambda stage, done, total, v=view: s.tick(f"k-means {v} {stage}", done, total),
            )
            stats = result.stats
            scores = cluster_metrics(s.catalog.labels, result.labels) if s.catalog.has_labels else {}
            s.logger.log(
                "cluster",
                s.state.step,
                iteration=iteration,
                view=view,
                k=c.k_for(view),
                sizes=stats["sizes"],
                empty=len(stats["empty_clusters"]),
                splits=stats["splits"],
                imbalance=stats["imbalance"],
                objective=stats["objective"],
                final=final,
                **({"init": c.init} if iteration == 0 and not final else {}),
                **scores,
            )
        # in memory on every rank (4 bytes a row): training reads them all, and the map's file may be replaced
        labels[view] = distributed.broadcast_array(None if result is None else np.array(result.labels))
    return labels


def handcrafted_dim(store: FeatureStore, view: str) -> int:
    """The input dimension of `view` in the handcrafted store (cdc: video and mel statistics side by side)."""
    return sum(store.dims.values()) if view == "cdc" else store.dims[view]


def route_labels(
    heads: Mapping[str, Mapping[str, str]], labels: Mapping[str, np.ndarray]
) -> dict[HeadKey, np.ndarray]:
    """The labels each head learns: `Recipe.heads` names a view per (encoder, head).

    sdc: (video, own) <- video, (audio, own) <- audio; mdc: own and other; cdc: both <- cdc;
    xdc: (video, other) <- audio and (audio, other) <- video; superv: both <- true.
    """
    missing = sorted({view for hs in heads.values() for view in hs.values()} - set(labels))
    if missing:
        raise ConfigError(f"route_labels: no labels for view(s) {', '.join(missing)}")
    return {(enc, head): labels[view] for enc, hs in heads.items() for head, view in hs.items()}


def label_tables(s: Session, routed: Mapping[HeadKey, np.ndarray]) -> LabelTables:
    """Labels per head aligned with the videos, with DeepCluster's balancing weights when asked for."""
    weights = None
    if s.recipe.clustering is not None and s.recipe.clustering.uniform_sampling:
        weights = {key: balanced_weights(labels, s.held_out) for key, labels in routed.items()}
    keys = s.learner.head_keys
    multi_hot = None
    if s.catalog.multi_label and s.recipe.clustering is None and s.recipe.retrain is None:  # superv
        targets = partial(s.catalog.multi_hot, num_classes=num_classes(s.shards, s.catalog))
        multi_hot = dict.fromkeys(keys, targets)
    return LabelTables(s.catalog.videos, {key: routed[key] for key in keys}, s.held_out, weights, multi_hot)


def probe(s: Session, store: FeatureStore | None, iteration: int) -> None:
    """Logistic regression on frozen pooled features vs the true labels (run.probe), on rank 0.

    Scored on the held-out videos, on `run.eval_set`, or by k-fold cross-validation over every labelled
    video (`run.probe_folds`). An accuracy comes with its binomial standard error over the videos scored
    (`se`). A multi-label set (AudioSet) is probed with one-vs-rest logistic regressions, scored by mAP.
    """
    if not s.recipe.run.probe or store is None or not s.dist.is_main:
        return
    eval_name, folds = s.recipe.run.eval_set, s.recipe.run.probe_folds
    train_store, train_catalog = store, s.catalog
    known = true_labels(train_catalog) >= 0
    if eval_name is None and folds is not None:
        train_rows = np.flatnonzero(known)
        test_store, test_catalog, test_rows = store, train_catalog, train_rows
    elif eval_name is None:
        train_rows = np.flatnonzero(~s.held_out & known)
        test_store, test_catalog = store, train_catalog
        test_rows = np.flatnonzero(s.held_out & known)
        split = "held-out"
    else:
        test_store, test_catalog = s.eval_stores[eval_name], s.eval_set[1]
        train_rows = np.flatnonzero(known)
        test_rows = np.flatnonzero(true_labels(test_catalog) >= 0)
        split = eval_name
    rng = np.random.default_rng([s.recipe.seed, iteration, 0x9B])
    train_rows = np.sort(rng.permutation(train_rows)[:PROBE_ROWS])
    test_rows = train_rows if folds is not None else np.sort(rng.permutation(test_rows)[:PROBE_ROWS])
    if folds is not None:  # as many folds as the videos drawn allow
        split = f"{usable_folds(true_labels(train_catalog)[train_rows], folds)}-fold"
    if train_catalog.multi_label:
        classes = num_classes(s.shards, train_catalog)
        train_y, test_y = (
            train_catalog.multi_hot(train_rows, classes),
            test_catalog.multi_hot(test_rows, classes),
        )
        fit, metric = partial(multilabel_probe, device=s.device), "map"
        lacking = None if test_y.any() else "no test video has a class"
    else:
        train_y, test_y = train_catalog.labels[train_rows], test_catalog.labels[test_rows]
        fit, metric = linear_probe, "accuracy"
        lacking = None if len(np.unique(train_y)) >= 2 else "the training videos hold fewer than 2 classes"
    lacking = f"no labelled test video ({split})" if len(test_rows) == 0 else lacking
    if lacking is not None:  # said, not dropped: the report has no probe row for this iteration
        s.logger.log("probe_skipped", s.state.step, iteration=iteration, reason=lacking, split=split)
        warnings.warn(f"probe of iteration {iteration} skipped: {lacking}", stacklevel=2)
        return
    for modality in store.modalities:
        x_train = read_rows(train_store, modality, train_rows)
        if folds is not None:
            correct = cross_validated_probe(x_train, train_y, folds, seed=s.recipe.seed)
            score = float(correct.mean())
        else:
            score = fit(
                x_train, train_y, read_rows(test_store, modality, test_rows), test_y, seed=s.recipe.seed
            )
        record = {"iteration": iteration, "modality": modality, metric: score, "split": split}
        if metric == "accuracy":
            record["se"] = binomial_se(score, len(test_rows))
        s.logger.log("probe", s.state.step, **record, train=len(train_rows), test=len(test_rows))


def read_rows(store: FeatureStore, modality: str, rows: np.ndarray) -> np.ndarray:
    """float32 features of the given (sorted) rows, read chunk by chunk."""
    out = np.empty((len(rows), store.dims[modality]), dtype=np.float32)
    for chunk in np.unique(rows // store.chunk_rows):
        start, stop = store.chunk_range(int(chunk))
        pick = (rows >= start) & (rows < stop)
        out[pick] = store.read(modality, start, stop)[rows[pick] - start]
    return out


def start_iteration(s: Session, state: State, iteration: int) -> None:
    """New heads (seeded), a fresh optimizer, schedule, early stopper and scaler for this iteration."""
    generator = torch.Generator().manual_seed(derived_seed(s.recipe.seed, iteration, 1))
    for name in sorted(s.learner.heads):
        s.learner.heads[name].reset_(generator=generator)
    state.iteration, state.epoch, state.finished, state.seconds = iteration, 0, False, 0.0
    new_optimizer(s, state)
    schedule = effective_schedule(s.recipe.optim_for(iteration), s.dist.world_size)
    s.logger.log("schedule", state.step, iteration=iteration, **schedule.to_dict())


def new_optimizer(s: Session, state: State) -> None:
    optim = s.recipe.optim_for(state.iteration)
    state.optimizer, state.scheduler = sgd_with_schedule(s.learner.parameters(), optim, s.dist.world_size)
    state.stopper = EarlyStopper(optim.patience)
    state.scaler = make_scaler(s.device, s.recipe.model.precision)


def derived_seed(*parts: int) -> int:
    """A 31-bit seed fixed by its parts (seed, iteration, epoch): a resumed epoch gets the same clips."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0] % (1 << 31))


def train_epoch(s: Session, state: State, tables: LabelTables) -> None:
    """One epoch of `epoch_size` clips over all ranks; logs step and epoch records; early stopping."""
    recipe, it = s.recipe, state.iteration
    optim = recipe.optim_for(it)
    loader = train_loader(
        s.shards,
        batch_size=optim.batch_size,
        epoch_size=optim.epoch_size,
        clip=s.clip,
        run=s.runtime(seed=derived_seed(recipe.seed, it, state.epoch, 2)),
        spec_augment=recipe.data.spec_augment,
        flip=recipe.data.flip,
    )
    keys = s.learner.head_keys
    sums = torch.zeros(len(keys), 5, dtype=torch.float64, device=s.device)
    window = torch.zeros_like(sums)
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
            s.logger.log(
                "step",
                state.step,
                iteration=it,
                epoch=state.epoch + (i + 1) / len(loader),
                lr=lr,
                loss=loss,
                clips_per_s=steps * clips / max(now - tw, 1e-9),
            )
            sums += window
            window.zero_()
            tw, steps = now, 0
            s.tick(stage, (i + 1) * clips, total, loss=loss)
        else:
            s.tick(stage, (i + 1) * clips, total)
    sums += window
    distributed.broadcast_buffers_(s.learner)  # one set of BatchNorm statistics for extraction, checkpoints
    summary = summarise(distributed.all_reduce_sum(sums.cpu().numpy()), keys)
    seconds = time.perf_counter() - t0
    state.epoch += 1
    state.seconds += seconds
    s.logger.log(
        "epoch", state.step, iteration=it, epoch=state.epoch, lr=lr, seconds=seconds, clips=total, **summary
    )
    stop = False
    if optim.early_stop and summary["val_loss"] is not None:
        stop = state.stopper.update(summary["val_loss"])
    state.finished = stop or state.epoch >= optim.total_epochs


def diverged(s: Session, state: State, step: int) -> DivergedError:
    """The error that stops a run whose loss went non-finite at `step`, logged first. The check comes
    before the epoch's checkpoint, so no checkpoint of the diverged weights is written."""
    it, epoch = state.iteration, state.epoch + 1
    s.logger.log("diverged", step, iteration=it, epoch=epoch)
    s.logger.flush()
    where = f"at step {step} (iteration {it}, epoch {epoch})"
    return diverged_error(s.run_dir, where, "Lower optim.lr, or use model.precision: fp32")


def end_iteration(s: Session, state: State) -> None:
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


# --- checkpoints ---------------------------------------------------------------------------------------


def save(s: Session, state: State) -> None:
    """Checkpoint after the labels are made (epoch 0) and every `checkpoint_every` epochs (rank 0)."""
    every = s.recipe.run.checkpoint_every
    if not (state.epoch == 0 or state.finished or state.epoch % every == 0):
        return
    if s.dist.is_main:
        s.logger.flush()
        save_checkpoint(
            checkpoint_path(s.run_dir, state.iteration, state.epoch), pack(s, state), digest=s.digest
        )
        prune_checkpoints(s.run_dir, keep_last=2)
        if state.epoch == 0 and not s.recipe.run.keep_features:  # the labels are safe: older stores unneeded
            for old in (s.run_dir / "features").glob("it*.zarr"):
                if old.name < f"it{state.iteration:03d}":
                    remove_store(old)


def remove_store(path: Path) -> None:
    """Delete a feature store no longer needed; a failure is warned about (the run need not stop for it)."""
    try:
        shutil.rmtree(path)
    except OSError as e:
        warnings.warn(f"{path}: could not delete an old feature store ({e}); delete it by hand", stacklevel=2)


def encoder_config(recipe: Recipe) -> dict[str, Any]:
    """How to rebuild the encoders of a checkpoint (read by `xdctools extract`)."""
    return {
        "width": recipe.model.width,
        "video_layout": recipe.model.video_layout,
        "bn_eps": 1e-5,
        "audio_maxpool": False,
    }


def pack(s: Session, state: State) -> dict[str, Any]:
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


# --- the end --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunResult:
    """What a run produced: where, and per iteration NMI / losses / probe accuracy (rank 0's view)."""

    run_dir: Path
    report: Path
    iterations: list[dict[str, Any]]
    seconds: float
    resumed_complete: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "run_dir": str(self.run_dir),
            "report": str(self.report),
            "iterations": self.iterations,
            "seconds": self.seconds,
        }


def finish(s: Session, state: State) -> RunResult:
    """Plots, report.md, encoders.pt and result.json (rank 0); every rank gets the result."""
    result = None
    if s.dist.is_main:
        s.logger.flush()
        s.logger.plot()
        rows = per_iteration(read_metrics(s.run_dir))
        seconds = time.time() - s.started
        final = {
            "final" if r["iteration"] == s.recipe.iterations else f"iteration {r['iteration']}": {
                k: v for k, v in r.items() if k != "iteration"
            }
            for r in rows
        }
        report = write_report(
            s.run_dir,
            s.recipe,
            {
                "status": f"Finished {s.recipe.iterations} iteration(s), {state.step} optimizer steps.",
                "seconds": seconds,
                "data": {
                    "videos": s.catalog.num_videos,
                    "segments": len(s.shards),
                    "held out": int(s.held_out.sum()),
                },
                "hardware": hardware_info(s.dist.world_size),
                "effective": effective_block(s.recipe, s.dist.world_size),
                "final": final,
            },
        )
        save_checkpoint(
            s.run_dir / ENCODERS_FILE,
            {
                "config": encoder_config(s.recipe),
                "model": {k: v.cpu() for k, v in s.learner.state_dict().items()},
            },
            digest=s.digest,
        )
        result = RunResult(s.run_dir, report, rows, seconds)
        doc = {"digest": s.digest, **result.to_json()}
        write_bytes_atomic(s.run_dir / RESULT_FILE, json.dumps(doc, indent=1).encode())
    s.logger.close()
    result = distributed.broadcast_object(result)
    return result


def finished_result(run_dir: Path, recipe: Recipe) -> RunResult | None:
    """The result of a run that already finished with this recipe, or None."""
    path = run_dir / RESULT_FILE
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: unreadable ({e}); delete it to let the run finish again") from None
    if doc.get("digest") != recipe_digest(recipe):
        return None
    return RunResult(Path(doc["run_dir"]), Path(doc["report"]), doc["iterations"], doc["seconds"], True)


def per_iteration(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per iteration (and 'final'): NMI per view, last train/val loss, epochs, probe accuracy (and
    its standard error)."""
    rows: dict[int, dict[str, Any]] = {}
    for r in records:
        it = r.get("iteration")
        if it is None:
            continue
        row = rows.setdefault(int(it), {"iteration": int(it)})
        if r["event"] == "cluster" and r.get("nmi") is not None:
            row[f"nmi_{r['view']}"] = r["nmi"]
        elif r["event"] == "epoch":
            row["epochs"] = r["epoch"]
            row["train_loss"] = r.get("train_loss")
            row["val_loss"] = r.get("val_loss")
        elif r["event"] == "probe":
            metric = "map_" if "map" in r else ""  # mAP on a multi-label set, else accuracy
            row[f"probe_{metric}{r['modality']}"] = r.get("map", r.get("accuracy"))
            if r.get("se") is not None:  # the accuracy's standard error over the videos scored
                row[f"probe_{r['modality']}_se"] = r["se"]
        elif r["event"] == "iteration":
            row["stopped_early"] = r.get("stopped_early")
    return [rows[i] for i in sorted(rows)]
