"""The deep-clustering loop (trainer.loop, trainer.step) and `xdctools train`, end to end on tiny shards."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner

from trainer import loop, outcome, session
from trainer.checkpoint import list_checkpoints, load_checkpoint, unpack_array
from trainer.data import find_shards
from trainer.evaluate.probe import cross_validated_probe, linear_probe, multilabel_probe
from trainer.extract import read_catalog
from trainer.labels import route_labels
from trainer.step import LabelTables, balanced_weights, head_losses, summarise
from xdctools.commands.compare import compare
from xdctools.commands.train import train
from xdctools.errors import ConfigError, DataError
from xdctools.features.store import open_store
from xdctools.recipe import METHODS, load_recipe, parse_recipe

ROOT = Path(__file__).resolve().parents[1]


def unlabelled_shards(tiny_shards: Path) -> Path:
    """Two of the tiny set's videos sharded as a flat folder: no class labels."""
    from xdctools.shard.params import ShardParams
    from xdctools.shard.plan import build_plan, shuffle_plan
    from xdctools.shard.run import run_shard

    root = tiny_shards.parent
    flat = root / "flat"
    if not (root / "unlabelled" / "dataset.json").is_file():
        flat.mkdir(exist_ok=True)
        for video in sorted((root / "videos").glob("*/*.mp4"))[:2]:
            (flat / video.name).write_bytes(video.read_bytes())
        run_shard(
            shuffle_plan(build_plan(flat, kind="folder"), 0),
            ShardParams(short_side=64),
            root / "unlabelled",
            shard_size=2,
        )
    return root / "unlabelled"


def tiny_recipe(shards: Path, out: Path, **sections) -> dict:
    """A recipe sized for seconds on a CPU: width 0.125 encoders, 4x64x64 clips, 2 steps of 4 clips."""
    doc = {
        "name": "tiny",
        "method": "xdc",
        "seed": 0,
        "data": {
            "shards": str(shards),
            "val_fraction": 0.2,
            "clip_frames": 4,
            "crop": 64,
            "short_side": 64,
            "num_threads": 1,
        },
        "model": {"width": 0.125},
        "clustering": {"k": 3, "iterations": 2, "niter": 10},
        "optim": {
            "epoch_size": 8,
            "batch_size": 4,
            "lr": 0.05,
            "warmup_epochs": 0,
            "step_epochs": 1,
            "total_epochs": 1,
        },
        "run": {"out": str(out), "log_every": 1},
    }
    for section, values in sections.items():
        if isinstance(values, dict) and isinstance(doc.get(section), dict):
            doc[section].update(values)
        else:
            doc[section] = values
    return doc


def write_recipe(path: Path, doc: dict) -> Path:
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.fixture(scope="module")
def shards(tiny_shards: Path) -> Path:
    return tiny_shards


# --- pure parts -------------------------------------------------------------------------------------


def test_each_method_routes_its_labels() -> None:
    views = {name: np.full(4, i, dtype=np.int32) for i, name in enumerate(["video", "audio", "cdc", "true"])}
    routed = {}
    for method in METHODS:
        doc = tiny_recipe(Path("s"), Path("o"), method=method)
        if method == "superv":
            doc.pop("clustering")
        recipe = parse_recipe(yaml.safe_dump(doc))
        routed[method] = {key: int(labels[0]) for key, labels in route_labels(recipe.heads, views).items()}
    video, audio, cdc, true = 0, 1, 2, 3
    assert routed["xdc"] == {("video", "other"): audio, ("audio", "other"): video}
    assert routed["sdc"] == {("video", "own"): video, ("audio", "own"): audio}
    assert routed["mdc"] == {
        ("video", "own"): video,
        ("video", "other"): audio,
        ("audio", "own"): audio,
        ("audio", "other"): video,
    }
    assert routed["cdc"] == {("video", "own"): cdc, ("audio", "own"): cdc}
    assert routed["superv"] == {("video", "true"): true, ("audio", "true"): true}
    with pytest.raises(ConfigError, match="no labels for view"):
        route_labels({"video": {"other": "audio"}}, {"video": views["video"]})


def test_held_out_videos_are_a_seeded_fraction() -> None:
    a = session.held_out_videos(100, 0.05, seed=1)
    assert a.sum() == 5 and np.array_equal(a, session.held_out_videos(100, 0.05, seed=1))
    assert not np.array_equal(a, session.held_out_videos(100, 0.05, seed=2))
    assert session.held_out_videos(9, 0.01, seed=0).sum() == 1  # at least one when asked for
    assert session.held_out_videos(9, 0.0, seed=0).sum() == 0


def test_uniform_sampling_weights_every_cluster_equally() -> None:
    labels = np.array([0] * 8 + [1] * 2 + [2] * 1 + [-1])
    held = np.zeros(12, dtype=bool)
    w = balanced_weights(labels, held)
    per_cluster = [w[labels == c].sum() for c in range(3)]
    np.testing.assert_allclose(per_cluster, per_cluster[0])
    assert w[labels == -1].sum() == 0
    held[0] = True  # held-out videos are not counted in the sizes
    w = balanced_weights(labels, held)
    np.testing.assert_allclose(w[1], w[2]) and np.testing.assert_allclose(w[1] * 7, w[8] * 2)


def test_held_out_rows_give_the_val_loss_and_no_gradient() -> None:
    tables = LabelTables(
        videos=np.array([10, 20, 30]),
        labels={("video", "other"): np.array([0, 1, -1])},
        held_out=np.array([False, True, False]),
    )
    targets = tables.batch(torch.tensor([10, 20, 30, 10]), torch.device("cpu"))[("video", "other")]
    assert targets["train"].tolist() == [1, 0, 0, 1] and targets["val"].tolist() == [0, 1, 0, 0]
    logits = torch.randn(4, 2, requires_grad=True)
    loss, stats = head_losses(logits, targets)
    loss.backward()
    assert logits.grad[1:3].abs().sum() == 0 and logits.grad[[0, 3]].abs().sum() > 0
    ce = torch.nn.functional.cross_entropy(logits.detach(), targets["labels"], reduction="none")
    assert torch.isclose(loss, ce[[0, 3]].mean())
    assert stats[2:4].tolist() == pytest.approx([ce[1].item(), 1.0])
    out = summarise(stats.reshape(1, 5).numpy(), [("video", "other")])
    assert out["val_loss"] == pytest.approx(ce[1].item()) and out["train_loss"] == pytest.approx(loss.item())
    with pytest.raises(DataError, match="have no labels"):
        tables.batch(torch.tensor([40]), torch.device("cpu"))


# --- end to end ---------------------------------------------------------------------------------------


def test_xdc_iterations_end_to_end_with_heads_reset(shards: Path, tmp_path: Path) -> None:
    recipe = parse_recipe(yaml.safe_dump(tiny_recipe(shards, tmp_path / "run", run={"probe": True})))
    stages = []
    result = loop.run(recipe, progress=lambda stage, done, total, **_: stages.append(stage))
    run = tmp_path / "run"
    for name in ("metrics.jsonl", "report.md", "recipe.yaml", "encoders.pt", "result.json", "losses.png"):
        assert (run / name).is_file(), name
    assert list((run / "tensorboard").iterdir())
    assert [r["iteration"] for r in result.iterations] == [0, 1, 2]  # 2 = the final encoders
    stores = sorted(p.name for p in (run / "features").iterdir())  # older iterations' deleted
    assert stores == ["final.zarr", "it001.zarr"]
    assert {"nmi_video", "nmi_audio", "probe_video", "probe_audio"} <= set(result.iterations[0])
    assert {"it000 extract train", "it000 epoch 1/1", "it001 epoch 1/1", "final extract train"} <= set(stages)

    found = {(it, ep): path for it, ep, path in list_checkpoints(run)}
    trained, reset = (load_checkpoint(found[key]) for key in [(0, 1), (1, 0)])
    heads = [k for k in trained["model"] if k.startswith("heads.")]
    encoder = [k for k in trained["model"] if k.startswith("encoders.")]
    assert heads == [f"heads.{m}.heads.other.{p}" for m in ("video", "audio") for p in ("weight", "bias")]
    for key in heads:  # re-initialised: N(0, 0.01) weights, zero bias, unlike the trained head
        assert not torch.equal(trained["model"][key], reset["model"][key])
        if key.endswith("bias"):
            assert reset["model"][key].abs().sum() == 0
        else:
            assert 0.003 < reset["model"][key].std() < 0.03
    for key in encoder:  # the encoders carry over
        assert torch.equal(trained["model"][key], reset["model"][key])

    # XDC: each encoder learns the other modality's clusters (the labels k-means wrote)
    labels = {v: unpack_array(reset["labels"][v]) for v in ("video", "audio")}
    for view in ("video", "audio"):
        assert np.array_equal(labels[view], np.load(run / "clusters" / f"it001-{view}" / "labels.npy"))
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in records if r["event"] == "epoch"]
    assert {"train_loss_video_other", "val_loss_audio_other"} <= set(epochs[0])
    # a second call finds the run complete and does nothing
    again = loop.run(recipe)
    assert again.resumed_complete and again.iterations == result.iterations

    # `xdctools compare` reads the finished run: random init = iteration 0, XDC = the final encoders
    out = CliRunner().invoke(compare, [str(run), "-o", str(tmp_path / "table.md")])
    assert out.exit_code == 0, out.output
    lines = (tmp_path / "table.md").read_text().splitlines()
    assert out.output.splitlines() == lines
    first, final = result.iterations[0], result.iterations[-1]
    assert lines[2].startswith(f"| Random init | iteration 0 | 0 | – | {first['probe_video']:.3f} |")
    probes = f"{final['probe_video']:.3f} | {final['probe_audio']:.3f} |"
    assert lines[3].startswith(f"| XDC | run | 2 | 3 | {probes}")  # k 3
    # --mean over one run: the same numbers, no spread
    out = CliRunner().invoke(compare, [str(run), "--mean"])
    assert out.exit_code == 0, out.output
    assert f"| XDC | 1 run: run | 2 | 3 | {probes}" in out.output


DRIVER = """
import sys, torch
torch.use_deterministic_algorithms(True)
torch.set_num_threads(1)
from xdctools.commands.compare import compare
from xdctools.commands.train import train
train(sys.argv[1:], standalone_mode=True)
"""


def _train(recipe: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, "-c", DRIVER, str(recipe), "--quiet", *extra],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


def _kill_when(proc: subprocess.Popen, path: Path, timeout: float = 240.0) -> None:
    """SIGKILL the run as soon as `path` exists (or fail if it ends first)."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            pytest.fail(f"the run ended before {path.name} appeared:\n{proc.stdout.read().decode()[-2000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"{path} did not appear in {timeout} s")
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def _final_state(run: Path) -> dict:
    return load_checkpoint(list_checkpoints(run)[-1][2])


def test_killed_run_resumes_to_the_uninterrupted_state(shards: Path, tmp_path: Path) -> None:
    changes = {"optim": {"total_epochs": 2, "epoch_size": 8}, "run": {"log_every": 1}}
    straight = write_recipe(tmp_path / "a.yaml", tiny_recipe(shards, tmp_path / "a", **changes))
    broken = write_recipe(tmp_path / "b.yaml", tiny_recipe(shards, tmp_path / "b", **changes))
    reference = _train(straight)  # alongside the interrupted one: the result must not depend on timing
    # killed mid-training (epoch 2 of iteration 0), then mid-extraction of iteration 1
    _kill_when(_train(broken), tmp_path / "b" / "checkpoints" / "it000-ep001.pt")
    _kill_when(_train(broken), tmp_path / "b" / "features" / "it001.zarr")
    proc = _train(broken)
    out = proc.communicate(timeout=300)[0].decode()
    assert proc.returncode == 0, out[-3000:]
    assert "Report:" in out
    assert reference.wait(timeout=300) == 0, reference.stdout.read().decode()[-3000:]

    a, b = _final_state(tmp_path / "a"), _final_state(tmp_path / "b")
    assert (a["iteration"], a["epoch"], a["step"]) == (b["iteration"], b["epoch"], b["step"]) == (1, 2, 8)
    for key, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][key]), key
    for view in a["labels"]:
        assert torch.equal(a["labels"][view], b["labels"][view])
    for group_a, group_b in zip(
        a["optimizer"]["state"].values(), b["optimizer"]["state"].values(), strict=True
    ):
        assert torch.equal(group_a["momentum_buffer"], group_b["momentum_buffer"])

    def records(run: str) -> list[dict]:
        lines = (tmp_path / run / "metrics.jsonl").read_text().splitlines()
        return [
            {k: v for k, v in json.loads(x).items() if k not in ("time", "clips_per_s", "seconds")}
            for x in lines
        ]

    assert records("a") == records("b")


@pytest.mark.parametrize("method", ["sdc", "mdc", "cdc"])
def test_every_clustering_method_trains(shards: Path, tmp_path: Path, method: str) -> None:
    k = 3 if method == "cdc" else {"video": 3, "audio": 2}  # one k per view, except the joint features
    changes = {
        "method": method,
        "clustering": {"k": k, "iterations": 2, "niter": 5},
        "optim": {"epoch_size": 4},
        "run": {"keep_features": True},
    }
    recipe = parse_recipe(yaml.safe_dump(tiny_recipe(shards, tmp_path / "run", **changes)))
    result = loop.run(recipe)
    stores = sorted(p.name for p in (tmp_path / "run" / "features").iterdir())
    assert stores == ["final.zarr", "it000.zarr", "it001.zarr"]  # every iteration's kept
    views = {"sdc": ["video", "audio"], "mdc": ["video", "audio"], "cdc": ["cdc"]}[method]
    assert sorted(k[4:] for k in result.iterations[0] if k.startswith("nmi_")) == sorted(views)
    state = load_checkpoint(list_checkpoints(tmp_path / "run")[-1][2])
    outputs = {
        tuple(name.split(".")[1:4:2]): w.shape[0]
        for name, w in state["model"].items()
        if name.startswith("heads.") and name.endswith(".weight")
    }
    expected = {
        "sdc": {("video", "own"): 3, ("audio", "own"): 2},
        "mdc": {("video", "own"): 3, ("video", "other"): 2, ("audio", "own"): 2, ("audio", "other"): 3},
        "cdc": {("video", "own"): 3, ("audio", "own"): 3},
    }
    assert outputs == expected[method]  # each head has the k of the view it learns
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    ks = {(r["view"], r["k"], len(r["sizes"])) for r in records if r["event"] == "cluster"}
    assert ks == ({("cdc", 3, 3)} if method == "cdc" else {("video", 3, 3), ("audio", 2, 2)})
    report = (tmp_path / "run" / "report.md").read_text()
    assert ("k 3," if method == "cdc" else "k video 3, audio 2,") in report
    assert recipe.clustering.uniform_sampling == (method == "sdc")  # DeepCluster's safeguard for SDC


def test_retrain_learns_the_finished_runs_last_assignment_with_the_video_encoder_only(
    shards: Path, tmp_path: Path
) -> None:
    """The paper's §6 protocol: a finished run's last labels, one encoder, longer clips, a fresh start."""
    from field_reads import all_fields, field_reads

    from xdctools.recipe import Retrain

    source = tiny_recipe(
        shards, tmp_path / "src", clustering={"k": {"video": 2, "audio": 3}}, optim={"epoch_size": 4}
    )
    loop.run(parse_recipe(yaml.safe_dump(source)))
    last = load_checkpoint(list_checkpoints(tmp_path / "src")[-1][2])
    assert last["iteration"] == 1  # the labels of the run's last iteration

    doc = tiny_recipe(
        shards,
        tmp_path / "re",
        data={"clip_frames": 8},
        retrain={"run": str(tmp_path / "src")},
        run={"probe": True},
    )
    doc.pop("clustering")
    recipe = parse_recipe(yaml.safe_dump(doc))
    with field_reads() as reads:
        result = loop.run(recipe)
    assert all_fields(Retrain) - reads == set()  # every retrain field acts
    assert [r["iteration"] for r in result.iterations] == [0, 1]  # one training iteration, then final
    assert "probe_video" in result.iterations[1] and "probe_audio" not in result.iterations[1]
    assert not any(k.startswith("nmi_") for row in result.iterations for k in row)  # nothing is clustered
    state = load_checkpoint(list_checkpoints(tmp_path / "re")[-1][2])
    assert set(state["labels"]) == {"audio"}
    assert np.array_equal(unpack_array(state["labels"]["audio"]), unpack_array(last["labels"]["audio"]))
    weights = load_checkpoint(tmp_path / "re" / "encoders.pt")["model"]
    assert {k.split(".")[1] for k in weights} == {"video"}  # the audio encoder is not re-trained
    assert weights["heads.video.heads.other.weight"].shape[0] == 3  # the source's audio k
    report = (tmp_path / "re" / "report.md").read_text()
    line = "- retrain: the video encoder, from random weights, on the last cluster assignment of"
    assert f"{line} `{tmp_path}/src`" in report
    assert "clips 8x64x64" in report

    # init: scratch is a seeded random encoder; init: final starts from the run's final video encoder
    s = session.open_session(recipe, resume=False, progress=None)
    torch.manual_seed(0)
    fresh = session.build_learner(recipe, {"audio": 3}).encoders["video"].state_dict()
    assert all(torch.equal(v, fresh[k]) for k, v in s.learner.encoders["video"].state_dict().items())
    s.logger.close()
    final = parse_recipe(yaml.safe_dump({**doc, "retrain": {"run": str(tmp_path / "src"), "init": "final"}}))
    s = session.open_session(final, resume=False, progress=None)
    src = load_checkpoint(tmp_path / "src" / "encoders.pt")["model"]
    assert all(
        torch.equal(v, src[f"encoders.video.{k}"])
        for k, v in s.learner.encoders["video"].state_dict().items()
    )
    s.logger.close()


def test_retrain_refuses_what_it_cannot_learn_from(shards: Path, tmp_path: Path) -> None:
    doc = tiny_recipe(shards, tmp_path / "re", retrain={"run": str(tmp_path / "none")})
    doc.pop("clustering")
    path = write_recipe(tmp_path / "re.yaml", doc)
    result = CliRunner().invoke(train, [str(path), "--quiet"])
    assert result.exit_code == 5 and f"{tmp_path / 'none'}: not a finished training run" in result.output
    cdc = tiny_recipe(
        shards, tmp_path / "cdc", method="cdc", optim={"epoch_size": 4}, clustering={"iterations": 1}
    )
    loop.run(parse_recipe(yaml.safe_dump(cdc)))
    result = CliRunner().invoke(train, [str(path), "--quiet", "--set", f"retrain.run={tmp_path / 'cdc'}"])
    assert (
        result.exit_code == 5
        and "no audio labels (it holds cdc); method xdc re-trains the video encoder" in result.output
    )
    other = str(unlabelled_shards(shards))
    result = CliRunner().invoke(
        train,
        [str(path), "--quiet", "--set", f"retrain.run={tmp_path / 'cdc'}", "--set", f"data.shards={other}"],
    )
    assert result.exit_code == 5 and "its labels are for another shard set (9 videos)" in result.output


def test_every_recipe_field_is_read_by_the_run(shards: Path, tmp_path: Path) -> None:
    """No flag that nothing reads: a run reads every field of the recipe (the report's reads do not count).

    OptimPatch is left out: its fields are Optim's, applied through `Recipe.optim_for` (test_recipe)."""
    from field_reads import all_fields, field_reads

    from xdctools import recipe as r

    changes = {
        "clustering": {"k": {"video": 3, "audio": 2}, "iterations": 1, "niter": 5},
        "optim": {"epoch_size": 4},
        "run": {"probe": True},
    }
    recipe = parse_recipe(yaml.safe_dump(tiny_recipe(shards, tmp_path / "run", **changes)))
    with field_reads() as reads:
        loop.run(recipe)
    sections = (r.Recipe, r.Data, r.Model, r.Clustering, r.KPerView, r.Optim, r.Run)
    assert all_fields(*sections) - reads == set()


def test_superv_trains_on_true_labels_and_refuses_unlabelled_shards(shards: Path, tmp_path: Path) -> None:
    doc = tiny_recipe(shards, tmp_path / "sup", method="superv")
    doc.pop("clustering")
    result = loop.run(parse_recipe(yaml.safe_dump(doc)))
    assert [r["iteration"] for r in result.iterations] == [0]
    state = load_checkpoint(list_checkpoints(tmp_path / "sup")[-1][2])
    labels = unpack_array(state["labels"]["true"])
    assert labels.tolist() == read_catalog(find_shards(shards, "train")).labels.tolist()  # stored order
    assert sorted(labels.tolist()) == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert state["model"]["heads.video.heads.true.weight"].shape[0] == 3  # dataset.json's classes

    doc["data"]["shards"] = str(unlabelled_shards(shards))
    with pytest.raises(DataError, match="carries no class labels; method superv"):
        loop.run(parse_recipe(yaml.safe_dump(doc)))


def test_superv_on_a_multi_label_set_learns_multi_hot_targets_and_probes_by_map(
    audioset_shards: Path, tmp_path: Path
) -> None:
    """AudioSet's Superv: sigmoid outputs over the 527 classes, binary cross-entropy, mAP in the probe."""
    doc = tiny_recipe(audioset_shards, tmp_path / "sup", method="superv", run={"probe": True})
    doc["data"]["train_set"] = "balanced_train"
    doc.pop("clustering")
    recipe = parse_recipe(yaml.safe_dump(doc))
    result = loop.run(recipe)
    catalog = read_catalog(find_shards(audioset_shards, "balanced_train"))
    assert catalog.multi_label and not catalog.has_labels
    state = load_checkpoint(list_checkpoints(tmp_path / "sup")[-1][2])
    assert state["model"]["heads.video.heads.true.weight"].shape[0] == 527  # class_labels_indices.csv
    records = [json.loads(x) for x in (tmp_path / "sup" / "metrics.jsonl").read_text().splitlines()]
    epoch = next(r for r in records if r["event"] == "epoch")
    # a fresh head's sigmoid outputs start near 0.5: the BCE averaged over 527 classes is near log(2)
    assert 0.4 < epoch["train_loss_video_true"] < 1.0 and np.isfinite(epoch["val_loss"])
    probes = [r for r in records if r["event"] == "probe"]
    assert probes and all("map" in r and "accuracy" not in r and 0 < r["map"] <= 1 for r in probes)
    assert {"probe_map_video", "probe_map_audio"} <= set(result.iterations[-1])
    assert "video mAP" in (tmp_path / "sup" / "report.md").read_text()

    # the probe's mAP, recomputed here from the stored features and the true class lists
    store = open_store(tmp_path / "sup" / "features" / "final.zarr")
    held = session.held_out_videos(catalog.num_videos, recipe.data.val_fraction, recipe.seed)
    train, test = np.flatnonzero(~held), np.flatnonzero(held)
    x = store.read("video", 0, catalog.num_videos).astype(np.float32)
    score = multilabel_probe(x[train], catalog.multi_hot(train, 527), x[test], catalog.multi_hot(test, 527))
    final = next(r for r in probes if r["iteration"] == 1 and r["modality"] == "video")
    assert final["map"] == pytest.approx(score)


def test_a_cross_validated_probe_scores_every_video_with_its_standard_error(
    shards: Path, tmp_path: Path
) -> None:
    changes = {
        "clustering": {"k": 3, "iterations": 1, "niter": 5},
        "optim": {"epoch_size": 4},
        "run": {"probe": True, "probe_folds": 3},
    }
    recipe = parse_recipe(yaml.safe_dump(tiny_recipe(shards, tmp_path / "run", **changes)))
    result = loop.run(recipe)
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    probes = [r for r in records if r["event"] == "probe"]
    assert len(probes) == 4  # iterations 0 and final, two modalities
    catalog = read_catalog(find_shards(shards, "train"))
    store = open_store(tmp_path / "run" / "features" / "final.zarr")
    for r in probes:  # every video scored once, held-out ones included, by a model that did not see it
        assert (r["split"], r["train"], r["test"]) == ("3-fold", 9, 9)
        assert r["se"] == pytest.approx(np.sqrt(r["accuracy"] * (1 - r["accuracy"]) / 9))
        if r["iteration"] == 1:  # recomputed from the stored features
            x = store.read(r["modality"], 0, catalog.num_videos).astype(np.float32)
            correct = cross_validated_probe(x, catalog.labels, 3, seed=recipe.seed)
            assert r["accuracy"] == correct.mean()
    final = result.iterations[-1]
    assert final["probe_video_se"] == next(
        r["se"] for r in probes if r["iteration"] == 1 and r["modality"] == "video"
    )
    assert " ± " in (tmp_path / "run" / "report.md").read_text()

    # each video is predicted by a classifier fitted on the other folds: the one video of class 2 is missed
    # (no other fold holds its class), which a classifier fitted on every video would get right
    x = np.eye(3, dtype=np.float32)[[0] * 5 + [1] * 5 + [2]]
    y = np.array([0] * 5 + [1] * 5 + [2])
    correct = cross_validated_probe(x, y, 3)
    assert correct[:10].all() and not correct[10]
    assert linear_probe(x, y, x, y) == 1.0

    for bad, message in [
        ({"probe_folds": 3}, "run.probe_folds: is only used by the probe"),
        ({"probe": True, "probe_folds": 3, "eval_set": "test"}, "give it or run.eval_set, not both"),
        ({"probe": True, "probe_folds": 1}, "run.probe_folds"),
    ]:
        with pytest.raises(ConfigError, match=message):
            parse_recipe(yaml.safe_dump(tiny_recipe(shards, tmp_path / "x", run=bad)))


def test_a_probe_on_the_mean_of_several_clips_per_video(shards: Path, tmp_path: Path) -> None:
    """run.probe_clips: N evenly spaced clips per video, their features averaged, fit and score the probe;
    checked against the same clips' features computed by the SVM protocol's extraction (another path)."""
    from trainer.data import Runtime, eval_loader
    from trainer.evaluate.svm import extract_clip_features
    from trainer.extract import load_encoders

    changes = {
        "clustering": {"k": 3, "iterations": 1, "niter": 5},
        "optim": {"epoch_size": 4},
        "run": {"probe": True, "probe_folds": 3, "probe_clips": 3},
    }
    recipe = parse_recipe(yaml.safe_dump(tiny_recipe(shards, tmp_path / "run", **changes)))
    loop.run(recipe)
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    probes = [r for r in records if r["event"] == "probe"]
    assert len(probes) == 4 and all((r["clips"], r["split"], r["test"]) == (3, "3-fold", 9) for r in probes)
    shard_set = find_shards(shards, "train")
    catalog = read_catalog(shard_set)
    encoders = load_encoders(tmp_path / "run" / "encoders.pt").encoders
    clip, run = session.clip_spec(recipe, shard_set), Runtime(num_threads=1)
    stored = open_store(tmp_path / "run" / "features" / "final.zarr")
    for modality, encoder in encoders.items():
        loader = eval_loader(shard_set, batch_size=2, num_clips=3, clip=clip, run=run)
        encoder.train()
        files, means, _ = extract_clip_features(encoder, loader, modality=modality, device="cpu").per_file()
        assert encoder.training  # its mode restored: a caller still training it keeps learning batch norm
        assert np.array_equal(catalog.rows_of(files), np.arange(catalog.num_videos))
        correct = cross_validated_probe(means, catalog.labels, 3, seed=recipe.seed)
        final = next(r for r in probes if r["iteration"] == 1 and r["modality"] == modality)
        assert final["accuracy"] == correct.mean()
        one_clip = stored.read(modality, 0, catalog.num_videos)
        assert not np.allclose(means, one_clip, atol=1e-3)  # not the clustered (centre-clip) features
    with pytest.raises(ConfigError, match=r"run\.probe_clips: is only used by the probe"):
        parse_recipe(yaml.safe_dump(tiny_recipe(shards, tmp_path / "x", run={"probe_clips": 10})))


def test_a_probe_that_cannot_run_says_so(shards: Path, tmp_path: Path) -> None:
    changes = {
        "clustering": {"k": 2, "iterations": 1, "niter": 5},
        "optim": {"epoch_size": 4},
        "run": {"probe": True},
    }
    doc = tiny_recipe(unlabelled_shards(shards), tmp_path / "run", **changes)
    with pytest.warns(
        UserWarning, match=r"probe of iteration \d skipped: no labelled test video \(held-out\)"
    ):
        loop.run(parse_recipe(yaml.safe_dump(doc)))
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    skipped = [(r["iteration"], r["reason"]) for r in records if r["event"] == "probe_skipped"]
    assert skipped == [(0, "no labelled test video (held-out)"), (1, "no labelled test video (held-out)")]


def test_a_damaged_result_file_is_an_error_not_an_unfinished_run(tmp_path: Path) -> None:
    recipe = parse_recipe(yaml.safe_dump(tiny_recipe(Path("s"), tmp_path)))
    assert outcome.finished_result(tmp_path, recipe) is None  # no result.json: not finished
    (tmp_path / "result.json").write_text('{"digest": ')
    with pytest.raises(DataError, match=r"result\.json: unreadable .*delete it to let the run finish again"):
        outcome.finished_result(tmp_path, recipe)


def test_bad_recipes_fail_naming_the_field(shards: Path, tmp_path: Path) -> None:
    good = tiny_recipe(shards, tmp_path / "run")
    cases = [
        ({"optim": {"lr": -1}}, "optim.lr: must be > 0"),
        ({"clustering": {"k": 1}}, "clustering.k: must be >= 2"),
        ({"data": {"crop": 128}}, "data.crop: must be <= short_side"),
        ({"model": {"depth": 3}}, "model.depth: unknown key"),
    ]
    for i, (change, message) in enumerate(cases):
        path = write_recipe(tmp_path / f"bad{i}.yaml", tiny_recipe(shards, tmp_path / "run", **change))
        with pytest.raises(ConfigError, match=message):
            load_recipe(path)
        result = CliRunner().invoke(train, [str(path)])
        assert result.exit_code == 4 and message in result.output
    # checked against the shards when the run opens: frames are never upscaled
    path = write_recipe(
        tmp_path / "big.yaml", tiny_recipe(shards, tmp_path / "run", data={"short_side": 128})
    )
    result = CliRunner().invoke(train, [str(path), "--quiet"])
    assert result.exit_code == 4 and "data.short_side: 128 is larger than the 64 pixels" in result.output
    result = CliRunner().invoke(
        train, [str(write_recipe(tmp_path / "ok.yaml", good)), "--set", "optim.lr=-1"]
    )
    assert result.exit_code == 4 and "optim.lr" in result.output
    # one k per view: not for the joint features; never more clusters than videos (checked before extraction)
    cdc = tiny_recipe(shards, tmp_path / "run", method="cdc", clustering={"k": {"video": 3, "audio": 2}})
    result = CliRunner().invoke(train, [str(write_recipe(tmp_path / "cdc.yaml", cdc)), "--quiet"])
    assert (
        result.exit_code == 4 and "clustering.k: cdc clusters the joint features with one k" in result.output
    )
    big = tiny_recipe(shards, tmp_path / "big-k", clustering={"k": {"video": 3, "audio": 10}})
    result = CliRunner().invoke(train, [str(write_recipe(tmp_path / "bigk.yaml", big)), "--quiet"])
    assert result.exit_code == 4
    assert (
        f"clustering.k: 10 audio clusters need at least 10 videos; set 'train' of {shards} has 9"
        in result.output
    )
    assert not (tmp_path / "big-k" / "features").exists()
