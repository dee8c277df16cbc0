"""An evaluation run's bookkeeping, shared by finetuning and the SVM: its folder, its start, its summary.

A run of a recipe writes under `<run.out>/<dataset>/<method>/<mode>/` (`run_dir`): recipe.yaml, the
files of its protocol, and a summary (sweep.json, svm.json) that is also one cell of the results
table `<run.out>/results.{json,md}` (`trainer.evaluate.results`), merged in by `finish_run`.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from trainer import distributed
from trainer.evaluate import results
from trainer.evaluate.encoders import EncoderSource
from trainer.evaluate.splits import Split, is_multi_label, read_dataset, resolve_splits, split_name
from xdctools.atomic import write_bytes_atomic
from xdctools.errors import DataError
from xdctools.eval_recipe import DATASETS, EvalRecipe, dump_eval_recipe

Progress = Callable[[str], None]


def slug(text: str) -> str:
    """A folder name for a method label ("XDC IG65M" -> "xdc-ig65m")."""
    return re.sub(r"[^a-z0-9._-]+", "-", text.lower()).strip("-") or "method"


def run_dir(recipe: EvalRecipe) -> Path:
    """`<run.out>/<dataset>/<method>/<mode>` (dataset as `table_name`): what one run writes besides the
    merged table."""
    return Path(recipe.run.out) / recipe.table_name / slug(recipe.model.row) / recipe.mode


class RunStart(NamedTuple):
    """What an evaluation run starts from."""

    dist: distributed.Dist
    classes: list[str]
    splits: list[Split]
    multi_label: bool  # dataset.json `multi_label`: videos carry class lists (AudioSet)


def start_run(recipe: EvalRecipe, *, needs: str) -> RunStart:
    """What an evaluation run starts from: the process group, the dataset's classes, the splits, and
    whether the dataset is multi-label.

    DataError when dataset.json lists fewer than 2 classes (`needs` names what needs the labels).
    """
    dist = distributed.init(recipe.data.device)
    doc = read_dataset(recipe.data.shards)
    classes = list(doc.get("classes") or [])
    if len(classes) < 2:
        raise DataError(
            f"{recipe.data.shards}/dataset.json: lists {len(classes)} classes; {needs} needs labels"
        )
    splits = resolve_splits(recipe, doc, f"{recipe.data.shards}/dataset.json")
    return RunStart(dist, classes, splits, is_multi_label(doc))


def write_recipe(recipe: EvalRecipe, dist: distributed.Dist) -> None:
    """Rank 0 writes the resolved recipe as `recipe.yaml` in the run folder."""
    if dist.is_main:
        write_bytes_atomic(run_dir(recipe) / "recipe.yaml", dump_eval_recipe(recipe).encode())


def finish_run(
    recipe: EvalRecipe, dist: distributed.Dist, name: str, summary: dict[str, Any]
) -> dict[str, Any]:
    """Rank 0 writes `summary` as `name` in the run folder and merges it into the results table (the
    files written go to summary["table"]); every rank waits for it. Returns `summary`."""
    if dist.is_main:
        write_bytes_atomic(run_dir(recipe) / name, (json.dumps(summary, indent=1) + "\n").encode())
        summary["table"] = [str(p) for p in results.merge_entry(recipe.run.out, summary)]
    distributed.barrier()
    return summary


def entry_record(
    recipe: EvalRecipe,
    source: EncoderSource,
    score: float,
    splits: Mapping[str, float],
    *,
    metric: str = "accuracy",
    **details: Any,
) -> dict[str, Any]:
    """One row cell of the results table, with what produced it (see `trainer.evaluate.results`); `score`
    (the mean over `splits`) is filed under `metric`: "accuracy", or "map" for a multi-label set."""
    info = DATASETS.get(recipe.dataset)
    return {
        "method": recipe.model.row,
        "pretraining": recipe.model.pretraining or ("None" if source.kind == "scratch" else "-"),
        "dataset": recipe.table_name,
        "title": recipe.title,
        "column": recipe.column,
        metric: float(score),
        "std": float(np.std(list(splits.values()))) if len(splits) > 1 else 0.0,
        "splits": dict(splits),
        "all_splits": info is None or set(splits) >= {split_name(recipe, s) for s in info.splits},
        "checkpoint": source.path,
        "checkpoint_kind": source.kind,
        "modality": recipe.data.modality,
        "recipe": recipe.name,
        "run": str(run_dir(recipe)),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        **details,
    }
