"""trainer.distributed, and 2 processes under torchrun (gloo) against 1: same store, same pseudo-labels."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from trainer import distributed, session
from trainer.checkpoint import list_checkpoints, load_checkpoint, unpack_array
from trainer.data import ClipSpec, Runtime, find_shards
from trainer.extract import extract_features
from trainer.models import r2plus1d_18, resnet18_audio
from trainer.optim import build_optimizer, effective_schedule
from xdctools.cluster import KMeansParams, cluster_store
from xdctools.errors import ConfigError
from xdctools.features.store import open_store
from xdctools.recipe import parse_recipe

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = Path(sys.executable).with_name("torchrun")
CLIP = ClipSpec(length=4, crop=64)


def encoders(seed: int = 0) -> dict[str, torch.nn.Module]:
    """What `trainer.session.build_learner` builds for width 0.125 and this seed."""
    torch.manual_seed(seed)
    return {"video": r2plus1d_18(width=0.125), "audio": resnet18_audio(width=0.125)}


def test_one_process_collectives_are_identities(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    d = distributed.init("cpu")
    assert (d.rank, d.world_size, d.is_main, d.distributed) == (0, 1, True, False)
    x = np.arange(6, dtype=np.float32).reshape(3, 2)
    assert np.array_equal(distributed.all_gather_rows(x), x)
    assert np.array_equal(distributed.broadcast_array(x), x)
    assert distributed.all_reduce_sum(np.array([1.5])).tolist() == [1.5]
    assert distributed.broadcast_object({"a": 1}) == {"a": 1}
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(ConfigError, match="RANK 2 is not in"):
        distributed.init("cpu")


ONE = """
import json, sys, torch
import torch.distributed as torch_dist
from trainer import distributed, session
from xdctools.recipe import parse_recipe
d = distributed.init("cpu")
recipe = parse_recipe(open(sys.argv[1]).read())
learner = session.build_learner(recipe, {"video": 3, "audio": 3})
model = session.wrap_for_training(learner, recipe, d)
print(json.dumps({"group": torch_dist.is_initialized(), "backend": torch_dist.get_backend(),
                  "world": torch_dist.get_world_size(), "ddp": type(model).__name__}))
distributed.cleanup()
"""


def test_one_process_under_torchrun_takes_the_multi_process_path(tmp_path: Path) -> None:
    """torchrun --nproc_per_node=1 starts the process group and trains through DDP, so one GPU runs the
    nccl path N GPUs run (gloo here); a plain process starts neither (above)."""
    recipe = {
        "name": "one",
        "method": "xdc",
        "data": {"shards": "s", "clip_frames": 4, "crop": 64, "short_side": 64},
        "model": {"width": 0.125},
        "clustering": {"k": 3},
        "optim": {"epoch_size": 8, "batch_size": 4, "lr": 0.05, "step_epochs": 1, "total_epochs": 1},
        "run": {"out": str(tmp_path / "run")},
    }
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    (tmp_path / "one.py").write_text(ONE)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    args = [
        str(TORCHRUN),
        "--standalone",
        "--nproc_per_node=1",
        str(tmp_path / "one.py"),
        str(tmp_path / "r.yaml"),
    ]
    proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report == {"group": True, "backend": "gloo", "world": 1, "ddp": "DistributedDataParallel"}


DRIVER = """
import json, sys
from pathlib import Path
import numpy as np, torch, yaml
torch.set_num_threads(1)
from trainer import distributed, loop
from trainer.data import ClipSpec, Runtime, find_shards
from trainer.extract import extract_features
from trainer.models import r2plus1d_18, resnet18_audio
from xdctools.cluster import KMeansParams, cluster_store
from xdctools.recipe import parse_recipe

shards_root, out, recipe_path = sys.argv[1:4]
d = distributed.init("cpu")
out = Path(out)
checks = {}
# collectives with a different row count on each rank
rows = distributed.all_gather_rows(np.full((d.rank + 1, 2), d.rank, dtype=np.int32))
checks["gather"] = rows[:, 0].tolist()
checks["broadcast"] = distributed.broadcast_array(np.arange(3) * 7 if d.is_main else None).tolist()
checks["sum"] = distributed.all_reduce_sum(np.array([d.rank + 1.0])).tolist()
# extraction in 2-row chunks: direct writes and the shared chunks both happen
torch.manual_seed(0)
encoders = {"video": r2plus1d_18(width=0.125), "audio": resnet18_audio(width=0.125)}
shards = find_shards(shards_root, "train")
run = Runtime(num_threads=1, rank=d.rank, world_size=d.world_size)
store = extract_features(encoders, shards, out / "feats.zarr", batch_size=4,
                         clip=ClipSpec(length=4, crop=64), run=run, chunk_rows=2)
labels = {}
params = KMeansParams(k=3, niter=10, seed=0)
for view in ("video", "audio"):
    mine = cluster_store(store.path, params, view=view).labels if d.is_main else None
    labels[view] = distributed.broadcast_array(mine).tolist()
checks["labels"] = labels
# the whole loop under DDP, observed (not changed): the first step, every labelling, the final weights
seen = {"labels": []}
train_step, make_labels, finish = loop.train_step, loop.make_labels, loop.finish

def first_step(model, optimizer, scaler, batch, targets, **kw):
    if "step" in seen:
        return train_step(model, optimizer, scaler, batch, targets, **kw)
    weights = lambda: {k: v.detach().clone() for k, v in model.module.state_dict().items()}
    before, lr = weights(), optimizer.param_groups[0]["lr"]
    clips = {k: v.clone() for k, v in batch.items() if isinstance(v, torch.Tensor)}
    heads = {f"{m}/{h}": {k: v.clone() for k, v in t.items()} for (m, h), t in targets.items()}
    stats = train_step(model, optimizer, scaler, batch, targets, **kw)
    seen["step"] = {"before": before, "after": weights(), "lr": lr, "batch": clips, "targets": heads}
    torch.save(seen["step"], out / f"step{d.rank}.pt")
    return stats

def labelling(s, store, iteration, **kw):
    labels = make_labels(s, store, iteration, **kw)
    seen["labels"].append({view: l.tolist() for view, l in labels.items()})
    return labels

def final(s, state):
    torch.save({k: v.detach().clone() for k, v in s.learner.state_dict().items()}, out / f"final{d.rank}.pt")
    return finish(s, state)

loop.train_step, loop.make_labels, loop.finish = first_step, labelling, final
result = loop.run(parse_recipe(Path(recipe_path).read_text()))
checks["run_labels"] = seen["labels"]
(out / f"rank{d.rank}.json").write_text(json.dumps(checks))
distributed.cleanup()
"""


def test_two_processes_match_one(tiny_shards: Path, tmp_path: Path) -> None:
    """2 gloo ranks: collectives, extraction and clustering as 1 process; then 2 full iterations of the loop
    end with bit-identical weights and labels on both ranks, and the first step is a 1-process step."""
    root = tiny_shards
    recipe = {
        "name": "ddp",
        "method": "xdc",
        "data": {"shards": str(root), "val_fraction": 0.2, "clip_frames": 4, "crop": 64, "short_side": 64},
        "model": {"width": 0.125},
        "clustering": {"k": 3, "iterations": 2, "niter": 10},
        "optim": {
            "epoch_size": 16,
            "batch_size": 4,
            "lr": 0.05,
            "warmup_epochs": 0,
            "step_epochs": 1,
            "total_epochs": 2,
            "gamma": 0.5,
        },
        "run": {"out": str(tmp_path / "run"), "log_every": 1},
    }
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    (tmp_path / "driver.py").write_text(DRIVER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    args = [str(tmp_path / "driver.py"), str(root), str(tmp_path), str(tmp_path / "recipe.yaml")]
    proc = subprocess.run(
        [str(TORCHRUN), "--standalone", "--nproc_per_node=2", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for checks in ranks:
        assert checks["gather"] == [0, 1, 1] and checks["broadcast"] == [0, 7, 14] and checks["sum"] == [3.0]
    assert ranks[0]["labels"] == ranks[1]["labels"]  # broadcast from rank 0

    # the same extraction and clustering in one process
    shards = find_shards(root, "train")
    one = extract_features(
        encoders(0), shards, tmp_path / "one.zarr", batch_size=4, clip=CLIP, run=Runtime(), chunk_rows=2
    )
    two = open_store(tmp_path / "feats.zarr")
    assert two.complete and np.array_equal(two.read_index(), one.read_index())
    for m in ("video", "audio"):
        np.testing.assert_allclose(two.read(m, 0, 9), one.read(m, 0, 9), rtol=2e-3, atol=1e-3)
    labels = {
        v: cluster_store(one.path, KMeansParams(k=3, niter=10, seed=0), view=v).labels.tolist()
        for v in ("video", "audio")
    }
    assert ranks[0]["labels"] == labels

    # the DDP run: 2 iterations x 2 epochs x 16 clips / (4 clips x 2 ranks) = 8 steps at lr 2 x 0.05
    found = {(it, ep): path for it, ep, path in list_checkpoints(tmp_path / "run")}
    last = load_checkpoint(found[(1, 2)])  # older ones are pruned
    run_labels = ranks[0]["run_labels"]
    assert ranks[1]["run_labels"] == run_labels and len(run_labels) == 3  # iterations 0, 1 and final
    assert run_labels[0] == labels  # iteration 0: the 1-process pseudo-labels
    assert {v: unpack_array(last["labels"][v]).tolist() for v in ("video", "audio")} == run_labels[1]
    assert last["world_size"] == 2 and last["step"] == 8
    finals = [torch.load(tmp_path / f"final{r}.pt", weights_only=True) for r in range(2)]
    assert finals[0].keys() == finals[1].keys()
    differ = [k for k in finals[0] if not torch.equal(finals[0][k], finals[1][k])]
    assert not differ, f"ranks end with different weights or BatchNorm statistics: {differ[:5]}"
    assert all(torch.equal(v, last["model"][k]) for k, v in finals[0].items())
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    schedule = [r for r in records if r["event"] == "schedule"]
    assert [(r["world_size"], r["global_batch"], r["lr"], r["steps_per_epoch"]) for r in schedule] == [
        (2, 8, 0.1, 2)
    ] * 2
    assert [r["lr"] for r in records if r["event"] == "step"] == [0.1, 0.1, 0.05, 0.05] * 2
    assert (
        "- effective schedule: 2 rank(s), global batch 8, lr 0.1"
        in (tmp_path / "run" / "report.md").read_text()
    )
    check_first_step_is_one_process_step(tmp_path, recipe)


def check_first_step_is_one_process_step(tmp_path: Path, recipe: dict) -> None:
    """Rank r stepped on its b = 4 clips; one process steps on all 2b at the same effective lr.

    BatchNorm setting: statistics per rank (PyTorch DDP's default, as the authors' per-GPU BatchNorm),
    so the one-process step normalises each rank's b clips by their own statistics (two forwards,
    one backward of the loss over all 2b clips). The loss is the weighted mean over the global batch
    (trainer.step normalises by the global training weight), so the gradients agree although the
    held-out clips fall unevenly on the ranks. Measured here on one thread: bit-identical (0.0) in every
    parameter; the old per-rank mean differed by 0.011 (the step itself moves weights by up to 0.05, and
    float32 vs float64 of the same step differ by 3e-4).
    """
    steps = [torch.load(tmp_path / f"step{r}.pt", weights_only=True) for r in range(2)]
    for key, value in steps[0]["before"].items():
        assert torch.equal(value, steps[1]["before"][key])
    params = [
        k
        for k, _ in session.build_learner(
            parse_recipe(yaml.safe_dump(recipe)), {"video": 3, "audio": 3}
        ).named_parameters()
    ]
    for key in params:
        assert torch.equal(steps[0]["after"][key], steps[1]["after"][key])
    one = parse_recipe(yaml.safe_dump({**recipe, "optim": {**recipe["optim"], "lr": 0.1}}))
    assert steps[0]["lr"] == effective_schedule(one.optim, 1).lr == 0.1  # 2 x 0.05 on 2 ranks
    learner = session.build_learner(one, {"video": 3, "audio": 3})
    learner.load_state_dict(steps[0]["before"])
    learner.train()
    optimizer = build_optimizer(learner.parameters(), one.optim)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks ran: the same kernels' summation order
    try:
        outputs = [learner({m: st["batch"][m] for m in ("video", "audio")}) for st in steps]
        loss = torch.zeros(())
        for key in steps[0]["targets"]:
            m, h = key.split("/")
            weight = sum(st["targets"][key]["train"].sum() for st in steps)
            for st, out in zip(steps, outputs, strict=True):
                ce = torch.nn.functional.cross_entropy(
                    out[m][h], st["targets"][key]["labels"], reduction="none"
                )
                loss = loss + (ce * st["targets"][key]["train"]).sum() / weight
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    finally:
        torch.set_num_threads(threads)
    moved = 0.0
    for name, p in learner.named_parameters():
        torch.testing.assert_close(p.detach(), steps[0]["after"][name], rtol=0, atol=1e-5)
        moved = max(moved, float((steps[0]["after"][name] - steps[0]["before"][name]).abs().max()))
    assert moved > 1e-3, "the first step barely moved the weights: the comparison would prove nothing"
