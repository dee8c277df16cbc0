#!/usr/bin/env python3
"""The stages of `make gpu-check`, each with its own time limit, results written as they come.

    python scripts/gpu_check.py [--out gpu-check] [--budget 480] [--only A,B] [--skip C] [--list] [--image]
    python scripts/gpu_check.py --build-shards DIR [--media DIR|none] [--small]   # the check's shards
    python scripts/gpu_check.py --env-json FILE                                   # versions, card
    python scripts/gpu_check.py --report-only [--out gpu-check]                   # report from results

`scripts/gpu_check.sh` (what `make gpu-check` runs) stops at once without a CUDA device, installs the
GPU environment (or, in image mode, the carried wheels beside the machine's own torch), then runs this
with that environment's Python. Every stage is a subprocess in its own process group, killed (TERM, then
KILL) at its time limit; the test and benchmark stages also share a budget (--budget: 8 minutes, 6 in
image mode), so one hang cannot eat the run, and --deadline ends everything by a wall-clock limit (a
device call's). A stage whose dependency is missing here (DALI, faiss-gpu, the shard tools) is not
started: it is recorded as skipped, with the reason. After each stage its record is appended to
OUT/results.jsonl and OUT/report.md is rewritten, so a run cut off anywhere leaves every figure
measured so far. Stage logs: OUT/logs/<stage>.log; figures: OUT/logs/<stage>.figures.jsonl, written by
the tests (`gpu_helpers.record`) and benchmarks (`--json-out`) as they measure.

--image (image mode: the GPU machine's own Python and CUDA 13 torch, no package index; see
docs/gpu-check.md): the tests that can run get synthetic inputs instead of DALI-loaded clips
(XDC_GPU_INPUTS=synthetic), and a CPU k-means benchmark (faiss-cpu) stands in for the faiss-gpu ones.

Exit status: 0 every stage passed (or skipped), 1 a stage failed, timed out or was not run, 6 no CUDA
device (the project's "missing dependency" code). Standard library only: it must start anywhere.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import importlib.util
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = Path(__file__).resolve()
EXIT_FAILED, EXIT_NO_CUDA = 1, 6
DEFAULT_BUDGET_S = 480.0  # tests + benchmarks on one H100: 8 minutes
IMAGE_BUDGET_S = 360.0  # image mode: what runs there fits one 10-minute device call with start-up
MIN_STAGE_S = 15.0  # a stage is not started with less budget than this left
KILL_GRACE_S = 5.0
TAIL_LINES = 25
OK = ("passed", "skipped")
# benchmarks/models.py options the check times: each speed option alone, the recipe's pair, and the
# fully compiled step; compiled ones last, so a cut-off run still has the eager figures.
SPEED_OPTIONS = "eager-fp32,channels-last,bf16,fp16,channels-last+bf16,compile,compile+channels-last+bf16"


@dataclass
class Stage:
    name: str
    kind: str  # "setup", "test" or "bench"
    timeout_s: float
    argv: list[str]
    what: str
    needs: tuple[str, ...] = ()  # stages that must have passed (or been skipped)
    budgeted: bool = True  # counts against --budget (tests and benchmarks)
    requires: tuple[str, ...] = ()  # what must be importable or installed here: see REQUIREMENTS


@dataclass
class Record:
    """What a stage left: written to results.jsonl when it ends, and read back by --report-only."""

    stage: str
    kind: str
    what: str
    status: str  # passed, failed, timeout, skipped, not-run, interrupted, running
    seconds: float = 0.0
    limit_s: float = 0.0
    rc: int | None = None
    summary: str = ""
    tests: list[dict[str, str]] = field(default_factory=list)
    figures: list[dict[str, Any]] = field(default_factory=list)
    tail: list[str] = field(default_factory=list)
    log: str = ""
    started: str = ""


@dataclass
class Context:
    out: Path
    work: Path
    python: str = sys.executable
    media: Path | None = None
    budget_s: float = DEFAULT_BUDGET_S
    image: bool = False  # image mode: the lent GPU's own Python, carried wheels, no index
    deadline_s: float | None = None  # every stage ends within this many seconds of run_all's start

    @property
    def logs(self) -> Path:
        return self.out / "logs"

    @property
    def shards(self) -> Path:
        return self.work / "shards"


# --- the stages --------------------------------------------------------------------------------


def plan(ctx: Context) -> list[Stage]:
    """Every stage in run order: setup, then the tests and benchmarks, compile-heavy ones last.

    Each names what it requires (REQUIREMENTS): where that is missing, the stage is skipped with the
    reason. In image mode (no DALI, no faiss-gpu) what is left runs test-ddp, test-step, bench-speed,
    then bench-kmeans-cpu, which only image mode plans (the full mode's bench-kmeans times the CPU too).
    """
    py, s = ctx.python, ctx.shards
    dali = ("dali",)

    def test(name: str, module: str, timeout: float, what: str, needs=("shards",), requires=dali) -> Stage:
        argv = [py, "-m", "pytest", "-v", "-p", "no:cacheprovider", f"tests/gpu/{module}"]
        return Stage(name, "test", timeout, argv, what, needs=needs, requires=requires)

    def bench(
        name: str,
        script: str,
        timeout: float,
        what: str,
        *args: str,
        needs=("shards",),
        requires=dali,
        device: str = "cuda",
    ) -> Stage:
        fig = str(ctx.logs / f"{name}.figures.jsonl")
        argv = [py, f"benchmarks/{script}", "--device", device, *args, "--json-out", fig]
        return Stage(name, "bench", timeout, argv, what, needs=needs, requires=requires)

    media = str(ctx.media) if ctx.media else "none"
    kmeans = ["--kmeans", "1000000", "--kmeans-only", "--workdir", str(ctx.work / "bench-cluster")]
    stages = [
        Stage("env", "setup", 120, [py, str(SCRIPT), "--env-json", str(ctx.out / "env.json")],
              "card, driver, CUDA, torch, DALI, faiss versions", budgeted=False),
        Stage("shards", "setup", 300, [py, str(SCRIPT), "--build-shards", str(s), "--media", media],
              "synthetic + real clips, VP9 and H.264 (xdctools synth / shard --codec)", budgeted=False,
              requires=("dali", "shard-tools")),
        test("test-decode", "test_gpu_decode.py", 90, "DALI mixed decode of VP9 and H.264 = CPU decode"),
        test("test-align", "test_gpu_align.py", 60, "flash/click audio-video alignment, GPU loader",
             requires=("dali", "shard-tools")),
        test("test-faiss", "test_gpu_faiss.py", 60, "faiss-gpu k-means vs CPU (NMI), streamed GPU assignment",
             needs=(), requires=("faiss-gpu",)),
        test("test-multi-gpu", "test_gpu_multi.py", 150, "every GPU: torchrun G ranks (nccl DDP step = plain "
             "step on each), faiss k-means and streamed assignment on all GPUs = on one",
             needs=(), requires=("multi-gpu",)),
        # DALI-loaded clips where DALI is here, synthetic tensors of the same shapes where not
        test("test-ddp", "test_gpu_ddp.py", 90, "torchrun, 1 process: nccl group, DDP step = plain step",
             requires=()),
        test("test-recipe", "test_gpu_recipe.py", 150, "Kinetics XDC recipe: 20 steps, width 1, 8x112^2"),
        bench("bench-loader", "loader.py", 120, "DALI mixed loader clips/s vs R(2+1)D-18 step (goal >= 2x)",
              "--shards", str(s / "loader-vp9"), "--skip-pyav", "--batches", "10", "--rounds", "3",
              "--warmup", "3", "--train-steps", "10"),
        bench("bench-seek", "seek.py", 60, "does DALI's GPU decoder seek: clip at frame 0 vs 280",
              "--shards", str(s / "long-vp9"), str(s / "long-h264")),
        bench("bench-kmeans", "cluster.py", 120, "faiss-gpu k-means 1M x 512, k=256 (vs CPU)", *kmeans,
              needs=(), requires=("faiss-gpu",)),
        test("test-step", "test_gpu_step.py", 200, "bf16 + channels-last + compile steps vs fp32 eager",
             requires=()),
        bench("bench-speed", "models.py", 240, "R(2+1)D-18 step per speed option vs eager fp32",
              "--iters", "10", "--warmup", "3", "--options", SPEED_OPTIONS, needs=(), requires=()),
    ]  # fmt: skip
    if ctx.image:  # last: it needs no GPU, so it gets only what the GPU stages left of the budget
        stages.append(bench("bench-kmeans-cpu", "cluster.py", 120, "faiss-cpu k-means 1M x 512, k=256 on "
                            "this machine's cores (no faiss-gpu here)", *kmeans, needs=(),
                            requires=("faiss",), device="cpu"))  # fmt: skip
    return stages


# What a stage may require, and why it can be missing. Read from the env stage's env.json (gather_env).
REQUIREMENTS = ("dali", "faiss-gpu", "faiss", "shard-tools", "multi-gpu")
SHARD_MODULES = {"av": "PyAV", "librosa": "librosa", "webdataset": "webdataset", "ffmpeg": "ffmpeg-python"}
DALI_SIZE = "788 MB installed for nvidia-dali-cuda120 2.4.0"


def unmet(requirement: str, env: dict[str, Any], image: bool) -> str | None:
    """Why `requirement` is not met on the machine env.json describes, or None when it is."""
    faiss = env.get("faiss", {})
    if requirement == "dali":
        if not str(env.get("dali", "error")).startswith("error"):
            return None
        detail = str(env.get("dali", "error: not probed")).removeprefix("error: ")
        why = f"nvidia-dali not importable ({detail})"
        if image:
            return (f"{why}: DALI's wheel ({DALI_SIZE}) cannot be carried to this machine, whose device "
                    "calls carry 64 MiB in all and which reaches no package index")  # fmt: skip
        return f"{why}: install xdctools[gpu] (nvidia-dali-cuda120), as scripts/gpu_check.sh does"
    if requirement in ("faiss", "faiss-gpu"):
        version = str(faiss.get("version", "error: not probed"))
        if version.startswith("error"):
            why = f"faiss not importable ({version.removeprefix('error: ')})"
        elif requirement == "faiss" or faiss.get("gpus", 0) >= 1:
            return None
        elif faiss.get("gpu_build") is False:
            why = f"faiss {version} is a CPU build (faiss-cpu)"
        else:
            why = f"faiss {version} sees no GPU"
        if requirement == "faiss":
            tail = "scripts/gpu_wheels.sh carries faiss-cpu unless it does not fit (--no-faiss)"
        elif image:
            tail = (
                "no faiss GPU build can be carried here: faiss-gpu-cu12 needs CUDA 12's runtime and "
                "cuBLAS, absent from this CUDA 13 image, and the CUDA 13 build (faiss-gpu-cuvs, 119 MB, "
                "plus libcuvs, libraft and librmm) exceeds the 64 MiB a device call carries"
            )
        else:
            tail = "install xdctools[gpu] (faiss-gpu-cu12), not faiss-cpu: they are the same module"
        return f"{why}: {tail}"
    if requirement == "multi-gpu":
        count = env.get("torch", {}).get("device_count", 0)
        if count >= 2:
            return None
        return f"torch sees {count} GPU(s) here: the multi-GPU case runs on a machine with 2 or more"
    if requirement == "shard-tools":
        modules = env.get("modules", {})
        lacking = [name for module, name in SHARD_MODULES.items() if not modules.get(module)]
        if str(env.get("ffmpeg", "error")).startswith("error") or not env.get("ffprobe", True):
            lacking.append("the ffmpeg and ffprobe programs")
        if not lacking:
            return None
        why = f"building the check's shards needs {', '.join(lacking)}, missing here"
        return why + (" (not carried: only the DALI stages use the shards)" if image else "")
    raise ValueError(f"unknown requirement {requirement!r}")


def select(stages: list[Stage], only: str | None, skip: str | None) -> list[Stage]:
    names = {s.name for s in stages}
    wanted = set(only.split(",")) if only else names
    dropped = set(skip.split(",")) if skip else set()
    unknown = (wanted | dropped) - names
    if unknown:
        raise SystemExit(f"Error: unknown stage(s) {', '.join(sorted(unknown))}; stages: {', '.join(names)}")
    return [s for s in stages if s.name in wanted and s.name not in dropped]


# --- running one stage -------------------------------------------------------------------------

_current: subprocess.Popen | None = None  # the stage running now, for the signal handler


def process_tree(pid: int) -> list[int]:
    """`pid` and all its descendants now (Linux /proc), whatever process group or session they joined."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        fields = text[text.rindex(")") + 2 :].split()  # after "pid (comm) ": state, ppid, pgrp, ...
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    tree, todo = [], [pid]
    while todo:
        tree.append(todo.pop())
        todo.extend(children.get(tree[-1], []))
    return tree


def kill_group(proc: subprocess.Popen) -> None:
    """TERM the stage's process group and every descendant (a test's torchrun may run in a session of its
    own), then KILL whatever is left after a grace period."""
    tree = process_tree(proc.pid)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)
        for pid in tree[1:]:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        try:
            proc.wait(timeout=KILL_GRACE_S)
        except subprocess.TimeoutExpired:
            continue
        if sig == signal.SIGTERM and not any(Path(f"/proc/{pid}").exists() for pid in tree[1:]):
            return


def run_stage(stage: Stage, ctx: Context, limit_s: float, env: dict[str, str] | None = None) -> Record:
    """Run one stage under `limit_s` seconds; its output goes to logs/<stage>.log. Never raises for
    the stage's own failures: they are the record's status."""
    global _current
    ctx.logs.mkdir(parents=True, exist_ok=True)
    log = ctx.logs / f"{stage.name}.log"
    figures = ctx.logs / f"{stage.name}.figures.jsonl"
    figures.unlink(missing_ok=True)
    rec = Record(stage.name, stage.kind, stage.what, "running", limit_s=round(limit_s, 1), log=str(log))
    rec.started = dt.datetime.now().isoformat(timespec="seconds")
    full_env = {**os.environ, **(env or {}), "XDC_GPU_CHECK_FIGURES": str(figures)}
    t0 = time.monotonic()
    with log.open("w", encoding="utf-8") as out:
        out.write(f"$ {' '.join(stage.argv)}\n")
        out.flush()
        try:
            proc = subprocess.Popen(
                stage.argv, cwd=ROOT, env=full_env, stdin=subprocess.DEVNULL, stdout=out,
                stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        except OSError as e:
            rec.status, rec.summary = "failed", f"could not start: {e}"
            return rec
        _current = proc
        try:
            rec.rc = proc.wait(timeout=limit_s)
        except subprocess.TimeoutExpired:
            kill_group(proc)
            rec.status = "timeout"
        finally:
            _current = None
    rec.seconds = round(time.monotonic() - t0, 1)
    text = log.read_text(encoding="utf-8", errors="replace")
    rec.figures = read_figures(figures)
    if stage.kind == "test":
        rec.tests = parse_pytest(text)
    if rec.status == "running":
        rec.status = status_of(stage.kind, rec.rc, rec.tests)
    rec.summary = summarise(rec, limit_s)
    if rec.status not in OK:
        rec.tail = text.splitlines()[-TAIL_LINES:]
    return rec


def status_of(kind: str, rc: int | None, tests: list[dict[str, str]]) -> str:
    if rc != 0:
        return "failed"
    if kind == "test" and tests and all(t["outcome"] == "skipped" for t in tests):
        return "skipped"
    return "passed"


def summarise(rec: Record, limit_s: float) -> str:
    if rec.status == "timeout":
        done = f"; {len(rec.figures)} figure(s) kept" if rec.figures else ""
        return f"killed at its {limit_s:.0f} s limit{done}"
    if rec.tests:
        counts: dict[str, int] = {}
        for t in rec.tests:
            counts[t["outcome"]] = counts.get(t["outcome"], 0) + 1
        text = ", ".join(f"{n} {o}" for o, n in sorted(counts.items()))
        reasons = sorted({t["detail"] for t in rec.tests if t["outcome"] == "skipped" and t.get("detail")})
        return text + (f" ({'; '.join(reasons)})" if reasons and rec.status == "skipped" else "")
    if rec.rc not in (0, None):
        return f"exit status {rec.rc}"
    return f"{len(rec.figures)} figure(s)" if rec.figures else ""


_OUTCOME = re.compile(r"^(\S+::\S+?)(?:\s+(PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)\b.*)?\s*$")
_SHORT = re.compile(r"^(SKIPPED|FAILED|ERROR)\s+(?:\[\d+\]\s+)?(\S+?)(?::\d+)?(?::| -)\s+(.*)$")


def parse_pytest(text: str) -> list[dict[str, str]]:
    """Outcome of each test from `pytest -v` output, cut-off runs included (the last test: "running").

    Details come from the short summary (-ra): the skip reason or the first line of the failure.
    """
    tests: dict[str, dict[str, str]] = {}
    details: dict[str, str] = {}
    for line in text.splitlines():
        line = line.rstrip()
        found = _OUTCOME.match(line)
        if found and found.group(1).startswith("tests/"):
            node, outcome = found.group(1), (found.group(2) or "running").lower()
            if outcome != "running" or node not in tests:
                tests[node] = {"test": node, "outcome": outcome}
            continue
        short = _SHORT.match(line)
        if short:
            details.setdefault(short.group(2), short.group(3).strip())
    for node, entry in tests.items():
        path = node.split("::")[0]
        detail = details.get(node) or details.get(path)
        if detail and entry["outcome"] != "passed":
            entry["detail"] = detail
    return list(tests.values())


def read_figures(path: Path) -> list[dict[str, Any]]:
    """The JSON lines a stage wrote; a half-written last line (a killed writer) is skipped."""
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        with contextlib.suppress(ValueError):
            entry = json.loads(line)
            if isinstance(entry, dict):
                out.append(entry)
    return out


# --- results as they come, and the report ------------------------------------------------------


class Results:
    """results.jsonl (append-only: a "start" line when a stage starts, its record when it ends) and
    report.md (rewritten whole, atomically, after every change)."""

    def __init__(self, ctx: Context, fresh: bool = True) -> None:
        self.ctx = ctx
        self.path = ctx.out / "results.jsonl"
        self.report = ctx.out / "report.md"
        ctx.out.mkdir(parents=True, exist_ok=True)
        if fresh:
            self.path.unlink(missing_ok=True)
        self.records: dict[str, Record] = {}
        self.started = dt.datetime.now().isoformat(timespec="seconds")
        self.planned: list[Stage] = []

    def _append(self, entry: dict[str, Any]) -> None:
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def start(self, stage: Stage, limit_s: float) -> None:
        rec = Record(stage.name, stage.kind, stage.what, "running", limit_s=round(limit_s, 1))
        rec.started = dt.datetime.now().isoformat(timespec="seconds")
        self.records[stage.name] = rec
        self._append({"event": "start", "stage": stage.name, "limit_s": rec.limit_s, "time": rec.started})
        self.write_report()

    def end(self, rec: Record) -> None:
        self.records[rec.stage] = rec
        self._append({"event": "end", **asdict(rec)})
        self.write_report()

    def write_report(self) -> None:
        env = load_json(self.ctx.out / "env.json")
        text = render_report(env, self.planned, self.records, self.ctx.budget_s, self.started, self.ctx.image)
        tmp = self.report.with_name(self.report.name + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, self.report)

    @classmethod
    def load(cls, ctx: Context) -> Results:
        """Rebuild from results.jsonl (--report-only): a stage with a start but no end was cut off."""
        res = cls(ctx, fresh=False)
        for line in res.path.read_text(encoding="utf-8").splitlines() if res.path.is_file() else []:
            with contextlib.suppress(ValueError, TypeError):
                entry = json.loads(line)
                if entry.get("event") == "start":
                    res.records[entry["stage"]] = Record(
                        entry["stage"],
                        "",
                        "",
                        "cut off",
                        limit_s=entry.get("limit_s", 0),
                        started=entry["time"],
                    )
                elif entry.get("event") == "end":
                    entry.pop("event")
                    res.records[entry["stage"]] = Record(**entry)
        return res


def load_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _cell(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return text.replace("|", "\\|").replace("\n", " ")


def _figure_row(fig: dict[str, Any]) -> str:
    rest = {k: v for k, v in fig.items() if k not in ("name", "value", "unit", "goal", "met")}
    value = f"{fig['value']} {fig.get('unit', '')}".strip() if "value" in fig else ""
    goal = ""
    if "goal" in fig:
        goal = f"{fig['goal']}" + {True: " (met)", False: " (NOT met)"}.get(fig.get("met"), "")
    details = ", ".join(f"{k} {_cell(v)}" for k, v in rest.items())
    return f"| {_cell(fig.get('name', '?'))} | {_cell(value)} | {_cell(goal)} | {details} |"


IMAGE_NOTE = (
    "the machine's own Python and torch (a CUDA 13 build on this workplace's lent GPU) with the wheels "
    "carried in `.whl/` (scripts/gpu_wheels.sh), no package index. DALI and faiss-gpu cannot be carried "
    "there, so their stages are skipped with the reason; the step and DDP tests run on synthetic inputs "
    "of the loader's shapes instead of DALI-loaded clips."
)


def render_report(
    env: dict[str, Any],
    planned: Sequence[Stage],
    records: dict[str, Record],
    budget_s: float,
    started: str,
    image: bool = False,
) -> str:
    """report.md: the machine and versions, one row per stage, the figures, the tests, failure tails."""
    gpu, torch, faiss = env.get("gpu", {}), env.get("torch", {}), env.get("faiss", {})
    g, t = gpu.get, torch.get
    lines = [
        "# GPU check",
        "",
        f"Started {started}; report written {dt.datetime.now().isoformat(timespec='seconds')}. "
        f"Budget for tests + benchmarks: {budget_s:.0f} s. Each stage appends to `results.jsonl`; "
        "logs in `logs/`.",
        "",
        *([f"**Image mode**: {IMAGE_NOTE}", ""] if image else []),
        "| | |",
        "|---|---|",
        f"| card | {_cell(g('name', '?'))} ({g('memory', '?')}, compute {g('compute_cap', '?')}) |",
        f"| driver | {g('driver', '?')} (CUDA {g('cuda_driver', '?')} per nvidia-smi) |",
        f"| torch | {t('version', '?')}, CUDA {t('cuda', '?')}, cuDNN {t('cudnn', '?')}, "
        f"sees {t('device_count', '?')} device(s) |",
        f"| DALI | {_cell(env.get('dali', '?'))} |",
        f"| faiss | {_cell(faiss.get('version', '?'))}, {faiss.get('gpus', '?')} GPU(s) |",
        f"| host | {env.get('host', '?')}, {env.get('cpus', '?')} CPUs, Python {env.get('python', '?')}, "
        f"{_cell(env.get('ffmpeg', '?'))} |",
        "",
        "## Stages",
        "",
        "| stage | what | status | seconds / limit | summary |",
        "|---|---|---|---|---|",
    ]
    names = [n for n in records if n not in {s.name for s in planned}] + [s.name for s in planned]
    whats = {s.name: s.what for s in planned}
    used = sum(r.seconds for r in records.values() if r.kind in ("test", "bench"))
    for name in names:
        rec = records.get(name)
        what = whats.get(name) or (rec.what if rec else "")
        if rec is None:
            lines.append(f"| {name} | {_cell(what)} | pending | | |")
            continue
        status = rec.status.upper() if rec.status not in (*OK, "running") else rec.status
        limit = f"{rec.limit_s:.0f}" if rec.limit_s else "-"
        timing = f"{rec.seconds:.0f} / {limit}" if rec.status != "running" else f"- / {limit}"
        lines.append(f"| {name} | {_cell(what)} | {status} | {timing} | {_cell(rec.summary)} |")
    lines += ["", f"Tests and benchmarks used {used:.0f} s of the {budget_s:.0f} s budget.", ""]

    with_figures = [r for n in names if (r := records.get(n)) and r.figures]
    if with_figures:
        lines += ["## Figures", ""]
        for rec in with_figures:
            lines += [f"### {rec.stage}", "", "| figure | value | goal | details |", "|---|---|---|---|"]
            lines += [_figure_row(f) for f in rec.figures]
            lines.append("")
    with_tests = [r for n in names if (r := records.get(n)) and r.tests]
    if with_tests:
        lines += ["## Tests", "", "| test | outcome | detail |", "|---|---|---|"]
        for rec in with_tests:
            for t in rec.tests:
                lines.append(f"| {_cell(t['test'])} | {t['outcome']} | {_cell(t.get('detail', ''))} |")
        lines.append("")
    broken = [r for n in names if (r := records.get(n)) and r.tail]
    if broken:
        lines += ["## Log tails of stages that did not pass", ""]
        for rec in broken:
            lines += [f"### {rec.stage} ({rec.status}; full log: {rec.log})", "", "```", *rec.tail, "```", ""]
    return "\n".join(lines)


# --- the whole run -------------------------------------------------------------------------------


def run_all(
    ctx: Context,
    stages: Sequence[Stage],
    *,
    install_s: float | None = None,
    env: dict[str, str] | None = None,
    say: Callable[[str], None] = print,
    machine: Callable[[], dict[str, Any]] | None = None,
) -> int:
    """Run `stages` in order, recording each; returns the exit status (see the module docstring).

    `machine` describes what is installed here (env.json's content, for the stages' requirements): by
    default the env stage's env.json, or, when the env stage is not among `stages`, a fresh probe.
    """
    results = Results(ctx)
    results.planned = list(stages)
    if install_s is not None:
        what = (
            "image mode: carried wheels into a --target folder, no index; the machine's Python and torch"
            if ctx.image
            else "GPU venv: CUDA torch, DALI, faiss-gpu, xdctools[gpu,test]"
        )
        results.end(Record("install", "setup", what, "passed", seconds=round(install_s, 1)))
    results.write_report()
    stop = install_handlers(results)
    t0 = time.monotonic()
    described: dict[str, Any] | None = None
    spent = 0.0
    bad = False

    def describe() -> dict[str, Any]:
        nonlocal described
        if described is None:
            ran_env = results.records.get("env")
            if machine is not None:
                described = machine()
            elif ran_env is not None and ran_env.status in OK:
                described = load_json(ctx.out / "env.json")
            else:
                described = probe_env(ctx)
        return described

    try:
        for stage in stages:
            missing = [n for n in stage.needs if n in results.records and results.records[n].status not in OK]
            left = ctx.budget_s - spent
            # what is left before the deadline, less the time a kill at the limit may take
            until = None
            if ctx.deadline_s is not None:
                until = ctx.deadline_s - (time.monotonic() - t0) - 2 * KILL_GRACE_S
            unmet_here = [why for r in stage.requires if (why := unmet(r, describe(), ctx.image))]
            if missing:
                rec = Record(
                    stage.name, stage.kind, stage.what, "not-run", summary=f"needs {', '.join(missing)}"
                )
            elif unmet_here:
                rec = Record(stage.name, stage.kind, stage.what, "skipped", summary="; ".join(unmet_here))
            elif until is not None and until < MIN_STAGE_S:
                rec = Record(stage.name, stage.kind, stage.what, "not-run",
                             summary=f"deadline reached ({ctx.deadline_s:.0f} s)")  # fmt: skip
            elif stage.budgeted and left < MIN_STAGE_S:
                rec = Record(stage.name, stage.kind, stage.what, "not-run", summary="budget spent")
            else:
                limit = min(stage.timeout_s, left) if stage.budgeted else stage.timeout_s
                if until is not None:
                    limit = min(limit, until)
                results.start(stage, limit)
                say(f"[gpu-check] {stage.name}: {stage.what} (limit {limit:.0f} s)")
                rec = run_stage(stage, ctx, limit, env)
                if stage.budgeted:
                    spent += rec.seconds
            results.end(rec)
            bad |= rec.status not in OK
            say(f"[gpu-check] {stage.name}: {rec.status} ({rec.seconds:.0f} s) {rec.summary}".rstrip())
            if stage.name == "env" and rec.status in OK:
                why = no_cuda_reason(load_json(ctx.out / "env.json"))
                if why:
                    for later in stages[stages.index(stage) + 1 :]:
                        results.end(
                            Record(later.name, later.kind, later.what, "not-run", summary="no CUDA device")
                        )
                    say(f"Error: {why}")
                    return EXIT_NO_CUDA
    finally:
        stop()
    say(f"[gpu-check] report: {results.report}")
    return EXIT_FAILED if bad else 0


def probe_env(ctx: Context) -> dict[str, Any]:
    """env.json written afresh by this environment's Python (when the env stage did not run)."""
    path = ctx.out / "env.json"
    with contextlib.suppress(OSError, subprocess.TimeoutExpired):
        subprocess.run([ctx.python, str(SCRIPT), "--env-json", str(path)], cwd=ROOT, capture_output=True,
                       timeout=120, check=False)  # fmt: skip
    return load_json(path)


def no_cuda_reason(env: dict[str, Any]) -> str | None:
    torch = env.get("torch", {})
    if torch.get("available"):
        return None
    build = "a CPU build" if torch.get("cuda") is None else f"built for CUDA {torch['cuda']}"
    why = torch.get("error", "torch.cuda.is_available() is False")
    return f"torch {torch.get('version', '?')} ({build}) sees no CUDA device: {why}"


def install_handlers(results: Results) -> Callable[[], None]:
    """On SIGTERM/SIGINT: kill the running stage's group, record it as interrupted, rewrite the report."""

    def handler(signum: int, _frame: Any) -> None:
        proc = _current
        if proc is not None:
            kill_group(proc)
        for rec in results.records.values():
            if rec.status == "running":
                rec.status, rec.summary = "interrupted", f"signal {signal.Signals(signum).name}"
                results.end(rec)
        raise SystemExit(128 + signum)

    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}

    def restore() -> None:
        for sig, previous in old.items():
            signal.signal(sig, previous)

    return restore


# --- environment ---------------------------------------------------------------------------------


def _command(argv: Sequence[str], timeout: float = 30) -> str:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"error: {e}"
    return (
        proc.stdout if proc.returncode == 0 else f"error: exit {proc.returncode}: {proc.stderr.strip()[:200]}"
    )


def gather_env() -> dict[str, Any]:
    """The card (nvidia-smi), driver, CUDA, torch, DALI, faiss and ffmpeg versions of this machine."""
    env: dict[str, Any] = {
        "host": platform.node(),
        "python": platform.python_version(),
        "executable": sys.executable,
        "cpus": os.cpu_count(),
    }
    query = _command(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,compute_cap",
                      "--format=csv,noheader"])  # fmt: skip
    gpu: dict[str, Any] = {}
    if not query.startswith("error"):
        first = [part.strip() for part in query.splitlines()[0].split(",")]
        gpu = dict(zip(("name", "driver", "memory", "compute_cap"), first, strict=False))
        gpu["count"] = len(query.strip().splitlines())
    else:
        gpu["error"] = query
    found = re.search(r"CUDA Version:\s*([\d.]+)", _command(["nvidia-smi"]))
    gpu["cuda_driver"] = found.group(1) if found else "?"
    env["gpu"] = gpu
    try:
        import torch

        t: dict[str, Any] = {"version": torch.__version__, "cuda": torch.version.cuda}
        t["cudnn"] = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
        t["available"] = torch.cuda.is_available()
        t["device_count"] = torch.cuda.device_count() if t["available"] else 0
        if t["available"]:
            t["device"] = torch.cuda.get_device_name(0)
            t["capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
            t["bf16"] = torch.cuda.is_bf16_supported()
    except Exception as e:  # the report names whatever broke
        t = {"available": False, "error": f"{type(e).__name__}: {e}"}
    env["torch"] = t
    try:
        import nvidia.dali as dali

        env["dali"] = dali.__version__
    except Exception as e:
        env["dali"] = f"error: {type(e).__name__}: {e}"
    try:
        import faiss

        env["faiss"] = {"version": faiss.__version__, "gpus": faiss.get_num_gpus(),
                        "gpu_build": hasattr(faiss, "StandardGpuResources")}  # fmt: skip
    except Exception as e:
        env["faiss"] = {"version": f"error: {type(e).__name__}: {e}", "gpus": 0}
    ffmpeg = _command(["ffmpeg", "-version"])
    env["ffmpeg"] = ffmpeg.split(" Copyright")[0].strip() if not ffmpeg.startswith("error") else ffmpeg
    env["ffprobe"] = shutil.which("ffprobe") is not None
    # the modules only the shard building needs (found, not imported: that costs seconds)
    env["modules"] = {m: importlib.util.find_spec(m) is not None for m in SHARD_MODULES}
    return env


# --- the check's shards --------------------------------------------------------------------------


def default_media() -> Path | None:
    """Real clips: $XDC_MEDIA, ../shared/data/media beside the checkout, or shared/data/media inside it."""
    for candidate in (
        os.environ.get("XDC_MEDIA"),
        ROOT.parent / "shared/data/media",
        ROOT / "shared/data/media",
    ):
        if candidate and Path(candidate).is_dir():
            return Path(candidate)
    return None


def shard_specs(root: Path, media: Path | None, small: bool) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """The sets to build (name, source, codec, short side, segment frames) and those that cannot be."""
    synth, long_ = root / "videos" / "synth", root / "videos" / "long"
    big = 128 if small else 256
    specs = [
        {"name": "synth-vp9", "source": synth, "codec": "vp9", "short_side": 128, "segment_frames": 64},
        {"name": "synth-h264", "source": synth, "codec": "h264", "short_side": 128, "segment_frames": 64},
        # one segment per 12 s video: a clip at frame 280 has 280 frames before it in its segment
        {"name": "long-vp9", "source": long_, "codec": "vp9", "short_side": big, "segment_frames": 320},
        {"name": "long-h264", "source": long_, "codec": "h264", "short_side": big, "segment_frames": 320},
    ]
    missing: dict[str, str] = {}
    kinetics = media / "kinetics" if media else None
    if kinetics is not None and kinetics.is_dir():
        specs += [
            {
                "name": "media-vp9",
                "source": kinetics,
                "codec": "vp9",
                "short_side": 128,
                "segment_frames": 64,
            },
            {
                "name": "media-h264",
                "source": kinetics,
                "codec": "h264",
                "short_side": 128,
                "segment_frames": 64,
            },
            {
                "name": "loader-vp9",
                "source": kinetics,
                "codec": "vp9",
                "short_side": big,
                "segment_frames": 64,
            },
        ]
    else:
        where = kinetics or "../shared/data/media/kinetics ($XDC_MEDIA)"
        for name in ("media-vp9", "media-h264"):
            missing[name] = f"no real clips at {where}"
        specs.append(
            {"name": "loader-vp9", "source": long_, "codec": "vp9", "short_side": big, "segment_frames": 64}
        )
    return specs, missing


def build_shards(
    root: Path,
    media: Path | None,
    *,
    small: bool = False,
    workers: int | None = None,
    sets: Sequence[str] | None = None,
) -> Path:
    """Synthetic videos (`xdctools synth`) and real clips, sharded as VP9 and H.264 (`xdctools shard
    --codec`) into root/<set>; root/shards.json lists them (rewritten after each set). Reruns resume.
    `sets` builds only those (and the videos they need)."""
    root.mkdir(parents=True, exist_ok=True)
    specs, missing = shard_specs(root, media, small)
    if sets is not None:
        unknown = set(sets) - {s["name"] for s in specs} - set(missing)
        if unknown:
            raise SystemExit(f"Error: unknown shard set(s) {', '.join(sorted(unknown))}")
        specs = [s for s in specs if s["name"] in sets]
        missing = {k: v for k, v in missing.items() if k in sets}
    sources = {Path(s["source"]) for s in specs}
    workers = workers or os.cpu_count() or 1
    xdc = [sys.executable, "-m", "xdctools"]
    env = {**os.environ, "TQDM_DISABLE": "1"}
    t0 = time.monotonic()

    def run(args: Sequence[Any]) -> None:
        argv = [*xdc, *map(str, args)]
        print("$ " + " ".join(argv), flush=True)
        subprocess.run(argv, cwd=ROOT, env=env, check=True, stdin=subprocess.DEVNULL)

    synth, long_ = root / "videos" / "synth", root / "videos" / "long"
    if synth in sources:  # 48 videos of 4 s (small: 4 of 2 s), 176x128, 25 fps: 2 segments each
        count = (
            ["--classes", 2, "--per-class", 2, "--seconds", 2]
            if small
            else ["--classes", 6, "--per-class", 8]
        )
        run(["synth", synth, *count, "--size", "176x128", "--workers", workers])
    if long_ in sources:  # 4 videos of 12 s = 300 frames (small: 1), for the seek check
        count = ["--classes", 1, "--per-class", 1] if small else ["--classes", 2, "--per-class", 2]
        size = "176x128" if small else "344x256"
        run(["synth", long_, *count, "--seconds", 12, "--size", size, "--workers", workers])
    manifest: dict[str, Any] = {
        "media": str(media) if media else None,
        "small": small,
        "sets": {},
        "missing": missing,
    }
    for spec in specs:
        out = root / spec["name"]
        run(["shard", spec["source"], "-o", out, "--codec", spec["codec"], "--short-side", spec["short_side"],
             "--segment-frames", spec["segment_frames"], "--audio", "optional", "--shard-size", 16,
             "--workers", workers])  # fmt: skip
        manifest["sets"][spec["name"]] = {**spec, "source": str(spec["source"]), "path": str(out)}
        manifest["seconds"] = round(time.monotonic() - t0, 1)
        tmp = root / "shards.json.tmp"
        tmp.write_text(json.dumps(manifest, indent=1))
        os.replace(tmp, root / "shards.json")
    print(f"shards: {', '.join(manifest['sets'])} in {manifest['seconds']} s; missing: {missing or 'none'}")
    return root / "shards.json"


# --- command line --------------------------------------------------------------------------------


def main(argv: Iterable[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path(os.environ.get("GPU_CHECK_OUT", ROOT / "gpu-check")))
    p.add_argument("--work", type=Path, default=None, help="shards and caches (default: $GPU_CHECK_WORK or "
                   "/tmp/xdc-gpu-check)")  # fmt: skip
    p.add_argument(
        "--budget",
        type=float,
        default=None,
        help="seconds for the tests and benchmarks "
        f"(default $GPU_CHECK_BUDGET, or {DEFAULT_BUDGET_S:.0f}; {IMAGE_BUDGET_S:.0f} with --image)",
    )
    p.add_argument("--deadline", type=float, default=None, help="every stage ends within this many seconds")
    p.add_argument("--image", action="store_true", help="image mode: the lent GPU's own Python, no DALI "
                   "or faiss-gpu, synthetic inputs (scripts/gpu_check.sh sets it)")  # fmt: skip
    p.add_argument("--only", help="comma-separated stages to run (see --list)")
    p.add_argument("--skip", help="comma-separated stages to leave out")
    p.add_argument("--list", action="store_true", help="print the stages and their commands, run nothing")
    p.add_argument("--media", default=None, help="real clips (a folder with kinetics/), or 'none'")
    p.add_argument("--install-seconds", type=float, default=None, help=argparse.SUPPRESS)
    p.add_argument("--build-shards", type=Path, metavar="DIR", help="build the check's shards into DIR")
    p.add_argument("--small", action="store_true", help="with --build-shards: a few tiny videos (CPU tests)")
    p.add_argument("--sets", help="with --build-shards: only these comma-separated sets")
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--env-json", type=Path, metavar="FILE", help="write the machine's versions to FILE")
    p.add_argument("--report-only", action="store_true", help="rewrite report.md from results.jsonl")
    args = p.parse_args(None if argv is None else list(argv))
    media = None if args.media == "none" else (Path(args.media) if args.media else default_media())

    if args.build_shards:
        sets = args.sets.split(",") if args.sets else None
        build_shards(args.build_shards, media, small=args.small, workers=args.workers, sets=sets)
        return 0
    if args.env_json:
        args.env_json.parent.mkdir(parents=True, exist_ok=True)
        args.env_json.write_text(json.dumps(gather_env(), indent=1))
        print(args.env_json.read_text())
        return 0
    work = args.work or Path(os.environ.get("GPU_CHECK_WORK", "/tmp/xdc-gpu-check"))
    budget = args.budget
    if budget is None:
        budget = float(os.environ.get("GPU_CHECK_BUDGET", IMAGE_BUDGET_S if args.image else DEFAULT_BUDGET_S))
    ctx = Context(out=args.out.resolve(), work=work.resolve(), media=media, budget_s=budget, image=args.image,
                  deadline_s=args.deadline)  # fmt: skip
    stages = select(plan(ctx), args.only, args.skip)
    if args.list:
        for s in stages:
            pool = "budget" if s.budgeted else "own"
            requires = f" [requires {', '.join(s.requires)}]" if s.requires else ""
            print(f"{s.name:16s} {s.kind:5s} {s.timeout_s:4.0f} s ({pool}){requires}  {' '.join(s.argv)}")
        return 0
    if args.report_only:
        results = Results.load(ctx)
        results.planned = stages
        results.write_report()
        print(results.report)
        return 0
    if shutil.which("nvidia-smi") is None:
        print("Error: no CUDA device visible: nvidia-smi not found (the GPU check needs an NVIDIA GPU)")
        return EXIT_NO_CUDA
    work.mkdir(parents=True, exist_ok=True)
    env = {"PYTHONUNBUFFERED": "1", "TORCHINDUCTOR_CACHE_DIR": str(ctx.work / "inductor"),
           "XDC_GPU_SHARDS": str(ctx.shards), "XDC_GPU_WORK": str(ctx.work)}  # fmt: skip
    if ctx.image:  # the tests' inputs without DALI, and their skip reasons for this machine
        env.update(
            {"XDC_GPU_CHECK_IMAGE": "1", "XDC_GPU_INPUTS": os.environ.get("XDC_GPU_INPUTS", "synthetic")}
        )
    return run_all(ctx, stages, install_s=args.install_seconds, env=env)


if __name__ == "__main__":
    sys.exit(main())
