"""Training recipes: YAML -> validated, frozen config; overrides, the resolved dump and its digest.

A recipe has six parts: `name`, `method` and `seed` at the top, then the sections `data`, `model`,
`clustering` (absent for `superv` and for a `retrain` run, which re-trains one encoder on the labels of
a finished run), `optim` and `run`. Every section forbids unknown keys and checks
types strictly (the string "0.1" is not a number, 1 is not `true`, 8.0 is not an integer). Errors are
one line, the first error and how many more:

    recipes/x.yaml: optim.lr: must be > 0 (got -1)

Paths in a recipe (`data.shards`, `run.out`) are used as written: a relative path is relative to the
current working directory of the run, not to the recipe file, so the recipes in `recipes/` work from
the repository root.

YAML is read by a `yaml.SafeLoader` that also takes `1e-4` as a float (YAML 1.2; PyYAML's 1.1
resolver reads it as a string, a classic trap for learning rates).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, model_validator

from xdctools.errors import ConfigError, InputError

Method = Literal["sdc", "mdc", "cdc", "xdc", "superv"]
METHODS: tuple[str, ...] = get_args(Method)
M = TypeVar("M", bound=BaseModel)

# Fields that change how fast or where a run goes, not what it computes: left out of the digest so
# that a run may resume with, e.g., more loader threads or another output folder name.
RUNTIME_FIELDS = frozenset(
    {
        "name",
        "data.num_threads",
        "data.prefetch",
        "model.compile",
        "run.out",
        "run.log_every",
        "run.checkpoint_every",
        "run.keep_features",
    }
)


class _Loader(yaml.SafeLoader):
    """safe_load plus YAML 1.2 floats without a dot (`1e-4`, `5E+3`)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def _mapping_without_duplicates(loader: _Loader, node: yaml.MappingNode, deep: bool = False) -> dict:
    """PyYAML keeps the last of two equal keys silently; in a recipe that is always a mistake."""
    if any(key_node.tag == "tag:yaml.org,2002:merge" for key_node, _ in node.value):
        return loader.construct_mapping(node, deep)  # `<<:` merges may override keys on purpose
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        if not isinstance(key, (str, int, float, bool)) or key is None:
            continue  # construct_mapping reports unhashable keys itself
        if key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_duplicates)


def parse_yaml(text: str) -> Any:
    """`yaml.safe_load` semantics with exponent floats; raises yaml.YAMLError."""
    return yaml.load(text, Loader=_Loader)  # a SafeLoader subclass: no arbitrary objects


class FieldProblem(ValueError):
    """A cross-field check that names the offending field relative to the section it runs in."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class Data(Section):
    """Where the clips come from and how a training clip is cut."""

    shards: str = Field(min_length=1)  # folder holding dataset.json (relative: to the working directory)
    train_set: str = Field(default="train", min_length=1)
    # Videos held out of training to measure the validation loss on pseudo-labels (early stopping).
    val_fraction: float = Field(default=0.05, ge=0.0, lt=0.5)
    device: Literal["cpu", "gpu"] = "cpu"  # where DALI decodes and augments
    clip_frames: int = Field(default=8, ge=1)
    stride: int = Field(default=1, ge=1)
    crop: int = Field(default=224, ge=8)
    # Frames are resized to this short side before cropping (trainer.data.ClipSpec.short_side);
    # null keeps the size stored in the shards. Checked against dataset.json by the loop.
    short_side: int | None = Field(default=256, ge=8)
    num_threads: int = Field(default=4, ge=1)
    prefetch: int = Field(default=2, ge=1)
    spec_augment: bool = False
    flip: bool = True  # random horizontal flip of training clips; off where a mirror changes the class

    @model_validator(mode="after")
    def _crop_fits(self) -> Data:
        if self.short_side is not None and self.crop > self.short_side:
            raise FieldProblem("crop", f"must be <= short_side {self.short_side} (got {self.crop})")
        return self


class Model(Section):
    """Encoder shape and the speed options (trainer.models.prepare_for_speed, autocast).

    The speed options run on CPU as on GPU; the recipe decides, not the device. What each costs or
    saves on a CPU is measured in docs/train.md ("Speed options"): the CPU recipes keep them off.
    """

    width: float = Field(default=1.0, gt=0.0)  # channel multiplier; 1.0 is the paper's R(2+1)D-18
    video_layout: Literal["torchvision", "xdc"] = "torchvision"
    # Seed of the encoders' initial weights alone; null: the top-level `seed`, which also orders the
    # clips. Separates "this start cannot learn" from "this clip order cannot" (docs/digits.md, "Seeds").
    init_seed: int | None = Field(default=None, ge=0)
    # Zero the last norm of every residual branch, so each block starts as the identity (Goyal et al.,
    # the paper's [14]); off: torchvision's init, as the paper's models.
    zero_init_residual: bool = False
    # Autocast of the training and extraction forwards: bf16 (8-bit mantissa) or fp16 (11 bits, with
    # a GradScaler that skips a step whose gradients overflow and halves its scale); fp32 is the paper's.
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    channels_last: bool = False  # NDHWC / NHWC convolutions and inputs, for training and extraction
    # torch.compile (inductor) of each encoder's forward, for training and extraction. Not in the
    # digest: it changes only float32 rounding, so a run may resume with it switched.
    compile: bool = False


LrScaling = Literal["linear", "none"]


class OptimPatch(Section):
    """Optim fields that replace the base ones for one iteration (the paper's IG65M* row)."""

    epoch_size: int | None = Field(default=None, ge=1)
    batch_size: int | None = Field(default=None, ge=1)
    lr: float | None = Field(default=None, gt=0.0)
    lr_scaling: LrScaling | None = None
    warmup_start: float | None = Field(default=None, gt=0.0, le=1.0)
    momentum: float | None = Field(default=None, ge=0.0, lt=1.0)
    weight_decay: float | None = Field(default=None, ge=0.0)
    warmup_epochs: int | None = Field(default=None, ge=0)
    step_epochs: int | None = Field(default=None, ge=1)
    total_epochs: int | None = Field(default=None, ge=1)
    gamma: float | None = Field(default=None, gt=0.0, le=1.0)
    early_stop: bool | None = None
    patience: int | None = Field(default=None, ge=1)

    def given(self) -> dict[str, Any]:
        return {key: value for key, value in self.model_dump().items() if value is not None}


class Optim(Section):
    """SGD and its schedule, in the paper's terms (Table 9); epochs count clips, not videos.

    As in the authors' Caffe2 toolchain (Goyal et al.'s linear scaling rule, the paper's [14]):
    `batch_size` is per GPU (per rank), `lr` is the base rate of one GPU, and a run on W ranks trains
    with a global batch of batch_size x W at lr x W (`lr_scaling: linear`), its warmup ramping from the
    base rate to that effective rate. `trainer.optim.effective_schedule` resolves the numbers.
    """

    epoch_size: int = Field(ge=1)  # clips per epoch over all ranks
    batch_size: int = Field(ge=1)  # clips per step per GPU (rank); the global batch is this x world size
    lr: float = Field(gt=0.0)  # base lr of one GPU; the effective lr is reached at the end of warmup
    # linear: effective lr = lr x world size (the paper's toolchain); none: lr whatever the world size.
    lr_scaling: LrScaling = "linear"
    # First warmup lr as a fraction of the effective lr; null: the base lr (Goyal et al.: base -> base x
    # world size, so no ramp at all on one rank). 0.001 starts near zero, as the small CPU recipes do.
    warmup_start: float | None = Field(default=None, gt=0.0, le=1.0)
    momentum: float = Field(default=0.9, ge=0.0, lt=1.0)
    weight_decay: float = Field(default=1e-4, ge=0.0)
    warmup_epochs: int = Field(default=0, ge=0)
    step_epochs: int = Field(ge=1)  # the lr is multiplied by gamma every step_epochs after warmup
    total_epochs: int = Field(ge=1)
    gamma: float = Field(default=0.01, gt=0.0, le=1.0)
    early_stop: bool = False  # stop an iteration when the val loss rose `patience` epochs in a row
    patience: int = Field(default=3, ge=1)

    @model_validator(mode="after")
    def _consistent(self) -> Optim:
        if self.warmup_epochs > self.total_epochs:
            raise FieldProblem(
                "warmup_epochs", f"must be <= total_epochs {self.total_epochs} (got {self.warmup_epochs})"
            )
        if self.batch_size > self.epoch_size:
            raise FieldProblem(
                "epoch_size", f"must hold at least one batch of {self.batch_size} (got {self.epoch_size})"
            )
        return self


class KPerView(Section):
    """One k per modality's clusters (the paper's Tables 13/14: 64 video and 128 audio clusters)."""

    video: int = Field(ge=2)  # clusters of the video features (what XDC's audio encoder learns)
    audio: int = Field(ge=2)  # clusters of the audio features (what XDC's video encoder learns)


class Clustering(Section):
    """k-means on the extracted features, once per deep-clustering iteration (xdctools.cluster)."""

    # One k for every view, or {video: K, audio: K} (not for cdc); a mapping is read as the latter.
    k: Annotated[
        Annotated[Annotated[int, Field(ge=2)], Tag("one k")] | Annotated[KPerView, Tag("per view")],
        Discriminator(lambda v: "per view" if isinstance(v, (dict, KPerView)) else "one k"),
    ]
    iterations: int = Field(default=1, ge=1)  # deep-clustering iterations: cluster, relabel, train
    niter: int = Field(default=20, ge=1)  # Lloyd iterations of each k-means
    sample_per_centroid: int = Field(default=256, ge=1)
    spherical: bool = False
    pca: int | None = Field(default=None, ge=1)
    refine: int = Field(default=0, ge=0)
    # DeepCluster's safeguard against collapse: draw training videos uniformly over clusters.
    # Defaults to true for sdc, false for the multi-modal methods (the paper never needed it there).
    uniform_sampling: bool
    reseed_empty: bool = True  # split a large cluster into each empty one (DeepCluster)
    last_iteration: OptimPatch | None = None  # replaces optim fields in the last iteration
    # The first pseudo-labels (iteration 0). random: k-means of the random encoders' features (the paper).
    # handcrafted: the audio side clusters each video's per-band log-mel mean and std (trainer/handcrafted.py)
    # instead of the random audio encoder's features, the option the paper's §3.3 names; video is unchanged.
    # handcrafted-only: every view's first labels cluster those audio statistics (with that view's k), so
    # that no encoder starts from its random features' clusters; the heads route them as usual.
    init: Literal["random", "handcrafted", "handcrafted-only"] = "random"

    @property
    def k_text(self) -> str:
        """k as reports show it: "256", or "video 64, audio 128"."""
        return str(self.k) if isinstance(self.k, int) else f"video {self.k.video}, audio {self.k.audio}"

    def k_for(self, view: str) -> int:
        """k of one view's k-means: "video", "audio" or "cdc" (the joint features take the single k)."""
        if isinstance(self.k, int):
            return self.k
        if view == "cdc":
            raise FieldProblem("k", "the joint (cdc) features are clustered with one k; give one number")
        return getattr(self.k, view)


class Retrain(Section):
    """Re-train one encoder on a finished run's last clustering assignment (the paper's §6 protocol).

    "We re-train the XDC video encoder on the last clustering assignment using 32-frame clips": the
    labels (and their k) are those the finished run's last iteration trained on; only `encoder` is
    built and trained, from random weights by default, as a new pretraining with Appendix B's
    32-frame settings (batch 8, base lr 0.0025) and Table 10's schedule.
    """

    run: str = Field(min_length=1)  # folder of a finished `xdctools train` run on the same shards
    encoder: Literal["video", "audio"] = "video"
    # scratch: random weights (the paper "re-trains"); final: start from the run's final encoder weights
    init: Literal["scratch", "final"] = "scratch"


class Run(Section):
    """Where a run writes and what it measures on the side."""

    out: str = Field(min_length=1)  # run folder (relative: to the working directory); default runs/<name>
    log_every: int = Field(default=50, ge=1)  # optimizer steps between metric lines
    checkpoint_every: int = Field(default=1, ge=1)  # epochs between checkpoints (and one per iteration)
    # Keep every iteration's feature stores, e.g. to study what the random encoders' clusters follow;
    # by default an iteration's store is deleted once the next one's labels are checkpointed.
    keep_features: bool = False
    # After each iteration, a linear probe on true labels of frozen features (when the shards have labels).
    probe: bool = False
    # Shard set the probe is scored on; null: the training set's held-out videos (val_fraction).
    eval_set: str | None = Field(default=None, min_length=1)
    # Score the probe by stratified k-fold cross-validation over every labelled training video (held-out
    # ones included) instead of the held-out videos alone: for small sets, where a few held-out videos
    # make the probe noise. Single-label sets; not with eval_set. null: the held-out videos.
    probe_folds: int | None = Field(default=None, ge=2)
    # The probe's features: 1 = the clustered features (each segment's centre clip, pooled per video);
    # N > 1 = the mean of N evenly spaced clips per video (the paper's 10-clip test protocol), extracted
    # for the probe on rank 0 at every probe: N times the decoding and forward passes of the probed sets.
    probe_clips: int = Field(default=1, ge=1)


class Recipe(Section):
    """A whole training run. Build with `load_recipe`; every field is checked and frozen."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", max_length=100)
    method: Method
    seed: int = Field(default=0, ge=0)
    data: Data
    model: Model = Model()
    clustering: Clustering | None = None
    retrain: Retrain | None = None
    optim: Optim
    run: Run

    @model_validator(mode="before")
    @classmethod
    def _defaults_from_method(cls, data: Any) -> Any:
        """Fill defaults that depend on other fields, so the dumped recipe shows them resolved."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        clustering = data.get("clustering")
        if isinstance(clustering, dict) and "uniform_sampling" not in clustering:
            data["clustering"] = {**clustering, "uniform_sampling": data.get("method") == "sdc"}
        run = data.get("run", {})
        if isinstance(run, dict) and "out" not in run and isinstance(data.get("name"), str):
            data["run"] = {**run, "out": f"runs/{data['name']}"}
        return data

    @model_validator(mode="after")
    def _consistent(self) -> Recipe:
        if self.method == "superv" and self.clustering is not None:
            raise FieldProblem("clustering", "method superv trains on the true labels; remove this section")
        if self.retrain is not None:
            if self.method == "superv":
                raise FieldProblem(
                    "retrain", "re-trains on a clustering run's labels; method superv has none"
                )
            if self.clustering is not None:
                raise FieldProblem(
                    "clustering", "a retrain run takes the labels and k of retrain.run; remove this section"
                )
        elif self.method != "superv" and self.clustering is None:
            raise FieldProblem("clustering", f"required for method {self.method}")
        if self.method == "cdc" and self.clustering is not None and isinstance(self.clustering.k, KPerView):
            raise FieldProblem(
                "clustering.k", "cdc clusters the joint features with one k; give a number, not one per view"
            )
        last = self.optim_for(self.iterations - 1)  # raises FieldProblem for a bad last_iteration
        plans = [("optim", self.optim)] if self.iterations > 1 or last is self.optim else []
        if last is not self.optim:
            plans.append(("clustering.last_iteration", last))
        for where, optim in plans:
            if optim.early_stop and self.data.val_fraction == 0:
                raise FieldProblem(f"{where}.early_stop", "needs data.val_fraction > 0 to measure a val loss")
        if self.run.eval_set is not None and not self.run.probe:
            raise FieldProblem("run.eval_set", "is only used by the probe; set run.probe: true or remove it")
        if self.run.probe_folds is not None and not self.run.probe:
            raise FieldProblem(
                "run.probe_folds", "is only used by the probe; set run.probe: true or remove it"
            )
        if self.run.probe_folds is not None and self.run.eval_set is not None:
            raise FieldProblem(
                "run.probe_folds", "scores the training set; give it or run.eval_set, not both"
            )
        if self.run.probe_clips != 1 and not self.run.probe:
            raise FieldProblem(
                "run.probe_clips", "is only used by the probe; set run.probe: true or remove it"
            )
        return self

    @property
    def iterations(self) -> int:
        """Deep-clustering iterations; supervised training is one."""
        return 1 if self.clustering is None else self.clustering.iterations

    def optim_for(self, iteration: int) -> Optim:
        """The optim settings of a 0-based iteration: `clustering.last_iteration` applies to the last."""
        if not 0 <= iteration < self.iterations:
            raise ValueError(f"iteration {iteration} is not in [0, {self.iterations})")
        patch = self.clustering.last_iteration if self.clustering is not None else None
        if patch is None or iteration != self.iterations - 1 or not patch.given():
            return self.optim
        try:
            return Optim.model_validate({**self.optim.model_dump(), **patch.given()})
        except ValidationError as e:
            first = e.errors()[0]
            field = ".".join(str(p) for p in first["loc"]) or _problem_field(first) or "optim"
            raise FieldProblem(f"clustering.last_iteration.{field}", _reason(first)) from None

    @property
    def heads(self) -> dict[str, dict[str, str]]:
        """Per encoder, its heads and the labels each learns: "video"/"audio" pseudo-labels or "cdc"/"true".

        The names are the views of `xdctools.cluster` (labels of the video, audio or concatenated
        features), so the loop can cluster each needed view once and route the labels. A retrain run
        has only the encoder it re-trains.
        """
        heads = {
            "sdc": {"video": {"own": "video"}, "audio": {"own": "audio"}},
            "mdc": {"video": {"own": "video", "other": "audio"}, "audio": {"own": "audio", "other": "video"}},
            "cdc": {"video": {"own": "cdc"}, "audio": {"own": "cdc"}},
            "xdc": {"video": {"other": "audio"}, "audio": {"other": "video"}},
            "superv": {"video": {"true": "true"}, "audio": {"true": "true"}},
        }[self.method]
        if self.retrain is not None:
            return {self.retrain.encoder: heads[self.retrain.encoder]}
        return heads

    @property
    def views(self) -> tuple[str, ...]:
        """The label views the heads learn, in a fixed order: clustered each iteration (none for superv)."""
        wanted = {view for heads in self.heads.values() for view in heads.values()}
        return tuple(view for view in ("video", "audio", "cdc") if view in wanted)


# --- loading ---------------------------------------------------------------------------------


def load_recipe(path: str | Path, overrides: Sequence[str] = ()) -> Recipe:
    """Read, override and validate a recipe file; ConfigError (one line, naming file and field) if bad.

    `overrides` are `section.key=value` strings (`optim.lr=0.02`, `clustering.k=512`, `seed=3`,
    `clustering.last_iteration.total_epochs=30`); the value is parsed as YAML.
    """
    return load_model(path, Recipe, overrides)


def parse_recipe(text: str, *, source: str = "<recipe>", overrides: Sequence[str] = ()) -> Recipe:
    """`load_recipe` on text already read; `source` names it in errors."""
    return parse_model(text, Recipe, source=source, overrides=overrides)


def load_model(
    path: str | Path,
    model_cls: type[M],
    overrides: Sequence[str] = (),
    *,
    describe: Callable[[ValidationError], str] | None = None,
) -> M:
    """Read a YAML file into `model_cls` (a training or evaluation recipe): `parse_model` on its text.

    InputError if the file cannot be read; ConfigError (one line, naming file and field) if it is bad.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"{path}: recipe file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: cannot read the recipe ({e})") from None
    return parse_model(text, model_cls, source=str(path), overrides=overrides, describe=describe)


def parse_model(
    text: str,
    model_cls: type[M],
    *,
    source: str = "<recipe>",
    overrides: Sequence[str] = (),
    describe: Callable[[ValidationError], str] | None = None,
) -> M:
    """Parse YAML text, apply `a.b=value` overrides and validate it as `model_cls`.

    `describe` turns a validation error into its one-line message (default: `format_errors`).
    """
    try:
        raw = parse_yaml(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{source}: {where}invalid YAML ({problem})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: must be a mapping of sections, got {type(raw).__name__}")
    for item in overrides:
        apply_override(raw, item, source, model_cls)
    try:
        return model_cls.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(f"{source}: {(describe or format_errors)(e)}") from None


def apply_override(raw: dict[str, Any], item: str, source: str, model_cls: type[BaseModel]) -> None:
    """Set one `a.b.c=value` in the raw mapping, after checking the path names a field of `model_cls`."""
    dotted, sep, text = item.partition("=")
    dotted = dotted.strip()
    if not sep or not dotted:
        raise ConfigError(f"{source}: override {item!r}: expected section.key=value")
    try:
        value = parse_yaml(text) if text.strip() else None
    except yaml.YAMLError:
        raise ConfigError(f"{source}: override {item!r}: the value is not valid YAML") from None
    parts = dotted.split(".")
    model: type[BaseModel] | None = model_cls
    node = raw
    for depth, part in enumerate(parts):
        if model is None or part not in model.model_fields:
            at = ".".join(parts[:depth]) or "the recipe"
            known = ", ".join(model.model_fields) if model is not None else "no fields"
            raise ConfigError(f"{source}: override {item!r}: unknown field {dotted} ({at} has {known})")
        if depth == len(parts) - 1:
            node[part] = value
            return
        model = _section_type(model.model_fields[part].annotation)
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            raise ConfigError(f"{source}: override {item!r}: {'.'.join(parts[: depth + 1])} is not a section")
        node = child


def _section_type(annotation: Any) -> type[BaseModel] | None:
    """The Section class inside `X`, `X | None` or a tagged union holding X, else None (a leaf field)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for candidate in get_args(annotation):
        found = _section_type(candidate)
        if found is not None:
            return found
    return None


# --- error messages --------------------------------------------------------------------------

_BOUNDS = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}
_TYPES = {
    "int_type": "must be an integer",
    "float_type": "must be a number",
    "bool_type": "must be true or false",
    "string_type": "must be a string",
    "model_type": "must be a mapping of fields",
    "dict_type": "must be a mapping of fields",
}


def _problem_field(error: Mapping[str, Any]) -> str:
    problem = (error.get("ctx") or {}).get("error")
    return problem.field if isinstance(problem, FieldProblem) else ""


def _reason(error: Mapping[str, Any]) -> str:
    kind = error["type"]
    ctx = error.get("ctx") or {}
    got = f" (got {_show(error.get('input'))})"
    if kind == "missing":
        return "required"
    if kind == "extra_forbidden":
        return "unknown key"
    if kind in _BOUNDS:
        bound = next(iter(ctx.values()))
        return f"must be {_BOUNDS[kind]} {_show(bound)}{got}"
    if kind == "literal_error":
        return f"must be one of {ctx.get('expected', '?')}{got}"
    if kind in _TYPES:
        return _TYPES[kind] + got
    if kind == "string_pattern_mismatch":
        return f"must match {ctx.get('pattern')}{got}"
    if kind in ("string_too_short", "string_too_long"):
        return error["msg"].replace("String should", "must") + got
    problem = ctx.get("error")
    if isinstance(problem, FieldProblem):
        return problem.reason
    message = str(problem) if problem is not None else error["msg"]
    return message[:1].lower() + message[1:]


def _show(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, (int, float)):
        return f"{value:g}" if isinstance(value, float) else str(value)
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _known_keys(loc: tuple[Any, ...], model_cls: type[BaseModel]) -> str:
    """For an unknown key: the keys its section accepts (list indices in `loc` are stepped over)."""
    model: type[BaseModel] | None = model_cls
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        if model is None or part not in model.model_fields:
            return ""
        model = _section_type(model.model_fields[part].annotation)
    return f" (expected one of: {', '.join(model.model_fields)})" if model is not None else ""


def describe_first(
    errors: Sequence[Mapping[str, Any]], loc: tuple[Any, ...], model_cls: type[BaseModel]
) -> str:
    """`errors[0]` as `dotted.path: reason`, plus "(and N more)"; `loc` is its location as reported."""
    first = errors[0]
    field = ".".join(str(p) for p in (*loc, _problem_field(first)) if p != "")
    reason = _reason(first)
    if first["type"] == "extra_forbidden":
        reason += _known_keys(loc, model_cls)
    text = f"{field or 'recipe'}: {reason}"
    return text + (f" (and {len(errors) - 1} more)" if len(errors) > 1 else "")


UNION_TAGS = frozenset({"one k", "per view"})  # tags of the `clustering.k` union: not part of a field's path


def format_errors(error: ValidationError) -> str:
    """The first validation error of a training recipe as `dotted.path: reason`, plus "(and N more)"."""
    errors = error.errors()
    loc = tuple(p for p in errors[0]["loc"] if isinstance(p, (str, int)) and p not in UNION_TAGS)
    return describe_first(errors, loc, Recipe)


# --- output ----------------------------------------------------------------------------------


def dump_recipe(recipe: Recipe) -> str:
    """The resolved recipe (every default filled in) as YAML; `parse_recipe` reads it back equal."""
    doc = recipe.model_dump(mode="json")
    if recipe.clustering is not None and recipe.clustering.last_iteration is not None:
        doc["clustering"]["last_iteration"] = recipe.clustering.last_iteration.given()
    header = f"# resolved recipe {recipe.name}, digest {recipe_digest(recipe)}\n"
    return header + yaml.safe_dump(doc, sort_keys=False, width=110)


def recipe_digest(recipe: Recipe) -> str:
    """16 hex digits of SHA-256 over every field that changes what a run computes (not RUNTIME_FIELDS).

    A checkpoint stores it, so a run never resumes under a recipe that would train differently.
    """
    doc = drop_fields(recipe.model_dump(mode="json"), RUNTIME_FIELDS)
    canonical = json.dumps(doc, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def drop_fields(doc: dict[str, Any], fields: Iterable[str]) -> dict[str, Any]:
    """Remove each dotted field ("a.b", "c") from a dumped recipe, in place; returns `doc`."""
    for dotted in fields:
        *parents, leaf = dotted.split(".")
        node = doc
        for part in parents:
            node = node[part]
        node.pop(leaf, None)
    return doc
