"""The labels each iteration trains on: k-means of each view on rank 0 (or fixed labels), routed to the heads.

Clustering methods make new labels every iteration (`make_labels`); superv learns the true classes and a
retrain run the last assignment of a finished run, both fixed for the whole run (`fixed_labels`).
`route_labels` and `label_tables` then give every head the view it learns (XDC: the other modality's).
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from typing import TYPE_CHECKING

import numpy as np

from trainer import distributed
from trainer.data import ShardSet
from trainer.extract import Catalog
from trainer.handcrafted import write_handcrafted_store
from trainer.retrain import last_assignment
from trainer.step import HeadKey, LabelTables, balanced_weights
from xdctools.errors import ConfigError
from xdctools.features.store import FeatureStore
from xdctools.recipe import Recipe

if TYPE_CHECKING:
    from trainer.session import Session


def make_labels(s: Session, store: FeatureStore | None, iteration: int, *, final: bool = False) -> dict:
    """view -> (N,) int32 labels on every rank: k-means on rank 0, broadcast; superv: the true labels;
    retrain: the source run's last assignment."""
    recipe = s.recipe
    if recipe.clustering is None:
        return dict(s.fixed_labels)
    from xdctools.cluster.kmeans import KMeansParams, cluster_store_to
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
            params = KMeansParams(
                k=c.k_for(view),
                niter=c.niter,
                seed=recipe.seed + iteration,
                sample_per_centroid=c.sample_per_centroid,
                refine=c.refine,
                spherical=c.spherical,
                pca=pca,
                reseed_empty=c.reseed_empty,
            )
            result = cluster_store_to(  # per-row files written into the run folder as they are made
                s.run_dir / "clusters" / f"{name}-{view}",
                store.path,
                params,
                view=source,
                overwrite=True,
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
