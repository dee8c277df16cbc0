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

from trainer import distributed
from trainer.checkpoint import list_checkpoints, load_checkpoint, unpack_array
from trainer.data import ClipSpec, Runtime, find_shards
from trainer.extract import extract_features
from trainer.models import r2plus1d_18, resnet18_audio
from xdctools.cluster import cluster_store
from xdctools.errors import ConfigError
from xdctools.features.store import open_store

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = Path(sys.executable).with_name("torchrun")
CLIP = ClipSpec(length=4, crop=64)


def encoders(seed: int = 0) -> dict[str, torch.nn.Module]:
    """What `trainer.loop.build_learner` builds for width 0.125 and this seed."""
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


DRIVER = """
import json, sys
from pathlib import Path
import numpy as np, torch, yaml
torch.set_num_threads(1)
from trainer import distributed, loop
from trainer.data import ClipSpec, Runtime, find_shards
from trainer.extract import extract_features
from trainer.models import r2plus1d_18, resnet18_audio
from xdctools.cluster import cluster_store
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
for view in ("video", "audio"):
    mine = cluster_store(store.path, k=3, view=view, niter=10, seed=0).labels if d.is_main else None
    labels[view] = distributed.broadcast_array(mine).tolist()
checks["labels"] = labels
(out / f"rank{d.rank}.json").write_text(json.dumps(checks))
# the whole loop under DDP
result = loop.run(parse_recipe(Path(recipe_path).read_text()))
distributed.cleanup()
"""


def test_two_processes_match_one(tiny_shards: Path, tmp_path: Path) -> None:
    root = tiny_shards
    recipe = {
        "name": "ddp",
        "method": "xdc",
        "data": {"shards": str(root), "val_fraction": 0.2, "clip_frames": 4, "crop": 64, "short_side": 64},
        "model": {"width": 0.125},
        "clustering": {"k": 3, "iterations": 1, "niter": 10},
        "optim": {"epoch_size": 16, "batch_size": 4, "lr": 0.05, "step_epochs": 1, "total_epochs": 1},
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
        timeout=300,
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
        v: cluster_store(one.path, k=3, view=v, niter=10, seed=0).labels.tolist() for v in ("video", "audio")
    }
    assert ranks[0]["labels"] == labels

    # the DDP training run: iteration 0's pseudo-labels are the 1-process labels; it trained and reported
    found = {(it, ep): path for it, ep, path in list_checkpoints(tmp_path / "run")}
    state = load_checkpoint(found[(0, 0)])
    assert {v: unpack_array(state["labels"][v]).tolist() for v in ("video", "audio")} == labels
    final = load_checkpoint(found[(0, 1)])
    assert final["world_size"] == 2 and final["step"] == 2  # 16 clips / (4 x 2 ranks)
    assert (tmp_path / "run" / "report.md").is_file()
