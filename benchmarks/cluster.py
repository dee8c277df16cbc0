"""Benchmark out-of-core k-means (issues 5 and 17): training time, assignment throughput, peak RSS flat in N.

Figures, each measured in its own subprocess so peak RSS (ru_maxrss) is per task:
  1. faiss training on a 65,536 x d sample, k=256, 20 iterations.
  2. The streamed assignment pass over an N x d float16 store (reading, converting, searching, writing
     labels.npy and distances.npy block by block) vs faiss searching the same rows already in memory as
     float32 (IndexFlatL2.search of all N at once, loading not timed): the real ceiling of a compute-bound
     pass. Ratio = in-memory seconds / streamed seconds (1.0: streaming costs nothing); the fastest of
     `--repeat` interleaved runs of each (on a shared machine the others measure the neighbours).
  3. Peak RSS of clustering a store of N rows and of `--scale` x N rows (k=256, 20 iterations, `--refine`
     Lloyd passes, every stage): `cluster_store` + `save_result` (what the training loop runs) and the
     `xdctools cluster` command, each in a fresh process; the ratio of the two peaks (target <= 1.1).
  4. On an M x 128 float16 store: cluster_store (sample-trained) vs in-memory faiss (same sample, then
     index.search) vs k-means on all points in memory vs scikit-learn MiniBatchKMeans: time, RSS, objective
     (sum of squared distances of every row to its nearest centroid). `--mid 0` skips it.

Data: a Gaussian mixture (1,000 centres) written once to `--workdir`; reads are warm (page cache).
Run: .venv/bin/python benchmarks/cluster.py [--n 1000000 --scale 8 --dim 64 --refine 1 --mid 200000]
(the stores take N x d x 2 x (1 + scale) bytes: 1.15 GB at the defaults; removed after unless --keep)

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
import os
import resource
import shutil
import subprocess
import sys
import tempfile
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

    from xdctools.cluster.assign import ChunkAssign, StoreRows, make_index
    from xdctools.cluster.kmeans import KMeansParams, cluster_store, sample_rows, save_result
    from xdctools.cluster.rowfiles import NpyColumn
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
    elif mode in ("assign", "assign-noprefetch"):  # the streamed pass as cluster_store runs it
        store = open_store(path)
        centroids = np.load(extra)
        with tempfile.TemporaryDirectory(prefix="xdc-bench-assign-") as tmp:
            t = time.perf_counter()
            assign = ChunkAssign(StoreRows(store, "video"), prefetch=mode == "assign")
            columns = {
                "labels": NpyColumn(Path(tmp) / "labels.npy", store.n, np.int32),
                "distances": NpyColumn(Path(tmp) / "distances.npy", store.n, np.float32),
            }
            tally = assign.tally_pass(centroids, **columns)
            for column in columns.values():
                column.close()
            out["seconds"] = time.perf_counter() - t
        out["objective"] = tally.objective
    elif mode == "search-inmemory":  # the ceiling: the same rows already in memory, one faiss search
        store = open_store(path)
        x = np.empty((store.n, store.dims["video"]), dtype=np.float32)
        for start, rows in store.iter_chunks("video"):
            x[start : start + len(rows)] = rows
        index = make_index(np.load(extra), metric="l2", gpus=0)
        t = time.perf_counter()
        dist, _ = index.search(x, 1)
        out["seconds"] = time.perf_counter() - t
        out["objective"] = float(dist.astype(np.float64).sum())
    elif mode == "cluster":  # the training loop's path: cluster_store, then save_result
        target, refine = extra.rsplit(":", 1)
        result = cluster_store(path, KMeansParams(k=K, niter=NITER, seed=SEED, refine=int(refine)))
        save_result(result, Path(target), overwrite=True)
        out["objective"] = result.stats["objective"]
        out["timings"] = result.stats["timings"]
        np.save(Path(target).with_suffix(".centroids.npy"), result.centroids)
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


def run_cli(store: Path, out: Path, refine: int) -> dict:
    """`xdctools cluster` as a user runs it, in a fresh process: seconds and peak RSS (wait4's ru_maxrss)."""
    args = [sys.executable, "-m", "xdctools", "cluster", str(store), "--k", str(K), "--niter", str(NITER)]
    args += ["--seed", str(SEED), "--refine", str(refine), "-o", str(out), "--overwrite"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    with tempfile.TemporaryFile() as log:
        t = time.perf_counter()
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - t
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode:
            log.seek(0)
            raise RuntimeError(f"xdctools cluster failed:\n{log.read().decode()[-3000:]}")
    return {"seconds": seconds, "peak_rss_mb": usage.ru_maxrss / 1024}


def emit(path: Path | None, name: str, value: object, unit: str = "", **extra: object) -> None:
    """One figure as a JSON line, appended at once (a run cut off keeps what it measured)."""
    if path is not None:
        with path.open("a", encoding="utf-8") as f:
            f.write(json.dumps({"name": name, "value": value, "unit": unit, **extra}) + "\n")


def kmeans_in_memory(n: int, gpu: bool, out: Path | None) -> dict:
    """k-means of n x 512 rows (k=256, 20 iterations, every row), faiss on the GPU and/or the CPU; then
    xdctools' cluster_array (sample + streamed assignment) on each. Figures: seconds, objective, NMI."""
    import faiss

    from xdctools.cluster import KMeansParams, cluster_array
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
        result = cluster_array(
            x, KMeansParams(k=K, niter=NITER, seed=SEED, gpu=1 if device == "gpu" else False)
        )
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
    p.add_argument("--n", type=int, default=1_000_000, help="rows of the smaller store (figures 2-3)")
    p.add_argument("--scale", type=int, default=8, help="the larger store has this many times --n rows")
    p.add_argument("--dim", type=int, default=64, help="feature dimension of the figure 1-3 stores")
    p.add_argument("--refine", type=int, default=1, help="Lloyd passes in the figure 3 clusterings")
    p.add_argument("--repeat", type=int, default=3, help="runs of each figure 2 pass (the fastest counts)")
    p.add_argument("--mid", type=int, default=200_000, help="rows of the d=128 store for figure 4 (0: skip)")
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

    wd, d = args.workdir, args.dim
    wd.mkdir(parents=True, exist_ok=True)
    results: dict = {"cpus": faiss.omp_get_max_threads(), "gpus": faiss.get_num_gpus(), "dim": d}
    print(f"faiss {faiss.__version__}, {results['cpus']} OpenMP threads, {results['gpus']} GPUs")
    results["baseline"] = run("baseline")
    print(f"imports alone: peak RSS {results['baseline']['peak_rss_mb']:.0f} MB")

    r = results["train"] = run("train", "", str(d))
    print(f"(1) faiss training 65,536 x {d}, k={K}, {NITER} iterations: {r['seconds']:.2f} s")

    sizes = {"n": args.n, "scaled": args.n * args.scale}
    for name, n in sizes.items():
        path = wd / f"{name}-{n}x{d}.zarr"
        made = make_store(path, n, d)
        print(f"store {path.name}: {n * d * 2 / 1e9:.2f} GB" + (f", written in {made:.0f} s" if made else ""))
        run("read", path)  # warm the page cache for the timed passes
        cl = run("cluster", path, f"{wd / f'out-{name}'}:{args.refine}")
        cli = run_cli(path, wd / f"cli-{name}", args.refine)
        results[name] = {"n": n, "cluster": cl, "cli": cli}
        print(
            f"(3) N={n:,}: peak RSS cluster_store + save_result {cl['peak_rss_mb']:.0f} MB "
            f"in {cl['seconds']:.1f} s ({', '.join(f'{k} {v:.1f}' for k, v in cl['timings'].items())}); "
            f"xdctools cluster {cli['peak_rss_mb']:.0f} MB in {cli['seconds']:.1f} s"
        )
        if name == "n":  # throughput at the smaller N: the in-memory ceiling holds all rows as float32
            cents = wd / "out-n.centroids.npy"
            modes = ("assign", "assign-noprefetch", "search-inmemory")
            runs: dict[str, list[dict]] = {m: [] for m in modes}
            for _ in range(args.repeat):  # interleaved; the fastest of each counts (others share the CPU)
                for m in modes:
                    runs[m].append(run(m, path, str(cents)))
            assign, serial, ceiling = (min(runs[m], key=lambda r: r["seconds"]) for m in modes)
            results[name].update(assign=assign, assign_noprefetch=serial, search_inmemory=ceiling)
            results[name]["seconds_all"] = {m: [r["seconds"] for r in rs] for m, rs in runs.items()}
            print(
                f"(2) N={n:,} x {d}, k={K}, fastest of {args.repeat}: "
                f"streamed assignment pass {assign['seconds']:.2f} s "
                f"({n / assign['seconds']:,.0f} rows/s; without prefetch {serial['seconds']:.2f} s), "
                f"faiss search in memory {ceiling['seconds']:.2f} s ({n / ceiling['seconds']:,.0f} rows/s): "
                f"throughput ratio {ceiling['seconds'] / assign['seconds']:.2f} (1.0: the ceiling); "
                f"peak RSS streamed {assign['peak_rss_mb']:.0f} MB, in memory {ceiling['peak_rss_mb']:.0f} MB"
            )
    small, big = results["n"], results["scaled"]
    ratios = {what: big[what]["peak_rss_mb"] / small[what]["peak_rss_mb"] for what in ("cluster", "cli")}
    results["rss_ratio"] = ratios
    print(
        f"(3) peak RSS at {big['n']:,} / at {small['n']:,} rows: cluster_store + save_result "
        f"{ratios['cluster']:.3f}, xdctools cluster {ratios['cli']:.3f} (target <= 1.1; per-row outputs held "
        f"in memory would add {16 * (big['n'] - small['n']) / 2**20:.0f} MB)"
    )

    if args.mid:
        path = wd / f"mid-{args.mid}x128.zarr"
        make_store(path, args.mid, 128)
        run("read", path)
        rows = {m: run(m, path, f"{wd / 'out-mid'}:0") for m in ("cluster", "inmemory", "full", "minibatch")}
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
    for out in (*wd.glob("out-*"), *wd.glob("cli-*")):
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    if not args.keep:
        for store in wd.glob("*.zarr"):
            shutil.rmtree(store)


if __name__ == "__main__":
    main()
