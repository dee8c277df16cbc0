"""torchrun with one process on the GPU: the library's nccl process group, a collective, and the loop's
DDP-wrapped XDC step that equals the plain step on the same clips.

`trainer.distributed.init` starts the process group whenever torchrun launched the process, even alone,
and `session.wrap_for_training` then wraps the learner in DDP: one GPU runs the nccl path N GPUs run. The
loop under torchrun is run by test_gpu_recipe.py.

The batch: one from the GPU loader on the check's shards where DALI imports, else (the lent GPU's image,
or XDC_GPU_INPUTS=synthetic) `gpu_helpers.synthetic_batch` of the same shapes: what is compared is the
DDP step against the plain step on the same batch, whatever its pixels.
"""

from __future__ import annotations

import json
from pathlib import Path

import gpu_helpers as H
import pytest

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
TIMEOUT_S = 240

DRIVER = """
import copy, json, os, sys
import torch, torch.distributed as dist, yaml
from torch import nn
import gpu_helpers as H
from trainer import distributed, session
from trainer.data import ClipSpec, Runtime, find_shards, train_loader
from trainer.optim import build_optimizer
from trainer.step import make_scaler, train_step
from xdctools.recipe import parse_recipe

shards_root, out = sys.argv[1:3]  # shards_root "synthetic": H.synthetic_batch instead of the loader
checks = {"env": {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}}
d = distributed.init("gpu")
checks["library_group"] = dist.is_initialized()
device = d.device
checks["backend"] = dist.get_backend()
x = torch.full((4,), float(dist.get_rank() + 1), device=device)
dist.all_reduce(x)
checks["all_reduce"] = x.tolist()

torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
recipe = parse_recipe(yaml.safe_dump({
    "name": "ddp1", "method": "xdc",
    "data": {"shards": shards_root, "device": "gpu", "crop": 112, "short_side": 128},
    "model": {"width": 0.5}, "clustering": {"k": 8},
    "optim": {"epoch_size": 8, "batch_size": 8, "lr": 0.05, "step_epochs": 1, "total_epochs": 1},
    "run": {"out": out},
}))
learner = session.build_learner(recipe, {"video": 8, "audio": 8}).to(device)
plain = copy.deepcopy(learner)
ddp = session.wrap_for_training(learner, recipe, d)  # the loop's own wrapping: DDP under torchrun
checks["wrapped"] = isinstance(ddp, nn.parallel.DistributedDataParallel)
if shards_root == "synthetic":
    batch = H.synthetic_batch(8, crop=112)
else:
    run = Runtime(device="gpu", num_threads=4, seed=0)
    batch = next(iter(train_loader(find_shards(shards_root, "train"), batch_size=8, epoch_size=8,
                                   clip=ClipSpec(crop=112), run=run)))
gen = torch.Generator().manual_seed(0)
targets = {key: {"labels": torch.randint(0, 8, (8,), generator=gen).to(device),
                 "train": torch.ones(8, device=device), "val": torch.zeros(8, device=device)}
           for key in learner.head_keys}
before = {k: v.detach().clone() for k, v in plain.named_parameters()}
stats = []
for model, params in ((ddp, learner.parameters()), (plain, plain.parameters())):
    opt = build_optimizer(params, recipe.optim)
    stats.append(train_step(model, opt, make_scaler(device, "fp32"), batch, targets, device=device).cpu())
after_ddp, after_plain = learner.state_dict(), plain.state_dict()
gap = lambda a, b: max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
checks["max_abs_diff"] = gap(after_ddp, after_plain)
checks["max_step"] = gap({k: after_plain[k] for k in before}, before)  # parameters, not BN counters
checks["stats_equal"] = bool(torch.allclose(stats[0], stats[1], rtol=1e-6, atol=1e-6))
with open(os.path.join(out, f"rank{dist.get_rank()}.json"), "w") as f:
    json.dump(checks, f)
distributed.cleanup()
"""


def test_torchrun_one_process_nccl_ddp_step(request: pytest.FixtureRequest, tmp_path: Path) -> None:
    inputs = H.input_mode()
    if inputs == "synthetic":
        shards = "synthetic"
    else:
        shards = str(H.shard_set(request.getfixturevalue("gpu_shards"), "synth-vp9"))
    (tmp_path / "driver.py").write_text(DRIVER)
    env = H.child_env(HERE, OMP_NUM_THREADS="4")
    argv = [*H.torchrun(), "--standalone", "--nproc_per_node=1", str(tmp_path / "driver.py"), shards]
    proc = H.run_group([*argv, str(tmp_path)], TIMEOUT_S, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stdout[-4000:]
    checks = json.loads((tmp_path / "rank0.json").read_text())
    H.record(
        "torchrun 1 process, nccl",
        inputs=inputs,
        backend=checks["backend"],
        library_started_a_group=checks["library_group"],
        ddp_vs_plain_max_abs=checks["max_abs_diff"],
        largest_weight_change=checks["max_step"],
    )
    assert checks["env"] == {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}
    assert checks["backend"] == "nccl" and checks["all_reduce"] == [1.0] * 4
    assert checks["library_group"] is True and checks["wrapped"]  # the N-GPU path on one GPU
    assert checks["stats_equal"]
    assert checks["max_step"] > 1e-4, "the step barely moved the weights: the comparison would prove nothing"
    assert checks["max_abs_diff"] <= 1e-5, f"DDP step differs from the plain step by {checks['max_abs_diff']}"
