"""Every recipe in recipes/ runs: pretraining recipes one training step of the loop (then its final
extraction, clustering and probe), evaluation recipes one finetuning step and its test (the DCASE recipe
its linear SVM), on CPU, on the tiny real shards. A GPU recipe cannot carry a field that breaks the run.

Only what must change to fit a CPU and the tiny data is overridden (`pretrain_overrides`,
`eval_overrides` say why each); every other field runs as the recipe has it: bf16 autocast and
channels-last of the GPU recipes, early stopping, `clustering.last_iteration`, `optim.lr_scaling`,
warmup, k per view, PCA-whitening, uniform sampling, the probe, `retrain`, test clips, SVM settings.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from trainer import loop
from trainer.checkpoint import list_checkpoints, load_checkpoint, unpack_array
from trainer.log import read_metrics
from xdctools.eval_recipe import EvalRecipe, load_eval_recipe
from xdctools.recipe import Recipe, load_recipe

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").rglob("*.yaml"))
PRETRAIN = [p for p in RECIPES if "eval" not in p.relative_to(ROOT / "recipes").parts]
EVAL = [p for p in RECIPES if p not in PRETRAIN]
VIDEOS = 9  # in each of the tiny sets
CROP, WIDTH, BATCH = 32, 0.125, 4


def test_every_recipe_is_covered() -> None:
    assert len(PRETRAIN) >= 15 and len(EVAL) >= 7
    recipes = [load_recipe(p) for p in PRETRAIN]
    gpu = [r for r in recipes if r.data.device == "gpu"]
    assert gpu and all(r.model.precision == "bf16" and r.model.channels_last for r in gpu)
    # none pays reliably on a 2-core CPU (docs/train.md, "Speed options"): the CPU recipes keep them off
    cpu = [r.model for r in recipes if r.data.device == "cpu"]
    assert cpu and all(m.precision == "fp32" and not m.channels_last and not m.compile for m in cpu)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Torch on one thread here: on a shared 2-core machine, parallel regions over the probe's tiny
    tensors wait for the busy other core (the multi-label probe took 14 s on 2 threads, 0.7 s on 1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- the tiny data --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def split_shards(tiny_shards: Path) -> Path:
    """The tiny set's 9 videos as sets split1-train (6) and split1-test (3: one per class)."""
    from xdctools.shard.params import ShardParams
    from xdctools.shard.plan import build_plan, shuffle_plan
    from xdctools.shard.run import run_shard

    root = tiny_shards.parent / "split"
    if not (root / "shards" / "dataset.json").is_file():
        rows = ["path,label,set"]
        for f in sorted((tiny_shards.parent / "videos").glob("*/*.mp4")):
            rows.append(f"{f},{f.parent.name},split1-{'test' if f.stem.endswith('_0002') else 'train'}")
        root.mkdir(exist_ok=True)
        (root / "manifest.csv").write_text("\n".join(rows) + "\n")
        plan = shuffle_plan(build_plan(root / "manifest.csv"), 0)
        run_shard(plan, ShardParams(short_side=64), root / "shards", shard_size=3, workers=2)
    return root / "shards"


# --- pretraining ------------------------------------------------------------------------------------


def pretrain_data(recipe: Recipe, sets: dict[str, Path]) -> tuple[Path, str, str | None]:
    """(shards, train set, eval set) standing in for the recipe's: AudioSet recipes get the multi-label
    set, recipes that probe on a set of their own get the split set, the rest the tiny set."""
    if "audioset" in recipe.data.shards:
        return sets["audioset"], "balanced_train", None
    if recipe.run.eval_set is not None:
        return sets["split"], "split1-train", "split1-test"
    return sets["tiny"], "train", None


def pretrain_overrides(recipe: Recipe, sets: dict[str, Path], out: Path, source: Path | None) -> list[str]:
    """What must change for one step on a CPU on 9 videos, and nothing else."""
    shards, train_set, eval_set = pretrain_data(recipe, sets)
    o = [f"data.shards={shards}", f"run.out={out}"]  # placeholders / a temporary folder
    if recipe.data.train_set != train_set:
        o.append(f"data.train_set={train_set}")  # the stand-in's set name
    if recipe.run.eval_set is not None:
        o.append(f"run.eval_set={eval_set}")
    if recipe.data.device != "cpu":
        o.append("data.device=cpu")  # no GPU here
    if recipe.data.crop > CROP:
        o += [f"data.crop={CROP}", "data.short_side=64"]  # the shards store 64 px; 224 crops need 256
    if recipe.model.width > WIDTH:
        o.append(f"model.width={WIDTH}")  # width 1 is ~60x the compute: minutes per step on 2 cores
    o += [f"optim.epoch_size={BATCH}", f"optim.batch_size={BATCH}", "optim.total_epochs=1"]  # one step
    if recipe.optim.warmup_epochs > 1:
        o.append("optim.warmup_epochs=1")  # warmup <= total epochs
    c = recipe.clustering
    if c is not None:
        o.append("clustering.iterations=1")  # one iteration (then the final extraction and clustering)
        if c.k_for("video" if isinstance(c.k, int) else "audio") >= VIDEOS:
            o.append("clustering.k=3" if isinstance(c.k, int) else "clustering.k={video: 2, audio: 3}")
        if c.pca is not None and c.pca >= VIDEOS:
            o.append("clustering.pca=8")  # 9 videos span at most 8 directions (and 64 dims at width 0.125)
        last = c.last_iteration
        if last is not None and last.total_epochs is not None:  # with one iteration, it is this one
            o.append("clustering.last_iteration.total_epochs=1")
            if (last.warmup_epochs or 0) > 1:
                o.append("clustering.last_iteration.warmup_epochs=1")
    if recipe.retrain is not None:
        o.append(f"retrain.run={source}")  # a tiny finished run of the recipe that made retrain.run
    return o


class Runs:
    """Each pretraining recipe run once; a retrain recipe finds the tiny run of its source here."""

    def __init__(self, sets: dict[str, Path], root: Path) -> None:
        self.sets, self.root = sets, root
        self.done: dict[Path, tuple[Recipe, list[str], Any]] = {}

    def source(self, recipe: Recipe) -> Path:
        """The recipe whose `run.out` a retrain recipe's `retrain.run` names, run on the tiny data."""
        path = next(p for p in PRETRAIN if load_recipe(p).run.out == recipe.retrain.run)
        return Path(self.get(path)[0].run.out)

    def get(self, path: Path) -> tuple[Recipe, list[str], Any]:
        if path not in self.done:
            original = load_recipe(path)
            source = self.source(original) if original.retrain is not None else None
            overrides = pretrain_overrides(original, self.sets, self.root / path.stem, source)
            recipe = load_recipe(path, overrides)
            self.done[path] = (recipe, overrides, loop.run(recipe, resume=False))
        return self.done[path]


@pytest.fixture(scope="module")
def runs(
    tiny_shards: Path, audioset_shards: Path, split_shards: Path, tmp_path_factory: pytest.TempPathFactory
) -> Runs:
    sets = {"tiny": tiny_shards, "audioset": audioset_shards, "split": split_shards}
    return Runs(sets, tmp_path_factory.mktemp("pretrain"))


def flat(doc: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in doc.items():
        out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def changed_fields(original: Any, ran: Any, overrides: list[str]) -> set[str]:
    """The fields that differ between the two recipes and are not under an override's key."""
    a, b = flat(original.model_dump(mode="json")), flat(ran.model_dump(mode="json"))
    keys = [o.split("=")[0] for o in overrides]
    changed = {k for k in a.keys() | b.keys() if a.get(k) != b.get(k)}
    return {k for k in changed if not any(k == key or k.startswith(f"{key}.") for key in keys)}


@pytest.mark.parametrize("path", PRETRAIN, ids=[str(p.relative_to(ROOT / "recipes")) for p in PRETRAIN])
def test_pretraining_recipe_trains_one_step_on_cpu(runs: Runs, path: Path) -> None:
    recipe, overrides, result = runs.get(path)
    original = load_recipe(path)
    # nothing but the overrides changed: the speed options, schedule, early stopping... are the recipe's
    assert changed_fields(original, recipe, overrides) == set()
    assert recipe.model == original.model.model_copy(update={"width": recipe.model.width})
    out = Path(recipe.run.out)
    steps = [r for r in read_metrics(out) if r["event"] == "step"]
    assert [r["step"] for r in steps] == [1] and math.isfinite(steps[0]["loss"])
    last = load_checkpoint(list_checkpoints(out)[-1][2])
    assert (last["iteration"], last["epoch"], last["step"]) == (0, 1, 1)
    final = [1] if loop.needs_features(recipe) else []  # the final encoders' features, clusters, probe
    assert [row["iteration"] for row in result.iterations] == [0, *final]
    assert (out / "encoders.pt").is_file() and (out / "report.md").is_file()
    if recipe.retrain is not None:  # it learnt the labels of its source's last iteration
        source = load_checkpoint(list_checkpoints(Path(recipe.retrain.run))[-1][2])
        assert set(last["labels"]) == {"audio"}
        assert np.array_equal(unpack_array(last["labels"]["audio"]), unpack_array(source["labels"]["audio"]))


# --- evaluation ------------------------------------------------------------------------------------


def eval_overrides(recipe: EvalRecipe, sets: dict[str, Path], out: Path) -> list[str]:
    """What must change for one finetuning step (or one SVM fit) on a CPU on tiny sets, nothing else."""
    audio = recipe.data.modality == "audio"
    o = [f"data.shards={sets['folds' if audio else 'split']}", f"run.out={out}"]  # placeholders, tmp
    if recipe.data.device != "cpu":
        o.append("data.device=cpu")  # no GPU here
    if recipe.data.split_layout == "folds":
        o.append("data.splits=[1]")  # one split: the others run the same code on other sets
    elif all(isinstance(s, int) for s in recipe.data.splits):
        o.append("data.splits=[1]")  # the tiny set has split 1 only
    else:  # an explicit split: the stand-in's set names
        o.append("data.splits=[{name: test, train: [split1-train], test: split1-test}]")
    if not audio and recipe.data.crop > CROP:
        o += [f"data.crop={CROP}", "data.short_side=null"]  # the shards store 64 px
    if recipe.model.checkpoint is None and recipe.model.width > WIDTH:
        o.append(f"model.width={WIDTH}")  # a Scratch encoder of width 1: minutes per step on 2 cores
    if recipe.mode != "svm":
        batch = min(recipe.optim.batch_size, BATCH)
        o += [f"optim.epoch_size={batch}", f"optim.batch_size={batch}", "optim.total_epochs=1"]  # one step
        if recipe.optim.warmup_epochs > 1:
            o.append("optim.warmup_epochs=1")  # warmup <= total epochs
    return o


@pytest.mark.parametrize("path", EVAL, ids=[str(p.relative_to(ROOT / "recipes")) for p in EVAL])
def test_evaluation_recipe_finetunes_one_step_on_cpu(
    path: Path, split_shards: Path, esc_shards: Path, tmp_path: Path
) -> None:
    from trainer.evaluate.finetune import run_finetune
    from trainer.evaluate.run import run_dir
    from trainer.evaluate.svm import run_svm

    original = load_eval_recipe(path)
    overrides = eval_overrides(original, {"split": split_shards, "folds": esc_shards}, tmp_path / "eval")
    recipe = load_eval_recipe(path, overrides)
    assert changed_fields(original, recipe, overrides) == set()
    assert recipe.model.precision == original.model.precision
    if recipe.mode == "svm":
        summary = run_svm(recipe)
        assert set(summary["splits"]) == {"fold1"} and 0.0 <= summary["accuracy"] <= 1.0, summary
        assert summary["svm"]["fold1"]["files"] == 2 and summary["setting"]["clips"] == recipe.svm.num_clips
        return
    summary = run_finetune(recipe)
    folder = run_dir(recipe) / f"lr{recipe.lrs[0]:g}" / ("test" if path.stem == "digits" else "split1")
    if recipe.data.split_layout == "folds":
        folder = folder.parent / "fold1"
    epochs = [r for r in read_metrics(folder) if r["event"] == "epoch"]
    assert [r["step"] for r in epochs] == [1] and math.isfinite(epochs[0]["train_loss"])  # one step
    done = yaml.safe_load((folder / "result.json").read_text())
    assert done["videos"] == (2 if recipe.data.modality == "audio" else 3)  # every test video scored
    assert summary["best_lr"] == recipe.lrs[0]
