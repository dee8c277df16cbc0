"""The labels a retrain run learns: a finished run's last clustering assignment (the paper's §6 protocol).

"We re-train the XDC video encoder on the last clustering assignment using 32-frame clips." The last
assignment is the one the finished run's last iteration trained on: its last checkpoint holds it, one
label per video of the shard set, beside the videos it was made for. Nothing here trains.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from trainer.checkpoint import latest_checkpoint, load_checkpoint, unpack_array
from trainer.extract import Catalog
from xdctools.errors import ConfigError, DataError
from xdctools.recipe import Recipe, load_recipe

RUN_RECIPE = "recipe.yaml"  # trainer.log.RECIPE_FILE: the resolved recipe every run folder holds
RUN_RESULT = "result.json"  # trainer.outcome.RESULT_FILE: written when a run finished
RUN_ENCODERS = "encoders.pt"  # trainer.outcome.ENCODERS_FILE: the final encoders


@dataclass(frozen=True)
class Assignment:
    """What a retrain run learns: labels per view aligned with `Catalog.videos`, and each view's k."""

    run: Path
    iteration: int  # the source run's iteration the labels were made for (0-based)
    labels: dict[str, np.ndarray]  # view -> (N,) int32
    classes: dict[str, int]  # view -> k (the source recipe's)
    source: Recipe


def last_assignment(recipe: Recipe, catalog: Catalog) -> Assignment:
    """The `retrain.run` folder's last labels for the views `recipe`'s heads learn; one-line errors."""
    if recipe.retrain is None:
        raise ConfigError("last_assignment: the recipe has no retrain section")
    run = Path(recipe.retrain.run)
    if not (run / RUN_RESULT).is_file():
        raise DataError(f"{run}: not a finished training run (no {RUN_RESULT}); retrain.run needs one")
    source = load_recipe(run / RUN_RECIPE)
    if source.clustering is None:
        raise DataError(f"{run}: method {source.method} made no clustering assignment to re-train on")
    path = latest_checkpoint(run)
    if path is None:
        raise DataError(f"{run}: no checkpoint holds the last assignment (checkpoints/ is empty)")
    saved = load_checkpoint(path)
    videos = unpack_array(saved["videos"])
    if not np.array_equal(videos, catalog.videos):
        raise DataError(
            f"{run}: its labels are for another shard set ({len(videos)} videos) than {recipe.data.shards} "
            f"set {recipe.data.train_set!r} ({catalog.num_videos}); use the shards it trained on"
        )
    labels = {view: unpack_array(t).astype(np.int32) for view, t in saved["labels"].items()}
    missing = sorted(set(recipe.views) - set(labels))
    if missing:
        raise DataError(
            f"{path}: no {', '.join(missing)} labels (it holds {', '.join(sorted(labels))}); "
            f"method {recipe.method} re-trains the {recipe.retrain.encoder} encoder on them"
        )
    views = recipe.views
    return Assignment(
        run,
        int(saved["iteration"]),
        {view: labels[view] for view in views},
        {view: source.clustering.k_for(view) for view in views},
        source,
    )


def final_encoder(run: Path, encoder: str, expected: dict) -> dict[str, torch.Tensor]:
    """The state dict of one final encoder of a finished run (`init: final`), checked against the recipe."""
    path = run / RUN_ENCODERS
    if not path.is_file():
        raise DataError(f"{path}: not found; retrain.init final needs the run's final encoders")
    saved = load_checkpoint(path)
    config = {key: saved.get("config", {}).get(key) for key in expected}
    if config != expected:
        raise ConfigError(
            f"model: {json.dumps(expected)} differs from {path}'s encoders {json.dumps(config)}; "
            "retrain.init final needs the same encoder shape"
        )
    prefix = f"encoders.{encoder}."
    state = {key[len(prefix) :]: value for key, value in saved["model"].items() if key.startswith(prefix)}
    if not state:
        raise DataError(f"{path}: holds no {encoder} encoder")
    return state
