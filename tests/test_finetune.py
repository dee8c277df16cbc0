"""Downstream evaluation (trainer.evaluate: finetune, svm, results; `xdctools finetune`) on real shards.

Shards come from the real pipeline: synth videos split by a manifest, FSDD recordings laid out as
ESC-50, the real UCF101/HMDB51 clips of ../shared/data with their official split files, and real
AudioSet csv rows (multi-label) with real clips linked under their YouTube ids.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from field_reads import all_fields, field_reads

from trainer.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint
from trainer.data import ClipSpec, Runtime, eval_loader, train_loader
from trainer.evaluate.encoders import EncoderSource, build_encoder, encoder_state, make_classifier, set_mode
from trainer.evaluate.finetune import SplitResult, run_finetune, summarise_sweep
from trainer.evaluate.results import merge_entry, read_results
from trainer.evaluate.run import run_dir
from trainer.evaluate.scoring import ClipRows, clip_probabilities, video_scores
from trainer.evaluate.splits import (
    MultiHot,
    Split,
    check_multi_label_splits,
    empty_label_lists,
    multi_label_catalog,
    open_sets,
    read_dataset,
    resolve_splits,
    video_names,
)
from trainer.evaluate.svm import ClipFeatures, fit_svm
from trainer.evaluate.train import batch_loss, make_optimizer, train_epoch
from trainer.extract import read_catalog
from trainer.log import read_metrics
from trainer.metrics import mean_average_precision
from trainer.models import MultiHead, r2plus1d_18, resnet18_audio
from trainer.step import Learner
from xdctools import eval_recipe as er
from xdctools.commands.finetune import finetune
from xdctools.commands.shard import shard
from xdctools.errors import ConfigError, DataError, InputError
from xdctools.eval_recipe import TABLE_12_LRS, eval_digest, load_eval_recipe, parse_eval_recipe
from xdctools.shard.params import ShardParams
from xdctools.shard.plan import build_plan
from xdctools.shard.run import run_shard

ROOT = Path(__file__).resolve().parents[1]
EVAL_RECIPES = sorted((ROOT / "recipes" / "eval").glob("*.yaml"))
WIDTH = 0.0625  # 4..32 channels: a few ms per clip on a CPU
SMALL = ClipSpec(length=4, crop=32)


def _shard(plan, out: Path, short_side: int = 48) -> Path:
    run_shard(plan, ShardParams(short_side=short_side), out, shard_size=3, workers=1)
    return out


@pytest.fixture(scope="module")
def hmdb_shards(tmp_path_factory, media_dir: Path, splits_dir: Path) -> Path:
    """The 4 real HMDB51 clips sharded with all 3 official splits."""
    plan = build_plan(media_dir / "hmdb51", splits=splits_dir / "hmdb51", split_ids="all")
    return _shard(plan, tmp_path_factory.mktemp("hmdb") / "shards")


def _recipe(shards: Path, out: Path, *extra: str, dataset: str = "tiny", mode: str = "full"):
    text = f"""
name: t
dataset: {dataset}
mode: {mode}
data: {{shards: {shards}, modality: video, split_layout: train-test, splits: [1], clip_frames: 4, crop: 32,
        num_threads: 2}}
model: {{width: {WIDTH}}}
optim: {{epoch_size: 8, batch_size: 4, lr: 0.05, warmup_epochs: 0, step_epochs: 1, total_epochs: 1}}
test: {{num_clips: 10, batch_size: 4}}
run: {{out: {out}}}
"""
    return parse_eval_recipe(text, overrides=extra)


# --- recipes -----------------------------------------------------------------------------------


def test_eval_recipes_follow_tables_11_and_12() -> None:
    stems = {p.stem for p in EVAL_RECIPES}
    assert stems >= {"ucf101", "hmdb51", "esc50", "dcase", "ucf101-32f", "hmdb51-32f"}
    epochs = {"ucf101": 106_000, "hmdb51": 40_000, "esc50": 20_000}
    # Table 12 as printed, and / 4 for 32-frame clips (Appendix B)
    paper = {
        "full": (0.001, 0.002, 0.004, 0.006, 0.008, 0.01),
        "fc": (0.001, 0.002, 0.004, 0.006, 0.008, 0.01, 0.02, 0.04),
    }
    quarter = {
        "full": (0.00025, 0.0005, 0.001, 0.0015, 0.002, 0.0025),
        "fc": (0.00025, 0.0005, 0.001, 0.0015, 0.002, 0.0025, 0.005, 0.01),
    }
    for path in EVAL_RECIPES:
        r = load_eval_recipe(path)  # every shipped recipe validates
        if r.dataset not in ("ucf101", "hmdb51", "esc50", "dcase"):
            continue  # CPU-sized recipes (digits) are not the paper's settings
        if r.mode == "svm":
            assert r.svm.num_clips == 60 and r.data.modality == "audio"
            continue
        o = r.optim
        frames32 = path.stem.endswith("-32f")  # Table 7: 32-frame clips, batch 8, lr / 4 (Appendix B)
        batch, frames, lr, factor = (8, 32, 0.001, 0.25) if frames32 else (32, 8, 0.004, 1.0)
        table_11 = (epochs[r.dataset], batch, 0.005, 0.01)
        assert (o.epoch_size, o.batch_size, o.weight_decay, o.gamma) == table_11
        assert (o.warmup_epochs, o.step_epochs, o.total_epochs, r.test.num_clips) == (2, 2, 8, 10)
        assert (r.data.clip_frames, o.lr, o.lr_factor, o.lrs) == (frames, lr, factor, None)
        assert o.lr_scaling == "linear"  # batch per GPU, each lr x world size, as pretraining
        assert len(r.data.splits) == (5 if r.dataset == "esc50" else 3)
        for mode in ("full", "fc"):
            swept = load_eval_recipe(path, ["optim.sweep=true", f"mode={mode}"])
            assert swept.lrs == (quarter if frames32 else paper)[mode]
    assert paper == TABLE_12_LRS
    for name in ("ucf101", "hmdb51"):  # the 32-frame recipes are the 8-frame ones but for Appendix B
        eight, thirty_two = (
            _flat(load_eval_recipe(ROOT / "recipes" / "eval" / f"{n}.yaml").model_dump())
            for n in (name, f"{name}-32f")
        )
        assert eight.keys() == thirty_two.keys()
        # run.out: a table apart (the two recipes would refuse each other's run folders)
        changed = {"name", "data.clip_frames", "optim.batch_size", "optim.lr", "optim.lr_factor", "run.out"}
        assert {k for k, v in eight.items() if thirty_two[k] != v} == changed


def _flat(doc: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in doc.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def test_lr_factor_scales_table_12_only() -> None:
    base = "name: t\ndataset: ucf101\nmode: fc\ndata: {shards: s}\noptim: {sweep: true, lr: 0.004}\n"
    tenth = parse_eval_recipe(base, overrides=["optim.lr_factor=0.1"])
    # Table 12's fc grid x 0.1, rounded (0.006 x 0.1 is 0.0006000000000000001 in floats)
    assert tenth.lrs == (0.0001, 0.0002, 0.0004, 0.0006, 0.0008, 0.001, 0.002, 0.004)
    explicit = parse_eval_recipe(base, overrides=["optim.lr_factor=0.25", "optim.lrs=[0.01, 0.03]"])
    assert explicit.lrs == (0.01, 0.03)  # an explicit list is used as written
    single = parse_eval_recipe(base, overrides=["optim.lr_factor=0.25", "optim.sweep=false"])
    assert single.lrs == (0.004,)  # so is the single lr
    # it only chooses which lrs run: a (lr, split) digest holds its lr, so it leaves digests alone
    extra = {"lr": 0.001, "split": "split1"}
    assert eval_digest(tenth, extra) == eval_digest(parse_eval_recipe(base), extra)
    with pytest.raises(ConfigError, match=r"optim\.lr_factor: must be > 0 \(got 0\)"):
        parse_eval_recipe(base, overrides=["optim.lr_factor=0"])


def test_recipe_errors_name_the_field(tmp_path: Path) -> None:
    base = "name: t\ndataset: ucf101\nmode: full\ndata: {shards: s}\n"
    cases = {
        "optim: {lr: -1}": "optim.lr: must be > 0",
        "optim: {sweep: true, lrs: [0.01, 0.01]}": "optim.lrs: lists a learning rate twice",
        "optim: {lr: 0.1, epochs: 3}": "optim.epochs: unknown key",
        "optim: {}": "optim.lr: required unless optim.sweep",
    }
    for text, message in cases.items():
        with pytest.raises(ConfigError, match=message):
            parse_eval_recipe(base + text)
    with pytest.raises(ConfigError, match=r"data\.splits\.0\.test: required"):
        parse_eval_recipe(base.replace("{shards: s}", "{shards: s, splits: [{name: a, train: [b]}]}"))
    with pytest.raises(ConfigError, match=r"optim\.epoch_size: required"):
        parse_eval_recipe(
            base.replace("ucf101", "mine") + "optim: {lr: 0.1}",
            overrides=["data.modality=video", "data.split_layout=folds", "data.splits=[1]"],
        )
    with pytest.raises(ConfigError, match=r"unknown field optim\.lrr"):
        parse_eval_recipe(base, overrides=["optim.lrr=1"])
    with pytest.raises(InputError, match="recipe file not found"):
        load_eval_recipe(tmp_path / "nope.yaml")


# --- transfer modes ------------------------------------------------------------------------------


def test_fc_only_keeps_the_encoder_and_bn_stats_full_finetuning_changes_them(
    synth_shards: Path, tmp_path
) -> None:
    shards = open_sets(synth_shards, ["split1-train"], video=True)
    torch.manual_seed(0)
    pretrained = r2plus1d_18(width=WIDTH).state_dict()  # stands for any checkpoint: weights + BN stats
    for mode in ("fc", "full"):
        recipe = _recipe(synth_shards, tmp_path, f"mode={mode}")
        encoder = r2plus1d_18(width=WIDTH)
        encoder.load_state_dict(pretrained)
        model = make_classifier(encoder, 2, mode)
        head_before = {k: v.clone() for k, v in model.head.state_dict().items()}
        optimizer, scheduler = make_optimizer(model, recipe, 0.05)
        loader = train_loader(shards, batch_size=4, epoch_size=4, clip=SMALL, run=Runtime(num_threads=2))
        loss, _, _ = train_epoch(model, loader, optimizer, scheduler, mode=mode, modality="video")
        assert np.isfinite(loss) and scheduler.steps == 1
        after = model.encoder.state_dict()
        assert any(not torch.equal(v, model.head.state_dict()[k]) for k, v in head_before.items())
        stats = [k for k in after if k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
        if mode == "fc":
            assert all(torch.equal(after[k], pretrained[k]) for k in after), "fc-only changed the encoder"
            assert not any(p.requires_grad for p in model.encoder.parameters())
        else:
            assert all(not torch.equal(after[k], pretrained[k]) for k in stats if "running" in k)
            assert not torch.equal(after["stem.0.weight"], pretrained["stem.0.weight"])


def test_finetuning_scales_each_base_lr_with_the_gpus(synth_shards: Path, tmp_path: Path) -> None:
    """Table 11/12 terms as pretraining: per-GPU batch, each grid lr x world size, Goyal warmup."""
    paper = _recipe(
        synth_shards,
        tmp_path,
        "optim.epoch_size=106000",
        "optim.batch_size=32",
        "optim.warmup_epochs=2",
        "optim.step_epochs=2",
        "optim.total_epochs=8",
    )
    model = make_classifier(r2plus1d_18(width=WIDTH), 2, "full")
    _, on_8 = make_optimizer(model, paper, 0.004, world_size=8)
    assert on_8.steps_per_epoch == 106_000 // 256 and on_8.lr == pytest.approx(0.004)  # warmup from the base
    on_8.steps = 2 * on_8.steps_per_epoch
    assert on_8.lr == pytest.approx(0.032)  # 8 x 0.004 after warmup
    unscaled = _recipe(synth_shards, tmp_path, "optim.epoch_size=106000", "optim.lr_scaling=none")
    _, flat = make_optimizer(model, unscaled, 0.004, world_size=8)
    assert flat.lr == pytest.approx(0.004) and flat.schedule.base_lr == pytest.approx(0.004)


class _Features(torch.nn.Module):
    """Encoder whose pooled features are its input: the head alone is under test."""

    feature_dim = 8

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return x


def test_head_norm_reaches_features_with_a_tiny_spread() -> None:
    # Separable features with a spread of 0.007 around 0.23, as the digits XDC audio encoder gives.
    gen = torch.Generator().manual_seed(0)
    y = torch.randint(0, 2, (512,), generator=gen)
    x = 0.23 + 0.007 * (torch.randn(512, 8, generator=gen) + 2.0 * (2 * y[:, None] - 1))
    accuracy = {}
    for norm in (False, True):
        torch.manual_seed(0)
        model = make_classifier(_Features(), 2, "fc", head_norm=norm)
        assert isinstance(model.head, torch.nn.Sequential) == norm
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.02, momentum=0.9)
        for i in range(48):  # the digits fc schedule: 48 steps of 32
            batch = slice(32 * (i % 16), 32 * (i % 16) + 32)
            loss = torch.nn.functional.cross_entropy(model(x[batch]), y[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
        accuracy[norm] = (model(x).argmax(1) == y).float().mean().item()
        if norm:  # test-time statistics are the features' own, not a decayed start value of 1
            bn = model.head[0]
            torch.testing.assert_close(bn.running_mean, x.mean(0), rtol=0, atol=1e-3)
            torch.testing.assert_close(bn.running_var, x.var(0), rtol=0.15, atol=0)
    assert accuracy[True] > 0.95 and accuracy[False] < 0.75, accuracy


def test_video_prediction_is_the_mean_of_its_clips_softmax(synth_shards: Path) -> None:
    shards = open_sets(synth_shards, ["split1-test"], video=True)
    torch.manual_seed(1)
    model = make_classifier(r2plus1d_18(width=WIDTH), 2, "full")
    set_mode(model, "full", training=False)
    loader = eval_loader(shards, batch_size=4, num_clips=10, clip=SMALL, run=Runtime(num_threads=2))
    batches = list(loader)
    rows = clip_probabilities(model, batches, modality="video", device=torch.device("cpu"))
    scores = video_scores(rows, 10)
    assert len(scores.videos) == 2 and np.array_equal(np.bincount(rows.clip), [2] * 10)
    # the first video's clips each on their own (batch of one), softmax, then the plain mean of the 10
    index = torch.cat([b["index"] for b in batches]).numpy()
    clips = torch.cat([b["video"] for b in batches])[index == scores.videos[0]]
    assert len(clips) == 10
    with torch.no_grad():
        single = np.stack([torch.softmax(model(c[None]), 1)[0].numpy() for c in clips])
    np.testing.assert_allclose(scores.probs[0], single.mean(axis=0), atol=1e-5)
    assert scores.accuracy == float((scores.predicted == scores.labels).mean())


def test_softmax_average_is_what_decides_not_the_logit_average() -> None:
    # one confident clip for class 0, two moderate ones for class 1: the two averages disagree
    logits = np.array([[5.5, 0.0], [0.0, 2.0], [0.0, 2.0]])
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    rows = ClipRows(np.zeros(3, np.int64), np.arange(3), np.ones(3, np.int64), probs.astype(np.float32))
    assert logits.mean(0).argmax() == 0
    scores = video_scores(rows, 3)
    assert scores.predicted.tolist() == [1] and scores.accuracy == 1.0
    with pytest.raises(DataError, match="video 0 yielded 3 clips, not 10"):
        video_scores(rows, 10)


# --- splits --------------------------------------------------------------------------------------


def test_split_bookkeeping_on_the_real_hmdb51_split_files(
    hmdb_shards: Path, media_dir: Path, splits_dir: Path
):
    # what the official files say about the clips on disk, read here independently: 1 train, 2 test
    expected: dict[int, dict[str, set[str]]] = {n: {"train": set(), "test": set()} for n in (1, 2, 3)}
    for path in sorted((splits_dir / "hmdb51" / "testTrainMulti_7030_splits").glob("*_test_split*.txt")):
        label, _, split = path.stem.rpartition("_test_split")
        for line in path.read_text().splitlines():
            video, _, mark = line.strip().rpartition(" ")
            if (media_dir / "hmdb51" / label / video).exists() and mark in ("1", "2"):
                expected[int(split)]["train" if mark == "1" else "test"].add(f"{label}/{video}")
    assert sum(len(s["test"]) for s in expected.values()) == 3  # each split tests one of the 4 clips

    recipe = _recipe(hmdb_shards, Path("unused"), "data.splits=[1, 2, 3]", dataset="hmdb51")
    doc = read_dataset(hmdb_shards)
    splits = resolve_splits(recipe, doc)
    assert [(s.name, s.train, s.test) for s in splits] == [
        (f"split{n}", (f"split{n}-train",), f"split{n}-test") for n in (1, 2, 3)
    ]
    for n, split in enumerate(splits, start=1):
        train = video_names(open_sets(hmdb_shards, split.train, video=True))
        test = video_names(open_sets(hmdb_shards, [split.test], video=True))
        assert set(train.values()) == expected[n]["train"] and set(test.values()) == expected[n]["test"]
        assert not set(train.values()) & set(test.values())


def test_esc50_folds_test_one_fold_and_train_on_the_four_others(esc_shards: Path) -> None:
    recipe = parse_eval_recipe(
        f"name: e\ndataset: esc50\nmode: full\ndata: {{shards: {esc_shards}}}\noptim: {{lr: 0.1}}"
    )
    splits = resolve_splits(recipe, read_dataset(esc_shards))
    assert [s.name for s in splits] == [f"fold{k}" for k in range(1, 6)]
    for k, split in enumerate(splits, start=1):
        assert split.test == f"fold{k}" and split.train == tuple(f"fold{j}" for j in range(1, 6) if j != k)
        test = video_names(open_sets(esc_shards, [split.test], video=False))
        assert sorted(test.values()) == [f"0_jackson_{k}.wav", f"1_jackson_{k}.wav"]
        train = {
            n
            for name in split.train
            for n in video_names(open_sets(esc_shards, [name], video=False)).values()
        }
        assert train == {f"{d}_jackson_{j}.wav" for d in (0, 1) for j in range(1, 6) if j != k}


def test_missing_split_fails_cleanly(tmp_path: Path, media_dir: Path, splits_dir: Path) -> None:
    # both real UCF101 clips are in trainlist01: split 1 has no test set in the shards
    plan = build_plan(media_dir / "UCF-101", splits=splits_dir / "ucf101", split_ids=[1])
    shards = _shard(plan, tmp_path / "ucf")
    recipe = _recipe(shards, tmp_path / "out", dataset="ucf101")
    with pytest.raises(
        DataError,
        match=r"split split1 needs test set 'split1-test', which the shards lack.*"
        r"\(sets: split1-train\)",
    ):
        run_finetune(recipe)
    result = CliRunner().invoke(finetune, [str(tmp_path / "r.yaml")])
    assert result.exit_code == InputError.exit_code and "recipe file not found" in result.output


# --- checkpoints ---------------------------------------------------------------------------------


def test_checkpoints_of_every_kind_load_and_bad_ones_name_the_keys(tmp_path: Path) -> None:
    torch.manual_seed(0)
    video, audio = r2plus1d_18(width=WIDTH), resnet18_audio(width=WIDTH)
    learner = Learner(
        {"video": video, "audio": audio}, {m: MultiHead(32, {"other": 3}) for m in ("video", "audio")}
    )
    ours = tmp_path / "encoders.pt"  # the format trainer.outcome writes
    save_checkpoint(ours, {"config": {"width": WIDTH, "bn_eps": 1e-5}, "model": learner.state_dict()})
    xdc = tmp_path / "xdc.pth"  # a bare XDC-layout state dict with an fc, as the official release
    torch.save({"state_dict": r2plus1d_18(width=WIDTH, layout="xdc", num_classes=5).state_dict()}, xdc)

    def recipe(checkpoint: Path | None, modality: str = "video"):
        data = f"{{shards: s, modality: {modality}, split_layout: folds, splits: [1]}}"
        text = f"name: c\ndataset: x\nmode: fc\ndata: {data}"
        return parse_eval_recipe(
            text,
            overrides=[
                f"model.checkpoint={json.dumps(str(checkpoint))}",
                "optim.epoch_size=64",
                "optim.lr=0.1",
            ],
        )

    for modality, original in (("video", video), ("audio", audio)):
        encoder, source = build_encoder(recipe(ours, modality))
        assert source.kind == "xdctools" and encoder.fc is None
        assert all(torch.equal(v, original.state_dict()[k]) for k, v in encoder.state_dict().items())
    encoder, source = build_encoder(recipe(xdc))
    assert (source.kind, source.layout, encoder.fc) == ("state dict", "xdc", None)
    assert encoder.stem[1].eps == 1e-3  # the released weights came from Caffe2

    bad = video.state_dict()
    bad.pop("layer3.1.conv2.0.0.weight")
    bad["layer4.0.conv2.1.weight"] = torch.zeros(7)
    torch.save(bad, tmp_path / "bad.pt")
    with pytest.raises(
        DataError,
        match=r"bad\.pt: torchvision-layout checkpoint does not match the model: "
        r"missing: layer3\.1\.conv2\.0\.0\.weight; shape: layer4\.0\.conv2\.1\.weight",
    ):
        build_encoder(recipe(tmp_path / "bad.pt"))
    audio_state = audio.state_dict()
    audio_state.pop("layer2.1.bn1.running_var")
    torch.save(audio_state, tmp_path / "audio.pt")
    with pytest.raises(
        DataError, match=r"does not fit the audio ResNet-18: missing: layer2\.1\.bn1\.running_var"
    ):
        build_encoder(recipe(tmp_path / "audio.pt", "audio"))
    with pytest.raises(DataError, match="holds an audio encoder"):
        build_encoder(recipe(tmp_path / "audio.pt"))
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(DataError, match="cannot read checkpoint"):
        build_encoder(recipe(tmp_path / "junk.pt"))
    with pytest.raises(InputError, match="checkpoint not found"):
        build_encoder(recipe(tmp_path / "absent.pt"))
    with pytest.raises(DataError, match="training checkpoint holds no audio encoder"):
        encoder_state(
            {"format": 1, "state": {"model": {"encoders.video.x": torch.zeros(1)}}}, "audio", source="s"
        )


# --- end to end ----------------------------------------------------------------------------------


def test_finetune_end_to_end_sweeps_resumes_and_merges_the_table(synth_shards: Path, tmp_path: Path) -> None:
    out = tmp_path / "eval"
    path = tmp_path / "tiny.yaml"
    path.write_text(f"""
name: tiny
dataset: tiny
mode: full
data: {{shards: {synth_shards}, modality: video, split_layout: train-test, splits: [1], clip_frames: 4,
        crop: 32, num_threads: 2}}
model: {{width: {WIDTH}, method: Scratch}}
optim: {{epoch_size: 8, batch_size: 4, lrs: [0.01, 0.05], warmup_epochs: 0, step_epochs: 1, total_epochs: 1}}
test: {{num_clips: 10, batch_size: 4}}
run: {{out: {out}, keep_checkpoints: 2}}
""")
    runner = CliRunner()
    with field_reads() as reads:  # no flag that nothing reads: every field but the SVM's is read
        result = runner.invoke(finetune, [str(path), "--lr-sweep", "--checkpoint", "none"])
        # an explicit split (the SplitSets form) is read when the splits are resolved
        explicit = _recipe(
            synth_shards, tmp_path, "data.splits=[{name: s1, train: [split1-train], test: split1-test}]"
        )
        resolve_splits(explicit, read_dataset(synth_shards))
        # the lrs of a sweep over Table 12's grid (this run's are explicit) read optim.lr_factor
        assert load_eval_recipe(ROOT / "recipes" / "eval" / "ucf101-32f.yaml", ["optim.sweep=true"]).lrs
    assert result.exit_code == 0, result.output
    assert "best lr" in result.output and "test accuracy" in result.output
    sections = (er.EvalRecipe, er.SplitSets, er.Data, er.Model, er.Optim, er.Test, er.Run)
    only_svm_or_audio = {("EvalRecipe", "svm"), ("Model", "audio_maxpool")}  # read by the SVM test below
    assert all_fields(*sections) - reads == only_svm_or_audio
    entries = read_results(out)
    assert [(e["method"], e["dataset"], e["column"]) for e in entries] == [("Scratch", "tiny-video", "all")]
    entry = entries[0]
    assert [row["lr"] for row in entry["sweep"]] == [0.01, 0.05] and entry["best_lr"] in (0.01, 0.05)
    assert entry["accuracy"] == max(row["mean"] for row in entry["sweep"])
    for lr in ("0.01", "0.05"):
        folder = out / "tiny-video" / "scratch" / "full" / f"lr{lr}" / "split1"
        done = json.loads((folder / "result.json").read_text())
        assert done["videos"] == 2 and done["accuracy"] in (0.0, 0.5, 1.0)
        lines = (folder / "predictions.csv").read_text().splitlines()
        assert lines[0].startswith("video,name,label") and len(lines) == 3
        schedule = [r for r in read_metrics(folder) if r["event"] == "schedule"]
        assert [(r["world_size"], r["global_batch"], r["lr"], r["steps_per_epoch"]) for r in schedule] == [
            (1, 4, float(lr), 2)
        ]
    md = (out / "results.md").read_text()
    assert "| Method | Pretraining | TINY video all |" in md and "| Scratch | None |" in md and "**lr " in md

    # the same pair in another folder writes the same checkpoint bytes: every RNG it saves was seeded
    random.random(), np.random.random()  # whatever this process drew before does not matter
    again = tmp_path / "again"
    result = runner.invoke(
        finetune, [str(path), "--lr-sweep", "--set", "optim.lrs=[0.05]", "--set", f"run.out={again}"]
    )
    assert result.exit_code == 0, result.output
    first = list_checkpoints(out / "tiny-video" / "scratch" / "full" / "lr0.05" / "split1")
    second = list_checkpoints(again / "tiny-video" / "scratch" / "full" / "lr0.05" / "split1")
    assert first and [c[:2] for c in first] == [c[:2] for c in second]
    assert all(a[2].read_bytes() == b[2].read_bytes() for a, b in zip(first, second, strict=True))

    # a rerun skips what is done; a lost result resumes from the last epoch's checkpoint
    folder = out / "tiny-video" / "scratch" / "full" / "lr0.05" / "split1"
    (folder / "result.json").unlink()
    result = runner.invoke(finetune, [str(path), "--lr-sweep"])
    assert result.exit_code == 0, result.output
    assert "lr 0.01: done before" in result.output and "lr 0.05: resuming after epoch 1" in result.output
    assert len(list_checkpoints(folder)) == 1

    # fc-only from our training checkpoint fills another column of the same table
    torch.manual_seed(0)
    video = r2plus1d_18(width=WIDTH)
    learner = Learner(
        {"video": video, "audio": resnet18_audio(width=WIDTH)},
        {m: MultiHead(32, {"own": 4}) for m in ("video", "audio")},
    )
    ours = tmp_path / "it003.pt"
    save_checkpoint(ours, {"config": {"width": WIDTH}, "model": learner.state_dict()}, digest="d")
    result = runner.invoke(
        finetune,
        [
            str(path),
            "--mode",
            "fc",
            "--checkpoint",
            str(ours),
            "--set",
            "model.method=XDC",
            "--set",
            "model.pretraining=synth",
            "--set",
            "optim.lr=0.05",
            "--quiet",
        ],
    )
    assert result.exit_code == 0, result.output
    assert result.output.startswith("XDC on TINY video (fc):")
    table = {(e["method"], e["column"]): e for e in read_results(out)}
    assert set(table) == {("Scratch", "all"), ("XDC", "fc")}
    assert table[("XDC", "fc")]["checkpoint_kind"] == "xdctools"
    assert "| XDC | synth | " in (out / "results.md").read_text()

    # the same (lr, split) folder under a changed recipe is refused, not mixed
    result = runner.invoke(finetune, [str(path), "--lr-sweep", "--set", "optim.momentum=0.5"])
    assert result.exit_code == DataError.exit_code and "written by another recipe" in result.output


def test_results_table_merges_rows_and_marks_partial_splits(tmp_path: Path) -> None:
    recipe = parse_eval_recipe(
        "name: u\ndataset: ucf101\nmode: fc\ndata: {shards: s, splits: [1]}\noptim: {lr: 0.1}"
    )
    source = EncoderSource("scratch")
    done = [
        SplitResult("split1", lr, acc, 10, int(10 * acc), 8, 0.1, 1.0, "d")
        for lr, acc in ((0.01, 0.4), (0.02, 0.6))
    ]
    entry = summarise_sweep(recipe, source, done, ["split1"])
    assert entry["best_lr"] == 0.02 and entry["accuracy"] == 0.6 and not entry["all_splits"]
    merge_entry(tmp_path, entry)
    merge_entry(tmp_path, {**entry, "accuracy": 0.7})  # a rerun replaces its own cell
    merge_entry(tmp_path, {**entry, "column": "all", "accuracy": 0.5})
    entries = read_results(tmp_path)
    assert [(e["column"], e["accuracy"]) for e in entries] == [("fc", 0.7), ("all", 0.5)]
    md = (tmp_path / "results.md").read_text()
    assert "| Scratch | None | 70.0† | 50.0† |" in md
    (tmp_path / "results.json").write_text("[]")
    with pytest.raises(DataError, match="not a results table"):
        merge_entry(tmp_path, entry)


def test_a_set_evaluated_with_both_encoders_keeps_two_cells_and_two_folders(tmp_path: Path) -> None:
    base = (
        "name: d\ndataset: {}\nmode: fc\noptim: {{lr: 0.1, epoch_size: 64}}\n"
        "data: {{shards: s, modality: {}, splits: [1], split_layout: train-test}}"
    )
    video, audio = (parse_eval_recipe(base.format("digits", m)) for m in ("video", "audio"))
    assert (video.table_name, audio.table_name) == ("digits-video", "digits-audio")
    assert (video.title, audio.title) == ("DIGITS video", "DIGITS audio")
    assert run_dir(video) != run_dir(audio)
    ucf = parse_eval_recipe(base.format("ucf101", "video"))
    assert (ucf.table_name, ucf.title, run_dir(ucf).parts[-3]) == ("ucf101", "UCF101", "ucf101")
    for recipe, acc in ((video, 0.3), (audio, 0.6)):
        merge_entry(tmp_path, summarise_sweep(recipe, EncoderSource("scratch"), [_done(acc)], ["split1"]))
    assert "| Scratch | None | 60.0 | 30.0 |" in (tmp_path / "results.md").read_text()


def _done(acc: float) -> SplitResult:
    return SplitResult("split1", 0.1, acc, 10, int(10 * acc), 8, 0.1, 1.0, "d")


# --- audio-only sets (ESC-50) ------------------------------------------------------------------


def test_audio_only_clips_are_windows_spread_inside_the_file(tmp_path: Path) -> None:
    import soundfile as sf

    from trainer.evaluate.splits import eval_clip_spec, is_audio_only
    from xdctools.shard import format as fmt

    rng = np.random.default_rng(0)
    (tmp_path / "wavs").mkdir()
    sf.write(tmp_path / "wavs" / "noise.wav", 0.3 * rng.standard_normal(5 * 16_000), 16_000)  # 5 s
    shards = open_sets(_shard(build_plan(tmp_path / "wavs"), tmp_path / "shards"), ["train"], video=False)
    recipe = parse_eval_recipe("name: a\ndataset: esc50\nmode: fc\ndata: {shards: s}\noptim: {lr: 0.1}")
    spec = eval_clip_spec(recipe, is_audio_only(shards))
    assert (spec.length, spec.video) == (fmt.WINDOW_FRAMES, False)
    rows = next(iter(eval_loader(shards, batch_size=1, num_clips=10, clip=spec, run=Runtime(num_threads=2))))
    # 250 mel frames: 10 two-second windows from 0 to 150, evenly spaced, each wholly inside the audio
    assert rows["frame"].tolist() == [round(150 * k / 9) for k in range(10)]
    floor = (fmt.TOP_DB_FLOOR - 30.0) / 18.0 + 1e-3  # trainer.data's standardised silence
    assert (rows["audio"] > floor).float().mean(dim=(1, 2, 3)).min() > 0.99


def test_esc50_finetuning_trains_on_the_other_four_folds(esc_shards: Path, tmp_path: Path) -> None:
    recipe = parse_eval_recipe(
        f"name: e\ndataset: esc50\nmode: fc\ndata: {{shards: {esc_shards}, splits: [3], num_threads: 2}}\n"
        f"model: {{width: {WIDTH}}}\noptim: {{epoch_size: 8, batch_size: 4, lr: 0.1, warmup_epochs: 0, "
        f"total_epochs: 1}}\nrun: {{out: {tmp_path}}}"
    )
    summary = run_finetune(recipe)
    assert list(summary["splits"]) == ["fold3"] and not summary["all_splits"]
    done = json.loads((tmp_path / "esc50" / "scratch" / "fc" / "lr0.1" / "fold3" / "result.json").read_text())
    assert done["extra"]["train_sets"] == ["fold1", "fold2", "fold4", "fold5"] and done["videos"] == 2
    assert "| ESC50 fc |" in (tmp_path / "results.md").read_text()


# --- DCASE-style SVM -----------------------------------------------------------------------------


def test_svm_separates_separable_features_with_either_pooling() -> None:
    rng = np.random.default_rng(0)

    def features(files: int, offset: int) -> ClipFeatures:
        label = np.repeat(np.arange(files) % 3, 6)
        centres = np.eye(3, 16)[label] * 4.0
        return ClipFeatures(
            (centres + rng.normal(size=(files * 6, 16))).astype(np.float32),
            np.repeat(np.arange(files) + offset, 6),
            np.tile(np.arange(6), files),
            label,
        )

    train, test = features(15, 0), features(6, 100)
    for pool in ("clips", "mean"):
        result = fit_svm(train, test, pool=pool, cs=[0.01, 1.0], cv_folds=3)
        assert result.accuracy == 1.0 and result.files == 6 and set(result.cv) == {"0.01", "1.0"}
    with pytest.raises(ConfigError, match="pool"):
        fit_svm(train, test, pool="max")


def test_svm_runs_on_audio_shards(esc_shards: Path, tmp_path: Path) -> None:
    path = tmp_path / "esc.yaml"
    path.write_text(
        f"name: esc\ndataset: esc50\nmode: full\ndata: {{shards: {esc_shards}, num_threads: 2}}\n"
        f"model: {{width: {WIDTH}}}\noptim: {{lr: 0.1}}\nsvm: {{cs: [0.1, 1.0]}}\nrun: {{out: {tmp_path}}}\n"
    )
    with field_reads() as reads:
        result = CliRunner().invoke(finetune, [str(path), "--svm"])
    assert result.exit_code == 0, result.output
    assert "fold5: features of 2 files x 60 clips" in result.output
    svm_fields = all_fields(er.Svm) | {("EvalRecipe", "svm"), ("Model", "audio_maxpool")}
    assert svm_fields - reads == set()  # every SVM field, and the audio encoder's, is read by the SVM run
    (entry,) = read_results(tmp_path)
    assert entry["column"] == "svm" and set(entry["splits"]) == {f"fold{k}" for k in range(1, 6)}
    assert all(s["files"] == 2 and s["c"] in (0.1, 1.0) for s in entry["svm"].values())
    assert "| ESC50 svm |" in (tmp_path / "results.md").read_text()


# --- multi-label sets (AudioSet) -----------------------------------------------------------------

AUDIOSET_CLASSES = 527
AUDIOSET_TEST_CLIPS = 4  # per test video (the protocol's 10 costs seconds here and tests nothing more)
# real clips with audio (the AudioSet kind requires it), linked under real rows' YouTube ids
AUDIOSET_CLIPS = {
    "balanced_train": ("big_buck_bunny_small.mp4", "mpeg4_mp3_stereo.avi", "realshort.mp4"),
    "eval": ("fire2.mp4", "big_buck_bunny_432_433.webm", "realshort.mp4"),
}


def _audioset_rows(csv_path: Path, count: int) -> tuple[list[str], list[tuple[str, str, float, float]]]:
    """The csv's 3 comment lines and its first `count` rows with an integer span and several classes, one
    of them Speech or Music (so train and test share classes), read with the csv module: (line, id,
    start, end)."""
    lines = csv_path.read_text().splitlines()
    rows = []
    for line in lines[3:]:
        ytid, start, end, labels = next(csv.reader([line], skipinitialspace=True))
        mids = labels.split(",")
        whole = float(start).is_integer() and float(end).is_integer()
        if whole and len(mids) >= 2 and {"/m/09x0r", "/m/04rlf"} & set(mids):
            rows.append((line, ytid, float(start), float(end)))
        if len(rows) == count:
            return lines[:3], rows
    raise AssertionError(f"{csv_path}: fewer than {count} rows fit")


@pytest.fixture(scope="module")
def audioset(tmp_path_factory, media_dir: Path, splits_dir: Path) -> dict:
    """Sets balanced_train (3 videos) and eval (3) of real AudioSet rows in one folder, sharded by
    `xdctools shard` with both csvs (`--csv` twice)."""
    base = tmp_path_factory.mktemp("audioset")
    index = splits_dir / "audioset" / "class_labels_indices.csv"
    with index.open(newline="") as f:
        mid_index = {row["mid"]: int(row["index"]) for row in csv.DictReader(f)}
    (base / "meta").mkdir()
    (base / "meta" / "class_labels_indices.csv").symlink_to(index)
    (base / "downloads").mkdir()
    csvs, expected = [], {}
    for set_name, clips in AUDIOSET_CLIPS.items():
        comments, rows = _audioset_rows(splits_dir / "audioset" / f"{set_name}_segments.csv", len(clips))
        csv_path = base / "meta" / f"{set_name}_segments.csv"
        csv_path.write_text("\n".join([*comments, *(r[0] for r in rows)]))
        csvs += ["--csv", str(csv_path)]
        for (line, ytid, start, end), clip in zip(rows, clips, strict=True):
            name = f"{ytid}_{start:06.0f}_{end:06.0f}{Path(clip).suffix}"  # already trimmed
            (base / "downloads" / name).symlink_to(media_dir / "edge" / clip)
            mids = next(csv.reader([line], skipinitialspace=True))[3].split(",")
            expected[ytid] = sorted(mid_index[m] for m in mids)
    root = base / "shards"
    args = [str(base / "downloads"), *csvs, "-o", str(root), "--short-side", "48", "--shard-size", "2"]
    result = CliRunner().invoke(shard, [*args, "--workers", "2"])
    assert result.exit_code == 0, result.output
    return {"root": root, "classes": expected}


def _true_classes(audioset: dict, shards) -> dict[int, list[int]]:
    """Video index -> its class indices, from the csv rows (by the YouTube id in the file name)."""
    return {v: audioset["classes"][name.rsplit("_", 2)[0]] for v, name in video_names(shards).items()}


def _audioset_recipe(audioset: dict, out: Path, path: Path) -> Path:
    """1 epoch of 2 steps of 4 clips at width 0.125 and crop 32, the explicit split balanced_train -> eval."""
    path.write_text(f"""
name: as
dataset: audioset
mode: full
data: {{shards: {audioset["root"]}, modality: video, split_layout: train-test, clip_frames: 4, crop: 32,
        num_threads: 2, splits: [{{name: main, train: [balanced_train], test: eval}}]}}
model: {{width: 0.125}}
optim: {{epoch_size: 8, batch_size: 4, lr: 0.05, warmup_epochs: 0, step_epochs: 1, total_epochs: 1}}
test: {{num_clips: {AUDIOSET_TEST_CLIPS}, batch_size: 4}}
run: {{out: {out}}}
""")
    return path


def test_multi_label_targets_are_each_videos_class_list_and_the_loss_is_bce(audioset: dict) -> None:
    assert read_dataset(audioset["root"])["multi_label"] is True
    shards = open_sets(audioset["root"], ["balanced_train"], video=True)
    targets = MultiHot(multi_label_catalog(audioset["root"], "balanced_train", 527, video=True), 527)
    truth = _true_classes(audioset, shards)
    loader = train_loader(
        shards, batch_size=4, epoch_size=8, clip=ClipSpec(4, crop=32), run=Runtime(num_threads=2)
    )
    seen = set()
    for batch in loader:  # each clip's row is its own video's list, whatever the mix of videos in a batch
        y = targets(batch["index"])
        assert y.shape == (4, AUDIOSET_CLASSES) and y.dtype == torch.float32
        for row, video in zip(y, batch["index"].tolist(), strict=True):
            assert torch.nonzero(row).flatten().tolist() == truth[video]
            seen.add(video)
        assert (batch["label"] == -1).all()  # no single class in the samples
    assert len(seen) >= 2
    # binary cross-entropy with logits, the mean over clips and classes, as written out by hand
    logits = torch.randn(4, AUDIOSET_CLASSES, generator=torch.Generator().manual_seed(0))
    loss, correct = batch_loss(logits, batch, targets)
    p = torch.sigmoid(logits)
    by_hand = -(y * torch.log(p) + (1 - y) * torch.log(1 - p)).mean()
    torch.testing.assert_close(loss, by_hand, rtol=1e-5, atol=1e-6)
    assert int(correct) == 0
    single = {"label": torch.tensor([0, 3, 3, 1])}  # the single-label path: softmax cross-entropy
    loss, correct = batch_loss(logits, single)
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(logits, single["label"]))
    assert int(correct) == int((logits.argmax(1) == single["label"]).sum())


@dataclasses.dataclass(frozen=True)
class ByHand:
    """A multi-label test redone here: per test video (ascending) its clips' mean sigmoid and classes."""

    videos: list[int]
    probs: np.ndarray  # (V, C)
    truth: dict[int, list[int]]

    @property
    def map(self) -> float:
        targets = np.zeros_like(self.probs)
        for i, v in enumerate(self.videos):
            targets[i, self.truth[v]] = 1
        return mean_average_precision(self.probs, targets)


def _test_by_hand(audioset: dict, folder: Path) -> ByHand:
    """The last epoch's weights on every test clip, a sigmoid per clip (eval mode: BatchNorm does not
    mix the clips of a batch), the plain mean over a video's clips."""
    state = load_checkpoint(latest_checkpoint(folder))
    model = make_classifier(r2plus1d_18(width=0.125), AUDIOSET_CLASSES, "full")
    model.encoder.load_state_dict(state["encoder"])
    model.head.load_state_dict(state["head"])
    model.eval()
    test = open_sets(audioset["root"], ["eval"], video=True)
    clips: dict[int, list[np.ndarray]] = {}
    spec = ClipSpec(4, crop=32)
    loader = eval_loader(
        test, batch_size=4, num_clips=AUDIOSET_TEST_CLIPS, clip=spec, run=Runtime(num_threads=2)
    )
    with torch.no_grad():
        for batch in loader:
            probs = torch.sigmoid(model(batch["video"])).numpy()
            for video, clip_probs in zip(batch["index"].tolist(), probs, strict=True):
                clips.setdefault(video, []).append(clip_probs)
    videos = sorted(clips)
    assert [len(clips[v]) for v in videos] == [AUDIOSET_TEST_CLIPS] * len(videos)
    probs = np.stack([np.mean(clips[v], axis=0) for v in videos])
    return ByHand(videos, probs, _true_classes(audioset, test))


def test_multi_label_finetune_scores_map_and_resumes(audioset: dict, tmp_path: Path) -> None:
    out = tmp_path / "eval"
    path = _audioset_recipe(audioset, out, tmp_path / "as.yaml")
    runner = CliRunner()
    result = runner.invoke(finetune, [str(path)])
    assert result.exit_code == 0, result.output
    folder = out / "audioset-video" / "scratch" / "full" / "lr0.05" / "main"
    (epoch,) = [r for r in read_metrics(folder) if r["event"] == "epoch"]
    # BCE over 527 sigmoids of near-zero logits is about log 2 (softmax CE would be log 527 = 6.3)
    assert math.isfinite(epoch["train_loss"]) and abs(epoch["train_loss"] - math.log(2)) < 0.05
    assert "train_acc" not in epoch
    done = json.loads((folder / "result.json").read_text())
    assert "accuracy" not in done and "correct" not in done and done["videos"] == 3

    hand = _test_by_hand(audioset, folder)
    assert done["map"] == pytest.approx(hand.map, abs=1e-6)
    assert done["extra"]["map_classes"] == len({c for v in hand.videos for c in hand.truth[v]})

    # predictions.csv: each video's true classes and its 5 best-scored classes
    classes = read_dataset(audioset["root"])["classes"]
    with (folder / "predictions.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["video"]) for r in rows] == hand.videos
    for row, p in zip(rows, hand.probs, strict=True):
        assert row["labels"].split("; ") == [classes[c] for c in hand.truth[int(row["video"])]]
        best = np.argsort(-p)[:5]
        assert [row[f"top{k}"] for k in range(1, 6)] == [classes[c] for c in best]
        assert [float(row[f"score{k}"]) for k in range(1, 6)] == pytest.approx(p[best], abs=1e-4)

    # the table says mAP, never accuracy
    (entry,) = read_results(out)
    assert "accuracy" not in entry and entry["map"] == done["map"]
    assert entry["splits"] == {"main": done["map"]}
    assert f"| Scratch | None | mAP {done['map']:.3f} |" in (out / "results.md").read_text()
    assert f"mAP {done['map']:.4f} mean over 1 split(s)" in result.output

    # a rerun skips the finished pair; a lost result resumes from the last epoch and scores the same
    result = runner.invoke(finetune, [str(path)])
    assert result.exit_code == 0, result.output
    assert f"main lr 0.05: done before (mAP {done['map']:.3f}), skipped" in result.output
    (folder / "result.json").unlink()
    result = runner.invoke(finetune, [str(path)])
    assert result.exit_code == 0 and "main lr 0.05: resuming after epoch 1" in result.output, result.output
    assert json.loads((folder / "result.json").read_text())["map"] == done["map"]


def test_multi_label_finetune_on_two_ranks_gathers_every_video(audioset: dict, tmp_path: Path) -> None:
    """2 gloo ranks: each trains on its clips and tests on its share of the test segments; the clip rows
    are gathered before the per-video mean, so the mAP is the one of all videos, as one process finds it."""
    out = tmp_path / "ddp"
    path = _audioset_recipe(audioset, out, tmp_path / "as.yaml")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    torchrun = Path(sys.executable).with_name("torchrun")
    args = [str(torchrun), "--standalone", "--nproc_per_node=2", "-m", "xdctools", "finetune", str(path)]
    proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    folder = out / "audioset-video" / "scratch" / "full" / "lr0.05" / "main"
    (schedule,) = [r for r in read_metrics(folder) if r["event"] == "schedule"]
    assert (schedule["world_size"], schedule["global_batch"], schedule["lr"]) == (2, 8, 0.1)
    done = json.loads((folder / "result.json").read_text())
    assert done["videos"] == 3 and done["map"] == pytest.approx(_test_by_hand(audioset, folder).map, abs=1e-6)
    assert len((folder / "predictions.csv").read_text().splitlines()) == 1 + 3


def test_multi_label_sweep_picks_the_best_mean_map(tmp_path: Path) -> None:
    recipe = parse_eval_recipe(
        "name: a\ndataset: audioset\nmode: fc\noptim: {lr: 0.1, epoch_size: 64}\n"
        "data: {shards: s, modality: audio, split_layout: train-test, splits: [1, 2]}"
    )
    # lr 0.01 wins split 1 but 0.02 has the better mean: the mean over the splits decides
    maps = {(0.01, "split1"): 0.40, (0.01, "split2"): 0.10, (0.02, "split1"): 0.30, (0.02, "split2"): 0.30}
    done = [
        SplitResult(split, lr, None, 20, None, 8, 0.1, 1.0, "d", map=value)
        for (lr, split), value in maps.items()
    ]
    assert done[0].to_json().keys() >= {"map"} and not done[0].to_json().keys() & {"accuracy", "correct"}
    assert SplitResult.from_json(done[0].to_json()) == done[0]
    entry = summarise_sweep(recipe, EncoderSource("scratch"), done, ["split1", "split2"])
    assert entry["best_lr"] == 0.02 and entry["map"] == pytest.approx(0.30) and "accuracy" not in entry
    assert [row["mean"] for row in entry["sweep"]] == [pytest.approx(0.25), pytest.approx(0.30)]
    merge_entry(tmp_path, entry)
    ucf = parse_eval_recipe(
        "name: u\ndataset: ucf101\nmode: fc\ndata: {shards: s, splits: [1]}\noptim: {lr: 0.1}"
    )
    merge_entry(tmp_path, summarise_sweep(ucf, EncoderSource("scratch"), [_done(0.6)], ["split1"]))
    md = (tmp_path / "results.md").read_text()
    assert "| Scratch | None | 60.0† | mAP 0.300 |" in md  # accuracy in %, mAP as a fraction, each labelled
    assert "| **lr 0.02** | 0.300 | 0.300 | **0.300** |" in md and "AUDIOSET audio fc (mAP)" in md


def test_multi_label_refusals_are_one_line(audioset: dict, tmp_path: Path, monkeypatch) -> None:
    path = _audioset_recipe(audioset, tmp_path / "out", tmp_path / "as.yaml")
    runner = CliRunner()
    result = runner.invoke(finetune, [str(path), "--svm"])
    assert result.exit_code == ConfigError.exit_code and result.output.count("\n") == 1
    assert "dataset.json: multi_label: mode svm is not supported on a multi-label set" in result.output
    both = path.read_text().replace("train: [balanced_train]", "train: [balanced_train, eval]")
    (tmp_path / "both.yaml").write_text(both)
    result = runner.invoke(finetune, [str(tmp_path / "both.yaml")])
    assert result.exit_code == DataError.exit_code and result.output.count("\n") == 1
    assert (
        "split main trains on 2 sets (balanced_train, eval); a multi-label split trains on one"
        in result.output
    )
    with pytest.raises(DataError, match="split s trains on 2 sets"):
        check_multi_label_splits([Split("s", ("a", "b"), "c")], "dataset.json")

    # a video with an empty class list: the catalog as read, with the first video's list taken away
    real = read_catalog(open_sets(audioset["root"], ["balanced_train"], video=True))
    offsets, values = real.label_offsets, real.label_values
    first = int(offsets[1])
    emptied = dataclasses.replace(
        real, label_offsets=np.r_[0, offsets[1:] - first], label_values=values[first:]
    )
    assert empty_label_lists(emptied).tolist() == [int(real.videos[0])] and not len(empty_label_lists(real))
    monkeypatch.setattr("trainer.evaluate.splits.read_catalog", lambda shards: emptied)
    name = video_names(open_sets(audioset["root"], ["balanced_train"], video=True))[int(real.videos[0])]
    result = runner.invoke(finetune, [str(path)])
    assert result.exit_code == DataError.exit_code and result.output.count("\n") == 1, result.output
    video = int(real.videos[0])
    message = f"set balanced_train: 1 of 3 videos have an empty label list (first: video {video} {name!r})"
    assert f"{audioset['root']}: {message}" in result.output
