"""Evaluation recipes (`xdctools finetune`): YAML -> validated, frozen config of one downstream transfer.

A recipe names the downstream `dataset` (a column of the results table), the transfer `mode` and five
sections: `data` (shards, modality, splits, clips), `model` (the pretrained checkpoint or none, and the
row name in the table), `optim` (the paper's Table 11 schedule and Table 12 learning rates), `test`
(clips per video) and `svm` (the DCASE-style linear SVM), plus `run` (where it writes). Every section
forbids unknown keys and checks types strictly, like training recipes (`xdctools.recipe`), and errors
are one line naming the file and the field:

    recipes/eval/ucf101.yaml: optim.lrs: must be > 0 (got -0.1)

Known datasets fill their defaults (modality, split layout, official splits, Table 11 epoch size):

    ucf101  video  train-test  splits 1,2,3      epoch 106K clips
    hmdb51  video  train-test  splits 1,2,3      epoch  40K clips
    esc50   audio  folds       folds 1..5        epoch  20K clips
    dcase   audio  folds       folds 1..5        (linear SVM; no epoch size in the paper)

Split layouts: `train-test` reads shard sets `split{N}-train` / `split{N}-test` (what `xdctools shard
--splits` writes for UCF101/HMDB51); `folds` tests on set `fold{N}` and trains on every other `fold*` set
of the shards (ESC-50: 4 folds train, 1 tests). A split may also be given explicitly as
`{name: main, train: [train], test: test}` for any other set names.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, model_validator

from xdctools.recipe import (
    FieldProblem,
    LrScaling,
    Section,
    describe_first,
    drop_fields,
    load_model,
    parse_model,
)

Mode = Literal["full", "fc", "svm"]
Modality = Literal["video", "audio"]
SplitLayout = Literal["train-test", "folds"]

# Table 12: base learning rates cross-validated per transfer mode (fc-only adds 0.02 and 0.04).
TABLE_12_LRS: dict[str, tuple[float, ...]] = {
    "full": (0.001, 0.002, 0.004, 0.006, 0.008, 0.01),
    "fc": (0.001, 0.002, 0.004, 0.006, 0.008, 0.01, 0.02, 0.04),
}
# Column of the results table each mode fills (the paper's Table 4 says "fc" and "all").
MODE_COLUMNS = {"fc": "fc", "full": "all", "svm": "svm"}


@dataclass(frozen=True)
class DatasetInfo:
    """What the paper fixes for a downstream dataset."""

    title: str  # as the paper's tables spell it
    modality: str
    split_layout: str
    splits: tuple[int, ...]  # the official splits (folds)
    epoch_size: int | None  # Table 11, in clips


DATASETS: dict[str, DatasetInfo] = {
    "ucf101": DatasetInfo("UCF101", "video", "train-test", (1, 2, 3), 106_000),
    "hmdb51": DatasetInfo("HMDB51", "video", "train-test", (1, 2, 3), 40_000),
    "esc50": DatasetInfo("ESC50", "audio", "folds", (1, 2, 3, 4, 5), 20_000),
    "dcase": DatasetInfo("DCASE", "audio", "folds", (1, 2, 3, 4, 5), None),
}

# Fields that change where or how fast a run goes, or which of its parts run, not what one (lr, split)
# computes: left out of the digest that guards each (lr, split) folder's checkpoints and result.
RUNTIME_FIELDS = frozenset(
    {
        "name",
        "data.splits",
        "data.device",
        "data.num_threads",
        "data.prefetch",
        "model.method",
        "model.pretraining",
        "optim.lr",
        "optim.lrs",
        "optim.lr_factor",  # it changes which lrs run; each (lr, split) digest holds its own lr
        "optim.sweep",
        "test.batch_size",
        "run",
    }
)


class SplitSets(Section):
    """An explicit split: the sets to train on and the set to test on."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", max_length=64)
    train: list[str] = Field(min_length=1)
    test: str = Field(min_length=1)


class Data(Section):
    """Which shards, which encoder's input, which splits, and how a clip is cut."""

    shards: str = Field(min_length=1)  # folder holding dataset.json (relative: to the working directory)
    modality: Modality  # the encoder evaluated: video (UCF101, HMDB51) or audio (ESC-50, DCASE)
    split_layout: SplitLayout
    splits: list[int | SplitSets] = Field(min_length=1)
    device: Literal["cpu", "gpu"] = "cpu"  # where DALI decodes and the model runs
    clip_frames: int = Field(default=8, ge=1)  # video clip length (the paper: 8 frames for its tables)
    stride: int = Field(default=1, ge=1)
    crop: int = Field(default=224, ge=8)
    # Frames are resized to this short side before cropping; null keeps the stored size (256 in the paper).
    short_side: int | None = Field(default=None, ge=8)
    spec_augment: bool = False  # audio training clips: light SpecAugment (trainer.data)
    flip: bool = True  # random horizontal flip of video training clips; off where a mirror changes the class
    num_threads: int = Field(default=4, ge=1)
    prefetch: int = Field(default=2, ge=1)

    @model_validator(mode="after")
    def _consistent(self) -> Data:
        if self.short_side is not None and self.crop > self.short_side:
            raise FieldProblem("crop", f"must be <= short_side {self.short_side} (got {self.crop})")
        names = [s if isinstance(s, int) else s.name for s in self.splits]
        if len(set(map(str, names))) != len(names):
            raise FieldProblem("splits", f"lists a split twice ({names})")
        if any(isinstance(s, int) and s < 1 for s in self.splits):
            raise FieldProblem("splits", f"split numbers start at 1 (got {names})")
        return self


class Model(Section):
    """The encoder to transfer: a checkpoint or none (Scratch), and its row in the results table."""

    # ours (xdctools train), the official XDC video weights, a torchvision-layout state dict, or null.
    checkpoint: str | None = Field(default=None, min_length=1)
    method: str | None = Field(default=None, min_length=1, max_length=60)  # row name; default below
    pretraining: str | None = Field(default=None, min_length=1, max_length=60)  # "Pretraining" column
    # Shape of a Scratch encoder (a checkpoint fixes its own): channel multiplier and video layout.
    width: float = Field(default=1.0, gt=0.0)
    video_layout: Literal["torchvision", "xdc"] = "torchvision"
    audio_maxpool: bool = False  # the audio stem's max-pool (trainer.models.audio); not in a state dict
    # BatchNorm eps; null: 1e-3 for a bare XDC-layout state dict (the official Caffe2 weights), else 1e-5.
    bn_eps: float | None = Field(default=None, gt=0.0)
    precision: Literal["fp32", "bf16"] = "fp32"  # autocast of the encoder's forward, on CPU as on GPU
    # BatchNorm (no affine) on the features before the linear layer, as MAE's linear probing; the paper's
    # fc-only is a bare linear layer (false).
    head_norm: bool = False

    @property
    def row(self) -> str:
        """The method's row name: `method`, else Scratch, else the checkpoint's file stem."""
        if self.method is not None:
            return self.method
        return "Scratch" if self.checkpoint is None else Path(self.checkpoint).stem


class Optim(Section):
    """Table 11 (schedule) and Table 12 (learning rates); epochs count clips, not videos."""

    epoch_size: int | None = Field(default=None, ge=1)  # clips per epoch over all ranks
    batch_size: int = Field(default=32, ge=1)  # clips per step per GPU (rank)
    lr: float | None = Field(default=None, gt=0.0)  # the base lr of a single run (no sweep)
    # As pretraining (xdctools.recipe.Optim): each base lr runs at lr x world size under `linear`.
    lr_scaling: LrScaling = "linear"
    warmup_start: float | None = Field(default=None, gt=0.0, le=1.0)  # null: from the base lr
    sweep: bool = False  # run every lr of `lrs` and report the best (Table 12's cross-validation)
    lrs: list[float] | None = Field(default=None, min_length=1)  # null: Table 12's list for the mode
    # Table 12's learning rates x this; 0.25 for 32-frame clips (Appendix B: "reduce the base learning
    # rate to 1/4"). Scales the default grid of either mode only: an explicit `lrs` (and the single `lr`)
    # is used as written.
    lr_factor: float = Field(default=1.0, gt=0.0)
    momentum: float = Field(default=0.9, ge=0.0, lt=1.0)
    weight_decay: float = Field(default=0.005, ge=0.0)
    warmup_epochs: int = Field(default=2, ge=0)
    step_epochs: int = Field(default=2, ge=1)
    total_epochs: int = Field(default=8, ge=1)
    gamma: float = Field(default=0.01, gt=0.0, le=1.0)

    @model_validator(mode="after")
    def _consistent(self) -> Optim:
        if self.lrs is not None and any(lr <= 0 for lr in self.lrs):
            raise FieldProblem("lrs", f"must be > 0 (got {min(self.lrs):g})")
        if self.lrs is not None and len(set(self.lrs)) != len(self.lrs):
            raise FieldProblem("lrs", "lists a learning rate twice")
        if self.warmup_epochs > self.total_epochs:
            raise FieldProblem(
                "warmup_epochs", f"must be <= total_epochs {self.total_epochs} (got {self.warmup_epochs})"
            )
        if self.epoch_size is not None and self.batch_size > self.epoch_size:
            raise FieldProblem(
                "epoch_size", f"must hold at least one batch of {self.batch_size} (got {self.epoch_size})"
            )
        return self


class Test(Section):
    """Test-time protocol: clips per video, centre crop, softmax averaged over a video's clips."""

    num_clips: int = Field(default=10, ge=1)
    batch_size: int = Field(default=8, ge=1)  # segments per evaluation batch (each gives 0..n clips)


class Svm(Section):
    """DCASE-style evaluation: linear SVM on the frozen encoder's pooled (conv5) features."""

    num_clips: int = Field(default=60, ge=1)  # uniformly sampled clips per file
    # clips: one SVM sample per clip, decision scores averaged per file; mean: clip features averaged
    # per file first, one sample per file. See trainer.evaluate.svm.
    pool: Literal["clips", "mean"] = "clips"
    cs: list[float] = Field(default=[0.001, 0.01, 0.1, 1.0, 10.0], min_length=1)  # C, cross-validated
    cv_folds: int = Field(default=5, ge=2)  # folds of the training files for choosing C
    batch_size: int = Field(default=8, ge=1)  # segments per feature-extraction batch

    @model_validator(mode="after")
    def _positive(self) -> Svm:
        if any(c <= 0 for c in self.cs):
            raise FieldProblem("cs", f"must be > 0 (got {min(self.cs):g})")
        return self


class Run(Section):
    """Where results go: `out` holds the results table (merged across runs) and each run's folders."""

    out: str = Field(default="runs/eval", min_length=1)
    keep_checkpoints: int = Field(default=1, ge=0)  # per finished (lr, split): the last n epochs' files


class EvalRecipe(Section):
    """One downstream evaluation. Build with `load_eval_recipe`; every field is checked and frozen."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", max_length=100)
    dataset: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]*$", max_length=40)  # results column: ucf101, ...
    mode: Mode
    seed: int = Field(default=0, ge=0)
    data: Data
    model: Model = Model()
    optim: Optim = Optim()
    test: Test = Test()
    svm: Svm = Svm()
    run: Run = Run()

    @model_validator(mode="before")
    @classmethod
    def _dataset_defaults(cls, raw: Any) -> Any:
        """Fill what the paper fixes for a known dataset, so the resolved recipe shows it."""
        if not isinstance(raw, dict) or raw.get("dataset") not in DATASETS:
            return raw
        info = DATASETS[raw["dataset"]]
        raw = dict(raw)
        data = raw.get("data")
        if isinstance(data, dict):
            defaults = {
                "modality": info.modality,
                "split_layout": info.split_layout,
                "splits": list(info.splits),
            }
            raw["data"] = {**defaults, **data}
        optim = raw.get("optim", {})
        if isinstance(optim, dict) and "epoch_size" not in optim and info.epoch_size is not None:
            raw["optim"] = {**optim, "epoch_size": info.epoch_size}
        return raw

    @model_validator(mode="after")
    def _consistent(self) -> EvalRecipe:
        if self.mode != "svm":
            if self.optim.epoch_size is None:
                known = ", ".join(f"{k} {v.epoch_size}" for k, v in DATASETS.items() if v.epoch_size)
                raise FieldProblem("optim.epoch_size", f"required to finetune (Table 11: {known})")
            if not self.optim.sweep and self.optim.lr is None:
                raise FieldProblem("optim.lr", "required unless optim.sweep is true (--lr-sweep)")
        return self

    @property
    def own_modality(self) -> bool:
        """Whether the encoder is the dataset's own (video for UCF101, audio for ESC-50). Sets the paper
        does not fix (`digits`, a user's own) have no own modality: both encoders can be evaluated."""
        info = DATASETS.get(self.dataset)
        return info is not None and info.modality == self.data.modality

    @property
    def table_name(self) -> str:
        """The dataset as results are keyed and filed: `ucf101`, or `digits-audio` beside `digits-video`
        when either encoder can be evaluated, so the two never share a cell or a run folder."""
        return self.dataset if self.own_modality else f"{self.dataset}-{self.data.modality}"

    @property
    def title(self) -> str:
        """The dataset as the paper's tables spell it (UCF101, ESC50), else its name upper-cased; with
        the modality when the dataset has no own one ("DIGITS audio")."""
        info = DATASETS.get(self.dataset)
        name = info.title if info is not None else self.dataset.upper()
        return name if self.own_modality else f"{name} {self.data.modality}"

    @property
    def column(self) -> str:
        return MODE_COLUMNS[self.mode]

    @property
    def lrs(self) -> tuple[float, ...]:
        """The base lrs this run trains with: all of the sweep, or the single `optim.lr`.

        The sweep is `optim.lrs` as written, else Table 12's list for the mode times `optim.lr_factor`
        (rounded to 12 significant digits: 0.006 x 0.1 is 0.0006, not 0.0006000000000000001).
        """
        if self.mode == "svm":
            return ()
        if not self.optim.sweep:
            return (float(self.optim.lr),)  # type: ignore[arg-type]  # checked in _consistent
        if self.optim.lrs is not None:
            return tuple(self.optim.lrs)
        return scaled_grid(TABLE_12_LRS[self.mode], self.optim.lr_factor)


def scaled_grid(lrs: Sequence[float], factor: float) -> tuple[float, ...]:
    """Each lr x `factor`, rounded to 12 significant digits (lr folder names and digests stay tidy)."""
    return tuple(float(f"{lr * factor:.12g}") for lr in lrs)


# --- loading ---------------------------------------------------------------------------------


def load_eval_recipe(path: str | Path, overrides: Sequence[str] = ()) -> EvalRecipe:
    """Read, override and validate an evaluation recipe; ConfigError (one line, file and field) if bad.

    `overrides` are `section.key=value` strings (`optim.lr=0.01`, `mode=fc`, `model.checkpoint=null`),
    the value parsed as YAML.
    """
    return load_model(path, EvalRecipe, overrides, describe=format_errors)


def parse_eval_recipe(text: str, *, source: str = "<recipe>", overrides: Sequence[str] = ()) -> EvalRecipe:
    """`load_eval_recipe` on text already read; `source` names it in errors."""
    return parse_model(text, EvalRecipe, source=source, overrides=overrides, describe=format_errors)


def format_errors(error: ValidationError) -> str:
    """The first validation error as `dotted.path: reason`, plus "(and N more)"."""
    errors = error.errors()
    # a split given as a mapping also fails the `int` member of its union: report the mapping's problem
    errors = [e for e in errors if not (e["type"] == "int_type" and isinstance(e["input"], dict))] or errors
    # pydantic adds the union member tried ("int", "SplitSets") to the location: leave it out
    loc = tuple(p for p in errors[0]["loc"] if not (isinstance(p, str) and p in ("int", "SplitSets")))
    return describe_first(errors, loc, EvalRecipe)


# --- output ----------------------------------------------------------------------------------


def dump_eval_recipe(recipe: EvalRecipe) -> str:
    """The resolved recipe (every default filled in) as YAML; `parse_eval_recipe` reads it back equal."""
    header = f"# resolved evaluation recipe {recipe.name}\n"
    return header + yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False, width=110)


def eval_digest(recipe: EvalRecipe, extra: Mapping[str, Any] | None = None) -> str:
    """16 hex digits of SHA-256 over what one (lr, split) computes, plus `extra` (lr, split, checkpoint).

    Stored with each (lr, split) folder's checkpoints and result, so a rerun resumes or skips only
    work that the same recipe would do.
    """
    doc = drop_fields(recipe.model_dump(mode="json"), RUNTIME_FIELDS)
    if recipe.mode != "svm":
        doc.pop("svm", None)
    doc["extra"] = dict(extra or {})
    canonical = json.dumps(doc, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]
