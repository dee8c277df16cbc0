"""Recipes: every shipped recipe validates and matches the paper's Table 10; bad ones name the field."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import yaml
from pydantic import ValidationError

from xdctools.errors import ConfigError, InputError
from xdctools.recipe import RUNTIME_FIELDS, dump_recipe, load_recipe, parse_recipe, recipe_digest

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
# recipes/eval/ holds evaluation recipes of another schema (the finetune issue).
TRAIN_RECIPES = sorted(p for p in RECIPES.rglob("*.yaml") if "eval" not in p.relative_to(RECIPES).parts)

BASE = {
    "name": "t",
    "method": "xdc",
    "data": {"shards": "demo/shards", "crop": 112, "short_side": 128},
    "clustering": {"k": 6, "iterations": 2},
    "optim": {"epoch_size": 64, "batch_size": 8, "lr": 0.05, "step_epochs": 2, "total_epochs": 3},
}


def write(tmp_path: Path, doc: dict, name: str = "r.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(doc))
    return path


def error_of(tmp_path: Path, doc: dict, overrides: tuple[str, ...] = ()) -> str:
    path = write(tmp_path, doc)
    with pytest.raises(ConfigError) as info:
        load_recipe(path, overrides)
    message = info.value.message
    assert "\n" not in message
    assert message.startswith(f"{path}: ")
    return message[len(f"{path}: ") :]


# --- the shipped recipes ----------------------------------------------------------------------


def test_recipes_exist() -> None:
    names = {p.relative_to(RECIPES).as_posix() for p in TRAIN_RECIPES}
    expected = {f"pretrain/kinetics-{m}.yaml" for m in ("sdc", "mdc", "cdc", "xdc")} | {
        "pretrain/audioset-xdc.yaml",
        "pretrain/audioset240k-xdc.yaml",
        "pretrain/ig65m-xdc.yaml",
        "pretrain/kinetics-xdc-32f.yaml",
        "pretrain/audioset-xdc-32f.yaml",
        "pretrain/ig65m-xdc-32f.yaml",
        "pretrain/kinetics-xdc-tables13-14.yaml",
        "pretrain/kinetics-superv.yaml",
        "pretrain/audioset-superv.yaml",
        "quickstart.yaml",
        "digits.yaml",
    }
    assert expected <= names


@pytest.mark.parametrize("path", TRAIN_RECIPES, ids=lambda p: p.relative_to(RECIPES).as_posix())
def test_every_recipe_loads_and_round_trips(path: Path) -> None:
    recipe = load_recipe(path)
    assert recipe.name == path.stem  # run folders and digests follow the file name
    again = parse_recipe(dump_recipe(recipe), source="dump")
    assert again == recipe
    assert recipe_digest(again) == recipe_digest(recipe)


# (file, es, bs, lr, we, se, te, wd, early stop, k): Table 10 and Table 2 / §4.2 of the paper.
TABLE_10 = [
    ("pretrain/kinetics-sdc.yaml", 1_000_000, 32, 0.01, 10, 10, 30, 1e-4, True, 256),
    ("pretrain/kinetics-mdc.yaml", 1_000_000, 32, 0.01, 10, 10, 30, 1e-4, True, 256),
    ("pretrain/kinetics-cdc.yaml", 1_000_000, 32, 0.01, 10, 10, 30, 1e-4, True, 256),
    ("pretrain/kinetics-xdc.yaml", 1_000_000, 32, 0.01, 10, 10, 30, 1e-4, True, 256),
    (
        "pretrain/kinetics-xdc-tables13-14.yaml",
        1_000_000,
        32,
        0.01,
        10,
        10,
        30,
        1e-4,
        True,
        {"video": 64, "audio": 128},
    ),
    ("pretrain/kinetics-xdc-32f.yaml", 1_000_000, 8, 0.0025, 10, 10, 30, 1e-4, True, None),
    ("pretrain/audioset-xdc-32f.yaml", 2_000_000, 8, 0.0025, 10, 10, 45, 1e-4, True, None),
    ("pretrain/ig65m-xdc-32f.yaml", 10_000_000, 8, 0.0025, 0, 9, 30, 1e-4, False, None),
    ("pretrain/audioset-xdc.yaml", 2_000_000, 32, 0.01, 10, 10, 45, 1e-4, True, 256),
    ("pretrain/audioset240k-xdc.yaml", 2_000_000, 32, 0.01, 10, 10, 45, 1e-4, True, 64),
    ("pretrain/ig65m-xdc.yaml", 10_000_000, 32, 0.01, 1, 3, 10, 1e-4, False, 2048),
    ("pretrain/kinetics-superv.yaml", 1_000_000, 32, 0.01, 10, 10, 45, 1e-4, False, None),
    ("pretrain/audioset-superv.yaml", 2_000_000, 32, 0.04, 10, 20, 45, 1e-5, False, None),
]


@pytest.mark.parametrize(("name", "es", "bs", "lr", "we", "se", "te", "wd", "stop", "k"), TABLE_10)
def test_pretrain_recipes_match_table_10(name, es, bs, lr, we, se, te, wd, stop, k) -> None:
    recipe = load_recipe(RECIPES / name)
    o = recipe.optim
    assert (o.epoch_size, o.batch_size, o.lr, o.warmup_epochs, o.step_epochs, o.total_epochs) == (
        es,
        bs,
        lr,
        we,
        se,
        te,
    )
    assert (o.weight_decay, o.early_stop, o.gamma, o.momentum) == (wd, stop, 0.01, 0.9)
    got = recipe.clustering.k if recipe.clustering else None
    assert (got if got is None or isinstance(got, int) else got.model_dump()) == k
    assert (recipe.data.clip_frames, recipe.data.crop, recipe.data.short_side) == (
        32 if "32f" in name else 8,
        224,
        256,
    )


def test_ig65m_last_iteration_is_the_star_row() -> None:
    recipe = load_recipe(RECIPES / "pretrain/ig65m-xdc.yaml")
    first, last = recipe.optim_for(0), recipe.optim_for(recipe.iterations - 1)
    assert (first.warmup_epochs, first.step_epochs, first.total_epochs) == (1, 3, 10)
    assert (last.warmup_epochs, last.step_epochs, last.total_epochs) == (0, 9, 30)
    assert (last.epoch_size, last.lr, last.early_stop) == (10_000_000, 0.01, False)
    with pytest.raises(ValueError, match="not in"):
        recipe.optim_for(recipe.iterations)


@pytest.mark.parametrize("data", ["kinetics", "audioset", "ig65m"])
def test_32_frame_recipes_retrain_the_video_encoder_on_the_8_frame_runs_labels(data: str) -> None:
    recipe = load_recipe(RECIPES / f"pretrain/{data}-xdc-32f.yaml")
    source = load_recipe(RECIPES / f"pretrain/{data}-xdc.yaml")
    assert recipe.retrain is not None and recipe.clustering is None and recipe.iterations == 1
    assert (recipe.retrain.run, recipe.retrain.encoder, recipe.retrain.init) == (
        source.run.out,
        "video",
        "scratch",
    )
    assert recipe.heads == {"video": {"other": "audio"}} and recipe.views == ("audio",)
    assert recipe.data.shards == source.data.shards and recipe.data.clip_frames == 32
    assert (recipe.optim.batch_size, recipe.optim.lr) == (8, 0.0025)  # Appendix B: 32 / 4 and 0.01 / 4
    last = source.optim_for(source.iterations - 1)  # the schedule of the iteration it re-trains
    assert (recipe.optim.warmup_epochs, recipe.optim.step_epochs, recipe.optim.total_epochs) == (
        last.warmup_epochs,
        last.step_epochs,
        last.total_epochs,
    )


def test_retrain_section_errors(tmp_path: Path) -> None:
    doc = copy.deepcopy(BASE)
    doc["retrain"] = {"run": "runs/x"}
    assert error_of(tmp_path, doc) == (
        "clustering: a retrain run takes the labels and k of retrain.run; remove this section"
    )
    del doc["clustering"]
    assert load_recipe(write(tmp_path, doc)).heads == {"video": {"other": "audio"}}
    assert error_of(tmp_path, {**doc, "retrain": {"run": "r", "encoder": "both"}}) == (
        "retrain.encoder: must be one of 'video' or 'audio' (got 'both')"
    )
    assert error_of(tmp_path, {**doc, "method": "superv"}) == (
        "retrain: re-trains on a clustering run's labels; method superv has none"
    )
    assert error_of(tmp_path, {**doc, "retrain": {"run": "r", "init": "warm"}}).startswith(
        "retrain.init: must be"
    )


def test_sdc_gets_deepcluster_safeguards_and_methods_route_labels() -> None:
    sdc = load_recipe(RECIPES / "pretrain/kinetics-sdc.yaml")
    assert sdc.clustering.uniform_sampling and sdc.clustering.reseed_empty
    assert (
        sdc.clustering.pca == 256 and not sdc.clustering.spherical
    )  # PCA-whitening to 256 + l2 (DeepCluster)
    xdc = load_recipe(RECIPES / "pretrain/kinetics-xdc.yaml")
    assert not xdc.clustering.uniform_sampling
    assert xdc.heads == {"video": {"other": "audio"}, "audio": {"other": "video"}}
    assert load_recipe(RECIPES / "pretrain/kinetics-mdc.yaml").heads["video"] == {
        "own": "video",
        "other": "audio",
    }
    assert load_recipe(RECIPES / "pretrain/kinetics-cdc.yaml").views == ("cdc",)
    superv = load_recipe(RECIPES / "pretrain/kinetics-superv.yaml")
    assert superv.clustering is None and superv.iterations == 1 and superv.views == ()


def test_cpu_recipes_are_cpu_sized() -> None:
    quick = load_recipe(RECIPES / "quickstart.yaml")
    assert quick.data.device == "cpu" and quick.data.shards == "demo/shards"
    assert quick.model.width == 0.25 and quick.data.crop == 112 and quick.data.short_side == 128
    assert 6 <= quick.clustering.k <= 8 and quick.clustering.iterations == 2
    assert quick.optim.epoch_size * quick.optim.total_epochs * quick.iterations <= 2000  # clips in all
    digits = load_recipe(RECIPES / "digits.yaml")
    assert digits.data.shards == "digits/shards" and 10 <= digits.clustering.k <= 32


# --- defaults, dump, digest -------------------------------------------------------------------


def test_defaults_are_resolved_and_dumped(tmp_path: Path) -> None:
    recipe = load_recipe(write(tmp_path, BASE))
    assert recipe.run.out == "runs/t"
    assert recipe.data.val_fraction == 0.05 and recipe.data.train_set == "train"
    assert (recipe.optim.momentum, recipe.optim.gamma, recipe.optim.patience) == (0.9, 0.01, 3)
    assert recipe.clustering.uniform_sampling is False and recipe.clustering.reseed_empty is True
    sdc = load_recipe(write(tmp_path, {**BASE, "method": "sdc"}))
    assert sdc.clustering.uniform_sampling is True
    dumped = yaml.safe_load(dump_recipe(recipe))
    assert dumped["run"]["out"] == "runs/t" and dumped["clustering"]["uniform_sampling"] is False
    with pytest.raises(ValidationError):
        recipe.optim.lr = 1.0  # frozen


def test_digest_follows_what_changes_the_result(tmp_path: Path) -> None:
    path = write(tmp_path, BASE)
    digest = recipe_digest(load_recipe(path))
    assert digest == recipe_digest(load_recipe(path))
    assert len(digest) == 16
    for runtime in ("run.out=elsewhere", "data.num_threads=7", "run.log_every=3", "name=other"):
        assert recipe_digest(load_recipe(path, [runtime])) == digest, runtime
    for change in ("optim.lr=0.02", "clustering.k=7", "seed=1", "data.crop=96"):
        assert recipe_digest(load_recipe(path, [change])) != digest, change
    assert {f.split(".")[0] for f in RUNTIME_FIELDS} <= {"name", "data", "model", "run"}


# --- YAML ------------------------------------------------------------------------------------


def test_exponent_floats_are_numbers_not_strings(tmp_path: Path) -> None:
    text = write(tmp_path, BASE).read_text().replace("lr: 0.05", "lr: 5e-2")
    assert "lr: 5e-2" in text
    recipe = parse_recipe(text + "\n", source="x.yaml")
    assert recipe.optim.lr == 0.05


def test_yaml_problems_name_the_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^x\.yaml: line 2: invalid YAML \(mapping values"):
        parse_recipe("name: t\nmethod: xdc: sdc\n", source="x.yaml")
    with pytest.raises(ConfigError, match=r"x\.yaml: line 3: .*duplicate key 'name'"):
        parse_recipe("name: t\nseed: 1\nname: u\n", source="x.yaml")
    with pytest.raises(ConfigError, match=r"x\.yaml: must be a mapping of sections, got list"):
        parse_recipe("- 1\n", source="x.yaml")
    with pytest.raises(InputError, match="recipe file not found"):
        load_recipe(tmp_path / "absent.yaml")


# --- validation errors ------------------------------------------------------------------------


def test_unknown_keys_are_rejected_with_their_path(tmp_path: Path) -> None:
    doc = copy.deepcopy(BASE)
    doc["optim"]["lrr"] = 0.1
    message = error_of(tmp_path, doc)
    assert message.startswith("optim.lrr: unknown key (expected one of: epoch_size, batch_size, lr,")
    doc = copy.deepcopy(BASE)
    doc["clustering"]["last_iteration"] = {"total_epoch": 30}
    assert error_of(tmp_path, doc).startswith("clustering.last_iteration.total_epoch: unknown key")
    assert error_of(tmp_path, {**BASE, "extra": 1}).startswith("extra: unknown key")


@pytest.mark.parametrize(
    ("section", "key", "value", "expected"),
    [
        ("optim", "lr", -1, "optim.lr: must be > 0 (got -1)"),
        ("optim", "lr", "fast", "optim.lr: must be a number (got 'fast')"),
        ("optim", "batch_size", 8.0, "optim.batch_size: must be an integer (got 8)"),
        ("optim", "early_stop", "yes please", "optim.early_stop: must be true or false (got 'yes please')"),
        ("optim", "momentum", 1.0, "optim.momentum: must be < 1 (got 1)"),
        ("clustering", "k", 1, "clustering.k: must be >= 2 (got 1)"),
        ("data", "device", "tpu", "data.device: must be one of 'cpu' or 'gpu' (got 'tpu')"),
        ("data", "val_fraction", 0.5, "data.val_fraction: must be < 0.5 (got 0.5)"),
        ("model", "precision", "fp8", "model.precision: must be one of 'fp32', 'bf16' or 'fp16' (got 'fp8')"),
        ("model", "width", True, "model.width: must be a number (got true)"),
        ("optim", "lr_scaling", "sqrt", "optim.lr_scaling: must be one of 'linear' or 'none' (got 'sqrt')"),
        ("optim", "warmup_start", 0, "optim.warmup_start: must be > 0 (got 0)"),
    ],
)
def test_bad_values_name_the_field(tmp_path: Path, section: str, key: str, value, expected: str) -> None:
    doc = copy.deepcopy(BASE)
    doc.setdefault(section, {})[key] = value
    assert error_of(tmp_path, doc) == expected


def test_missing_and_malformed_sections(tmp_path: Path) -> None:
    doc = copy.deepcopy(BASE)
    del doc["optim"]["lr"]
    assert error_of(tmp_path, doc) == "optim.lr: required"
    assert error_of(tmp_path, {**BASE, "data": 3}) == "data: must be a mapping of fields (got 3)"
    assert error_of(tmp_path, {**BASE, "method": "dc"}).startswith("method: must be one of 'sdc', 'mdc'")
    doc = copy.deepcopy(BASE)
    doc["clustering"]["k"] = 0
    doc["optim"]["lr"] = 0
    assert error_of(tmp_path, doc) == "clustering.k: must be >= 2 (got 0) (and 1 more)"


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"optim": {"warmup_epochs": 4}}, "optim.warmup_epochs: must be <= total_epochs 3 (got 4)"),
        ({"optim": {"epoch_size": 4}}, "optim.epoch_size: must hold at least one batch of 8 (got 4)"),
        ({"optim": {"step_epochs": 0}}, "optim.step_epochs: must be >= 1 (got 0)"),
        ({"data": {"crop": 160}}, "data.crop: must be <= short_side 128 (got 160)"),
        ({"method": "superv"}, "clustering: method superv trains on the true labels; remove this section"),
        (
            {"data": {"val_fraction": 0.0}, "optim": {"early_stop": True}},
            "optim.early_stop: needs data.val_fraction > 0 to measure a val loss",
        ),
        (
            {"clustering": {"last_iteration": {"warmup_epochs": 9}}},
            "clustering.last_iteration.warmup_epochs: must be <= total_epochs 3 (got 9)",
        ),
        (
            {"run": {"eval_set": "test"}},
            "run.eval_set: is only used by the probe; set run.probe: true or remove it",
        ),
    ],
)
def test_cross_field_checks(tmp_path: Path, change: dict, expected: str) -> None:
    doc = copy.deepcopy(BASE)
    for key, value in change.items():
        if isinstance(value, dict):
            doc.setdefault(key, {}).update(value)
        else:
            doc[key] = value
    assert error_of(tmp_path, doc) == expected


def test_multimodal_methods_need_clustering(tmp_path: Path) -> None:
    doc = {k: v for k, v in BASE.items() if k != "clustering"}
    assert error_of(tmp_path, doc) == "clustering: required for method xdc"
    superv = load_recipe(write(tmp_path, {**doc, "method": "superv"}))
    assert superv.iterations == 1 and superv.heads["video"] == {"true": "true"}


# --- overrides --------------------------------------------------------------------------------


def test_overrides_set_fields_and_revalidate(tmp_path: Path) -> None:
    path = write(tmp_path, BASE)
    recipe = load_recipe(
        path,
        [
            "optim.lr=1e-3",
            "clustering.k=512",
            "seed=3",
            "clustering.pca=null",
            "clustering.last_iteration.total_epochs=30",
            "run.probe=true",
            "data.shards=/data/kinetics",
        ],
    )
    assert recipe.optim.lr == 0.001 and recipe.clustering.k == 512 and recipe.seed == 3
    assert recipe.optim_for(1).total_epochs == 30 and recipe.optim_for(0).total_epochs == 3
    assert recipe.run.probe is True and recipe.data.shards == "/data/kinetics"
    # the override is validated like the file
    with pytest.raises(ConfigError, match=r"r.yaml: optim.lr: must be > 0 \(got -0.1\)"):
        load_recipe(path, ["optim.lr=-0.1"])


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("optim.lrr=0.1", "override 'optim.lrr=0.1': unknown field optim.lrr (optim has epoch_size,"),
        ("optimizer.lr=0.1", "override 'optimizer.lr=0.1': unknown field optimizer.lr (the recipe has name,"),
        ("clustering.k.x=1", "override 'clustering.k.x=1': clustering.k is not a section"),
        ("optim.lr", "override 'optim.lr': expected section.key=value"),
        ("=3", "override '=3': expected section.key=value"),
        ("optim.lr=[0.1", "override 'optim.lr=[0.1': the value is not valid YAML"),
    ],
)
def test_bad_overrides_fail_naming_them(tmp_path: Path, override: str, expected: str) -> None:
    assert error_of(tmp_path, BASE, (override,)).startswith(expected)


# --- the resolved config: `xdctools train --print-config` -------------------------------------


def print_config(*args: str) -> dict:
    from click.testing import CliRunner

    from xdctools.commands.train import train

    result = CliRunner().invoke(train, [*args, "--print-config"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return yaml.safe_load(result.output)


def test_print_config_resolves_the_kinetics_recipe_on_8_gpus(tmp_path: Path) -> None:
    """The paper's toolchain on 8 GPUs: global batch 8 x 32, lr 8 x 0.01, steps of the global batch."""
    doc = print_config(str(RECIPES / "pretrain/kinetics-xdc.yaml"), "--world-size", "8")
    assert doc["effective"] == {
        "world_size": 8,
        "global_batch": 256,
        "lr": 0.08,
        "warmup_start_lr": 0.01,
        "steps_per_epoch": 3906,
        "warmup_steps": 39060,
        "decay_steps": [78120],
        "total_steps": 117180,
    }
    resolved = {k: v for k, v in doc.items() if k != "effective"}
    assert parse_recipe(yaml.safe_dump(resolved)) == load_recipe(RECIPES / "pretrain/kinetics-xdc.yaml")
    assert not (tmp_path / "runs").exists() and not Path("runs/kinetics-xdc").exists()  # touched no data


def test_print_config_takes_overrides_and_the_last_iteration() -> None:
    doc = print_config(
        str(RECIPES / "pretrain/ig65m-xdc.yaml"), "--world-size", "64", "--set", "optim.lr=0.02"
    )
    assert doc["optim"]["lr"] == 0.02 and doc["effective"]["lr"] == pytest.approx(1.28)
    last = doc["effective"]["last_iteration"]  # IG65M*: 0/9/30 epochs
    assert last["warmup_steps"] == 0 and last["total_steps"] == 30 * last["steps_per_epoch"]
    assert last["decay_steps"] == [
        9 * last["steps_per_epoch"],
        18 * last["steps_per_epoch"],
        27 * last["steps_per_epoch"],
    ]
    one = print_config(str(RECIPES / "pretrain/kinetics-xdc.yaml"), "--set", "optim.lr_scaling=none")
    assert one["effective"]["world_size"] == 1 and one["effective"]["lr"] == 0.01


def test_print_config_errors_are_one_line(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from xdctools.commands.train import train

    kinetics = str(RECIPES / "pretrain/kinetics-xdc.yaml")
    result = CliRunner().invoke(train, [kinetics, "--world-size", "8"])
    assert result.exit_code == 2 and "--world-size only applies to --print-config" in result.output
    result = CliRunner().invoke(train, [kinetics, "--print-config", "--set", "optim.lr_scaling=sqrt"])
    assert result.exit_code == 4
    assert "optim.lr_scaling: must be one of 'linear' or 'none' (got 'sqrt')" in result.output
    result = CliRunner().invoke(train, [kinetics, "--print-config", "--world-size", "100000"])
    assert result.exit_code == 4 and "one global batch" in result.output


# --- one k per view -------------------------------------------------------------------------------


def test_k_per_view_sizes_each_head_by_the_view_it_learns(tmp_path: Path) -> None:
    doc = copy.deepcopy(BASE)
    doc["clustering"]["k"] = {"video": 64, "audio": 128}  # the paper's Tables 13/14
    recipe = load_recipe(write(tmp_path, doc))
    c = recipe.clustering
    assert (c.k_for("video"), c.k_for("audio"), c.k_text) == (64, 128, "video 64, audio 128")
    from trainer.labels import fixed_labels
    from trainer.session import build_learner

    learner = build_learner(recipe, fixed_labels(recipe, None, None)[1])
    sizes = {
        enc: learner.heads[enc](torch.zeros(1, learner.encoders[enc].feature_dim))
        for enc in ("video", "audio")
    }
    assert sizes["video"]["other"].shape == (1, 128)  # XDC's video encoder learns the 128 audio clusters
    assert sizes["audio"]["other"].shape == (1, 64)
    assert parse_recipe(dump_recipe(recipe)) == recipe
    one = load_recipe(write(tmp_path, BASE))
    assert one.clustering.k_for("audio") == one.clustering.k_for("cdc") == 6 and one.clustering.k_text == "6"
    assert recipe_digest(one) == recipe_digest(load_recipe(write(tmp_path, BASE), ["clustering.k=6"]))
    per_view = load_recipe(write(tmp_path, BASE), ["clustering.k={video: 8, audio: 16}"])
    assert per_view.clustering.k.audio == 16


def test_init_seed_fixes_the_weights_alone_and_seed_the_rest(tmp_path: Path) -> None:
    """model.init_seed: the encoders' first weights follow it whatever `seed` is; without it, `seed`."""
    from trainer.labels import fixed_labels
    from trainer.session import build_learner

    def weights(*overrides: str) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        recipe = load_recipe(write(tmp_path, BASE), list(overrides))
        learner = build_learner(recipe, fixed_labels(recipe, None, None)[1])
        after = torch.rand(4)  # the global generator after the build: what `seed` goes on to decide
        return {k: v.clone() for k, v in learner.encoders.state_dict().items()}, after

    def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
        return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    plain0, _ = weights("seed=0")
    plain3, _ = weights("seed=3")
    w3_s0, after_s0 = weights("seed=0", "model.init_seed=3")
    w3_s3, after_s3 = weights("seed=3", "model.init_seed=3")
    assert not same(plain0, plain3)
    assert same(w3_s0, w3_s3) and same(w3_s3, plain3)  # the weights of seed 3, under either seed
    assert not torch.equal(after_s0, after_s3)  # the rest still follows `seed`
    assert same(weights("seed=0", "model.init_seed=0")[0], plain0)
    with pytest.raises(ConfigError, match=r"model\.init_seed"):
        load_recipe(write(tmp_path, BASE), ["model.init_seed=-1"])


def test_zero_init_residual_starts_every_block_of_both_encoders_as_the_identity(tmp_path: Path) -> None:
    from trainer.labels import fixed_labels
    from trainer.models.blocks import BasicBlock2d, BasicBlock3d
    from trainer.session import build_learner

    def last_norms(*overrides: str) -> list[torch.Tensor]:
        recipe = load_recipe(write(tmp_path, BASE), list(overrides))
        learner = build_learner(recipe, fixed_labels(recipe, None, None)[1])
        blocks = [m for m in learner.encoders.modules() if isinstance(m, (BasicBlock2d, BasicBlock3d))]
        return [b.conv2[1].weight if isinstance(b, BasicBlock3d) else b.bn2.weight for b in blocks]

    zeroed, plain = last_norms("model.zero_init_residual=true"), last_norms()
    assert len(zeroed) == 16  # 8 blocks in each ResNet-18
    assert all(torch.count_nonzero(w) == 0 for w in zeroed)
    assert all(torch.all(w == 1) for w in plain)


@pytest.mark.parametrize(
    ("k", "expected"),
    [
        ({"video": 1, "audio": 4}, "clustering.k.video: must be >= 2 (got 1)"),
        ({"video": 64}, "clustering.k.audio: required"),
        (
            {"video": 64, "audio": 8, "cdc": 4},
            "clustering.k.cdc: unknown key (expected one of: video, audio)",
        ),
        ("many", "clustering.k: must be an integer (got 'many')"),
        (1, "clustering.k: must be >= 2 (got 1)"),
    ],
)
def test_bad_k_names_the_field(tmp_path: Path, k, expected: str) -> None:
    doc = copy.deepcopy(BASE)
    doc["clustering"]["k"] = k
    assert error_of(tmp_path, doc) == expected


def test_cdc_keeps_one_k(tmp_path: Path) -> None:
    doc = copy.deepcopy(BASE)
    doc.update(method="cdc")
    doc["clustering"]["k"] = {"video": 64, "audio": 128}
    assert error_of(tmp_path, doc) == (
        "clustering.k: cdc clusters the joint features with one k; give a number, not one per view"
    )
