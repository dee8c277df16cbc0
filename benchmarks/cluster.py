"""Benchmark out-of-core k-means (issue 5): training time, assignment-pass throughput and peak RSS, objective.

Figures, each measured in its own subprocess so peak RSS (ru_maxrss) is per task:
  1. faiss training on a 65,536 x 512 sample, k=256, 20 iterations.
  2. Streaming assignment pass over an N x 512 float16 store vs a plain sequential read of the same store.
  3. Peak RSS of that pass (and of a whole cluster_store run) at two N: flat in N.
  4. On an M x 128 float16 store: cluster_store (sample-trained) vs in-memory faiss (same sample, then
     index.search) vs k-means on all points in memory vs scikit-learn MiniBatchKMeans: time, RSS, objective
     (sum of squared distances of every row to its nearest centroid).

Data: a Gaussian mixture (1,000 centres) written once to `--workdir`; reads are warm (page cache).
Run: .venv/bin/python benchmarks/cluster.py [--big 2000000 --small 500000 --mid 200000]

`--kmeans N` adds (and `--kmeans-only` runs only) k-means of N x 512 rows in memory, k=256, 20
iterations, on every row: faiss on the GPU (`--device cuda`, faiss-gpu) against faiss on the CPU, same
data and seed, plus `cluster_array` (sample of k x 256 rows, streamed assignment of all) on each. `make
gpu-check` runs `--device cuda --kmeans 1000000 --kmeans-only`. `--json-out FILE` appends those figures
as JSON lines as they are measured.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

K, SEED, NITER = 256, 0, 20


def mixture(start: int, stop: int, d: int) -> np.ndarray:
    """Rows [start, stop) of a fixed Gaussian mixture: deterministic whatever the block boundaries."""
    centres = np.random.default_rng(1234 + d).standard_normal((1000, d), dtype=np.float32) * 2
    rng = np.random.default_rng([start, d])
    labels = rng.integers(0, len(centres), stop - start)
    return centres[labels] + rng.standard_normal((stop - start, d), dtype=np.float32)


def make_store(path: Path, n: int, d: int) -> float:
    from xdctools.features.store import create_store, open_store

    if path.exists() and open_store(path).complete and open_store(path).n == n:
        return 0.0
    t = time.perf_counter()
    store = create_store(path, n, {"video": d}, overwrite=True, attrs={"params": {"bench": "mixture"}})
    step = store.chunk_rows * 16
    for a in range(0, n, step):
        b = min(a + step, n)
        store.write_rows(a, {"video": mixture(a, b, d)}, np.arange(a, b))
    return time.perf_counter() - t


def objective(x: np.ndarray, centroids: np.ndarray) -> float:
    import faiss

    index = faiss.IndexFlatL2(x.shape[1])
    index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    total = 0.0
    for a in range(0, len(x), 65536):
        dist, _ = index.search(x[a : a + 65536], 1)
        total += float(dist.astype(np.float64).sum())
    return total


# ---- workers: one task each, in a fresh process ----------------------------------------------------
def work(mode: str, path: str, extra: str) -> dict:
    import faiss

    from xdctools.cluster.assign import ChunkAssign, StoreRows
    from xdctools.cluster.kmeans import cluster_store, sample_rows
    from xdctools.features.store import open_store

    out: dict = {}
    t = time.perf_counter()
    if mode == "baseline":  # imports only: the floor under every RSS figure
        pass
    elif mode == "train":
        d = int(extra)
        x = mixture(0, 65536, d)
        t = time.perf_counter()
        km = faiss.Kmeans(d, K, niter=NITER, seed=SEED, max_points_per_centroid=256)
        km.train(x)
        out["objective_sample"] = float(km.obj[-1])
    elif mode == "read":
        store = open_store(path)
        rows = sum(len(x) for _, x in store.iter_chunks("video"))
        out["rows"] = rows
    elif mode in ("assign", "assign-noprefetch"):
        store = open_store(path)
        centroids = np.load(extra)
        t = time.perf_counter()
        assign = ChunkAssign(StoreRows(store, "video"), prefetch=mode == "assign")
        dist, _ = assign.perform_search(centroids, label_dtype=np.int32)
        out["objective"] = float(dist.astype(np.float64).sum())
    elif mode == "cluster":
        result = cluster_store(path, k=K, niter=NITER, seed=SEED)
        out["objective"] = result.stats["objective"]
        out["timings"] = result.stats["timings"]
        np.save(extra, result.centroids)
    elif mode in ("inmemory", "full", "minibatch"):
        store = open_store(path)
        x = store.read("video", 0, store.n).astype(np.float32)
        n, d = x.shape
        if mode == "minibatch":
            from sklearn.cluster import MiniBatchKMeans

            mb = MiniBatchKMeans(K, batch_size=4096, n_init=1, random_state=SEED).fit(x)
            centroids = mb.cluster_centers_
        elif mode == "full":  # every point in training: Lloyd on all of x in memory
            km = faiss.Kmeans(d, K, niter=NITER, seed=SEED, max_points_per_centroid=math.ceil(n / K))
            km.train(x)
            centroids = km.centroids
        else:  # same sample and seed as cluster_store, then assign everything at once
            km = faiss.Kmeans(d, K, niter=NITER, seed=SEED, max_points_per_centroid=256)
            km.train(x[sample_rows(n, K * 256, SEED)])
            km.index.search(x, 1)
            centroids = km.centroids
        out["seconds"] = time.perf_counter() - t  # reading the store included, as for cluster_store
        out["objective"] = objective(x, centroids)
    out.setdefault("seconds", time.perf_counter() - t)
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def run(mode: str, path: Path | str = "", extra: str = "") -> dict:
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", mode, str(path), extra],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode:
        raise RuntimeError(f"worker {mode} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def emit(path: Path | None, name: str, value: object, unit: str = "", **extra: object) -> None:
    """One figure as a JSON line, appended at once (a run cut off keeps what it measured)."""
    if path is not None:
        with path.open("a", encoding="utf-8") as f:
            f.write(json.dumps({"name": name, "value": value, "unit": unit, **extra}) + "\n")


def kmeans_in_memory(n: int, gpu: bool, out: Path | None) -> dict:
    """k-means of n x 512 rows (k=256, 20 iterations, every row), faiss on the GPU and/or the CPU; then
    xdctools' cluster_array (sample + streamed assignment) on each. Figures: seconds, objective, NMI."""
    import faiss

    from xdctools.cluster import cluster_array
    from xdctools.cluster.report import cluster_metrics

    d = 512
    t = time.perf_counter()
    x = np.concatenate([mixture(a, min(a + 131_072, n), d) for a in range(0, n, 131_072)])
    print(
        f"k-means data: {n} x {d} float32 ({x.nbytes / 1e9:.1f} GB) made in {time.perf_counter() - t:.1f} s"
    )
    devices = (["gpu"] if gpu else []) + ["cpu"]
    if gpu:  # GPU resources and cuBLAS start once, outside the timing
        faiss.Kmeans(d, K, niter=1, seed=SEED, gpu=True).train(x[: 256 * K])
    results: dict = {}
    labels = {}
    for device in devices:
        km = faiss.Kmeans(
            d, K, niter=NITER, seed=SEED, gpu=device == "gpu", max_points_per_centroid=math.ceil(n / K)
        )
        t = time.perf_counter()
        km.train(x)
        train_s = time.perf_counter() - t
        _, found = km.index.search(x, 1)
        labels[device] = found[:, 0]
        results[device] = {"train_s": train_s, "objective": float(km.obj[-1])}
        print(f"faiss k-means {device}: {n} x {d}, k={K}, {NITER} iterations on every row: {train_s:.2f} s")
        emit(out, f"faiss k-means {device}, {n} x {d}, k={K}, all rows", round(train_s, 2), "s",
             objective=results[device]["objective"])  # fmt: skip
    if gpu:
        speedup = results["cpu"]["train_s"] / results["gpu"]["train_s"]
        nmi = cluster_metrics(labels["cpu"], labels["gpu"])["nmi"]
        gap = abs(results["gpu"]["objective"] / results["cpu"]["objective"] - 1)
        print(f"GPU / CPU: x{speedup:.1f} faster, label NMI {nmi:.4f}, objective gap {gap:.1e}")
        emit(out, "faiss k-means GPU speed-up over CPU", round(speedup, 1), "x", nmi=round(nmi, 4),
             objective_gap=gap)  # fmt: skip
    for device in devices:
        t = time.perf_counter()
        result = cluster_array(x, k=K, niter=NITER, seed=SEED, gpu=1 if device == "gpu" else False)
        seconds = time.perf_counter() - t
        timings = {k: round(v, 2) for k, v in result.stats["timings"].items()}
        print(f"cluster_array {device}: {seconds:.2f} s ({timings})")
        emit(out, f"cluster_array {device} (sample {K * 256}, streamed assignment of {n})", round(seconds, 2),
             "s", **timings)  # fmt: skip
        results[f"cluster_array_{device}"] = {"seconds": seconds, "timings": timings}
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/xdc-bench-cluster"))
    p.add_argument("--big", type=int, default=2_000_000, help="rows of the d=512 store for figures 2-3")
    p.add_argument("--small", type=int, default=500_000, help="second N for the RSS figure")
    p.add_argument("--mid", type=int, default=200_000, help="rows of the d=128 store for figure 4")
    p.add_argument("--keep", action="store_true", help="keep the stores for another run")
    p.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="cuda: faiss-gpu for --kmeans")
    p.add_argument("--kmeans", type=int, default=0, metavar="N", help="also k-means N x 512 in memory")
    p.add_argument("--kmeans-only", action="store_true", help="run only the --kmeans figures")
    p.add_argument("--json-out", type=Path, help="append the --kmeans figures to this JSON-lines file")
    args = p.parse_args()
    if args.worker:
        print(json.dumps(work(*args.worker)))
        return
    if args.kmeans:
        import faiss

        if args.device == "cuda" and faiss.get_num_gpus() == 0:
            sys.exit(f"--device cuda: faiss {faiss.__version__} sees no GPU (is faiss-gpu-cu12 installed?)")
        kmeans_in_memory(args.kmeans, args.device == "cuda", args.json_out)
        if args.kmeans_only:
            return

    import faiss

    wd = args.workdir
    wd.mkdir(parents=True, exist_ok=True)
    results: dict = {"cpus": faiss.omp_get_max_threads(), "gpus": faiss.get_num_gpus()}
    print(f"faiss {faiss.__version__}, {results['cpus']} OpenMP threads, {results['gpus']} GPUs")
    results["baseline"] = run("baseline")
    print(f"imports alone: peak RSS {results['baseline']['peak_rss_mb']:.0f} MB")

    r = results["train"] = run("train", "", "512")
    print(f"(1) faiss training 65,536 x 512, k={K}, {NITER} iterations: {r['seconds']:.2f} s (target <= 5 s)")

    for name, n in (("small", args.small), ("big", args.big)):
        path = wd / f"{name}-{n}x512.zarr"
        made = make_store(path, n, 512)
        print(
            f"store {path.name}: {n * 512 * 2 / 1e9:.2f} GB" + (f", written in {made:.0f} s" if made else "")
        )
        cents = wd / f"{name}-centroids.npy"
        np.save(cents, mixture(10**9, 10**9 + K, 512))
        run("read", path)  # warm the page cache for both timed passes
        read = run("read", path)
        assign = run("assign", path, str(cents))
        serial = run("assign-noprefetch", path, str(cents))
        cl = run("cluster", path, str(wd / "c.npy"))
        results[name] = {"n": n, "read": read, "assign": assign, "assign_noprefetch": serial, "cluster": cl}
        print(
            f"(2) N={n}: sequential read {read['seconds']:.2f} s ({n / read['seconds']:,.0f} rows/s), "
            f"assignment pass {assign['seconds']:.2f} s ({n / assign['seconds']:,.0f} rows/s): "
            f"ratio {read['seconds'] / assign['seconds']:.2f} (target >= 0.7); "
            f"without prefetch {serial['seconds']:.2f} s"
        )
        print(
            f"(3) N={n}: peak RSS read {read['peak_rss_mb']:.0f} MB, "
            f"assign pass {assign['peak_rss_mb']:.0f} MB, "
            f"whole cluster_store {cl['peak_rss_mb']:.0f} MB in {cl['seconds']:.1f} s "
            f"({', '.join(f'{k} {v:.1f}' for k, v in cl['timings'].items())})"
        )

    path = wd / f"mid-{args.mid}x128.zarr"
    make_store(path, args.mid, 128)
    run("read", path)
    rows = {m: run(m, path, str(wd / "c.npy")) for m in ("cluster", "inmemory", "full", "minibatch")}
    results["mid"] = {"n": args.mid, **rows}
    best = rows["full"]["objective"]
    print(f"(4) N={args.mid} x 128 float16 store, k={K}:")
    print(f"    {'method':<44} {'time s':>7} {'peak RSS MB':>11} {'objective':>14} {'vs full':>8}")
    labels = {
        "cluster": "cluster_store (sample, streamed assign)",
        "inmemory": "in-memory faiss: same sample + index.search",
        "full": "in-memory faiss k-means on all points",
        "minibatch": "sklearn MiniBatchKMeans (batch 4096)",
    }
    for m, r in rows.items():
        print(
            f"    {labels[m]:<44} {r['seconds']:>7.2f} {r['peak_rss_mb']:>11.0f} {r['objective']:>14.6g} "
            f"{(r['objective'] / best - 1) * 100:>+7.2f}%"
        )
    ratio = rows["cluster"]["seconds"] / rows["inmemory"]["seconds"]
    print(f"    time ratio cluster_store / in-memory faiss: {ratio:.2f}")
    (wd / "results.json").write_text(json.dumps(results, indent=1))
    print(f"results in {wd / 'results.json'}")
    if not args.keep:
        for store in wd.glob("*.zarr"):
            shutil.rmtree(store)


if __name__ == "__main__":
    main()
