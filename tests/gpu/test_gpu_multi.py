"""Every GPU of the machine (run where torch sees 2 or more; `make gpu-check` skips it with the reason on
one): torchrun with one rank per GPU over nccl, and faiss k-means and the streamed assignment on all GPUs.

- DDP over G ranks: every rank takes the same synthetic batch and targets, so the all-reduced (mean)
  gradient is each rank's own and the DDP step equals the plain step on every rank (test_gpu_ddp.py's
  driver, G processes instead of one); the all-reduce of rank + 1 sums to G (G + 1) / 2.
- faiss: `KMeansParams(gpu=G)` trains on G GPUs (faiss.Kmeans(gpu=G), the index sharded over them) and
  `ChunkAssign(gpus=G)` searches with `index_cpu_to_all_gpus`; both must equal one GPU's result up to the
  float-level ties test_gpu_faiss.py explains (same sample, same seed).
"""

from __future__ import annotations

import json
from pathlib import Path

import gpu_helpers as H
import numpy as np
import pytest
from test_gpu_ddp import DRIVER, TIMEOUT_S

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent


def _gpus() -> int:
    import torch

    return torch.cuda.device_count()


@pytest.fixture(autouse=True)
def _several_gpus() -> None:
    if _gpus() < 2:
        pytest.skip(f"torch sees {_gpus()} GPU(s): the multi-GPU case needs 2 or more")


def test_torchrun_one_rank_per_gpu_ddp_step(tmp_path: Path) -> None:
    gpus = _gpus()
    (tmp_path / "driver.py").write_text(DRIVER)
    env = H.child_env(HERE, OMP_NUM_THREADS="2")
    argv = [*H.torchrun(), "--standalone", f"--nproc_per_node={gpus}", str(tmp_path / "driver.py")]
    proc = H.run_group([*argv, "synthetic", str(tmp_path)], TIMEOUT_S, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stdout[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(gpus)]
    H.record(
        f"torchrun {gpus} processes, nccl, one GPU each",
        ddp_vs_plain_max_abs=max(c["max_abs_diff"] for c in ranks),
        largest_weight_change=min(c["max_step"] for c in ranks),
    )
    for r, checks in enumerate(ranks):
        assert checks["env"] == {"RANK": str(r), "WORLD_SIZE": str(gpus), "LOCAL_RANK": str(r)}
        assert checks["backend"] == "nccl" and checks["wrapped"]
        assert checks["all_reduce"] == [gpus * (gpus + 1) / 2] * 4
        assert checks["stats_equal"] and checks["max_step"] > 1e-4
        assert checks["max_abs_diff"] <= 1e-5, f"rank {r}: DDP step differs by {checks['max_abs_diff']}"


def test_kmeans_on_every_gpu_matches_one() -> None:
    H.require("faiss-gpu")
    import faiss

    from xdctools.cluster import KMeansParams, cluster_array

    gpus = faiss.get_num_gpus()
    assert gpus == _gpus(), f"faiss sees {gpus} GPUs, torch {_gpus()}"
    x, _ = H.separated_mixture(65_536, 128, 64, seed=0)
    one = cluster_array(x, KMeansParams(k=64, niter=20, seed=0, gpu=1))
    every = cluster_array(x, KMeansParams(k=64, niter=20, seed=0, gpu="auto"))
    assert one.stats["params"]["gpus"] == 1 and every.stats["params"]["gpus"] == gpus
    H.record(
        f"k-means on {gpus} GPUs vs 1 (65536 x 128, k=64)",
        nmi=H.labels_nmi(one.labels, every.labels),
        train_s_one=one.stats["timings"]["train_s"],
        train_s_every=every.stats["timings"]["train_s"],
    )
    H.assert_labels_agree(one.labels, every.labels, f"k-means on {gpus} GPUs vs 1, same sample and seed")


def test_streamed_assignment_on_every_gpu_matches_one(tmp_path: Path) -> None:
    H.require("faiss-gpu")
    import faiss

    from xdctools.cluster.assign import ChunkAssign, StoreRows
    from xdctools.features.store import create_store

    x, _ = H.separated_mixture(60_000, 128, 64, seed=3)
    store = create_store(tmp_path / "feats.zarr", len(x), {"video": 128}, attrs={"params": {"check": "gpu"}})
    store.write_rows(0, {"video": x}, np.arange(len(x)))
    centroids = x[np.random.default_rng(0).choice(len(x), 64, replace=False)]
    rows, gpus = StoreRows(store, "video"), faiss.get_num_gpus()
    d_one, l_one = ChunkAssign(rows, gpus=1).perform_search(centroids, label_dtype=np.int32)
    d_all, l_all = ChunkAssign(rows, gpus=gpus).perform_search(centroids, label_dtype=np.int32)
    stored = store.read("video", 0, store.n).astype(np.float64)
    atol = 1e-5 * float((stored**2).sum(axis=1).mean())
    agree = H.assignment_agreement(l_one, l_all, d_one, d_all, atol=atol)
    H.record(f"streamed assignment on {gpus} GPUs vs 1 (60000 x 128, k=64)", **agree)
    assert agree["equal"] >= 0.999 and agree["differing_are_ties"] == 1.0, agree
