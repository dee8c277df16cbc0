"""Slurm jobs through submitit: resources, array tasks and multi-rank jobs that requeue when preempted.

A command's work is a picklable task (`xdctools.tasks`). Here it runs as submitit jobs: an array of
independent tasks (shard: one per node-rank slice), or one job of nodes x ranks that form a process group
(train, extract: torchrun's variables come from the Slurm environment). When Slurm preempts a task or its
time is nearly up, submitit signals it (USR2), calls `Requeueable.checkpoint` and requeues the same call:
the work resumes from what it wrote (shard markers, training checkpoints, feature-store chunks).
The caller waits for every task and gets one `TaskResult` per task: its value, or why it failed.

`cluster="local"` runs the same jobs as real subprocesses on this machine (submitit's LocalExecutor,
one node): how the tests exercise this module without Slurm.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import random
import re
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from xdctools.errors import ConfigError, DependencyError, XdcError

CLUSTERS = ("slurm", "local")
INSTALL = "pip install 'xdctools[slurm]'"
# Requeues after a time-out (preemptions requeue without limit): each one resumes where the last stopped.
MAX_TIMEOUTS = 20
SIGNAL_DELAY_S = 120  # USR2 this long before the time limit: enough to requeue and exit
POLL_S = {"slurm": 30.0, "local": 0.5}  # how often the submitter looks at its jobs
_TIME = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$")
_MEM = re.compile(r"^[1-9]\d*[KMGT]?$", re.IGNORECASE)


@dataclass(frozen=True)
class Resources:
    """What a submission asks Slurm for. `array` > 1: that many independent one-rank tasks (shard);
    otherwise one job of `nodes` x `ranks_per_node` ranks, one GPU each when `gpus_per_node` > 0."""

    folder: Path  # submitit's pickles and the tasks' logs
    time_min: int
    cpus_per_task: int
    array: int = 1
    nodes: int = 1
    ranks_per_node: int = 1
    gpus_per_node: int = 0
    mem: str | None = None  # per node, Slurm's syntax (64G); None: the partition's default
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    cluster: str = "slurm"
    name: str = "xdctools"

    @property
    def ranks(self) -> int:
        return self.nodes * self.ranks_per_node


def parse_time(text: str, field: str = "--slurm-time") -> int:
    """Slurm's time formats (M, M:S, H:M:S, D-H, D-H:M, D-H:M:S) -> whole minutes (seconds round up)."""
    match = _TIME.match(str(text).strip())
    if not match:
        raise ConfigError(f"{field}: {text!r} is not a Slurm time (minutes, H:M:S or D-H:M:S)")
    days, a, b, c = (int(g) if g is not None else None for g in match.groups())
    if days is not None:  # D-H, D-H:M, D-H:M:S
        seconds = days * 86400 + a * 3600 + (b or 0) * 60 + (c or 0)
    elif c is not None:  # H:M:S
        seconds = a * 3600 + (b or 0) * 60 + c
    else:  # M or M:S
        seconds = a * 60 + (b or 0)
    if seconds <= 0:
        raise ConfigError(f"{field}: must be longer than 0 (got {text!r})")
    return -(-seconds // 60)


def check_resources(res: Resources) -> Resources:
    """The resources, or ConfigError naming the option and the reason."""
    at_least = {
        "--slurm-cpus-per-task": (res.cpus_per_task, 1),
        "--slurm-tasks": (res.array, 1),
        "--nodes": (res.nodes, 1),
        "--gpus-per-node": (res.ranks_per_node, 1),
        "--slurm-time": (res.time_min, 1),
    }
    for field, (value, least) in at_least.items():
        if value < least:
            raise ConfigError(f"{field}: must be at least {least} (got {value})")
    if res.mem is not None and not _MEM.match(res.mem):
        raise ConfigError(f"--slurm-mem: {res.mem!r} is not a Slurm memory size like 64G, 500M or 4096")
    if res.cluster not in CLUSTERS:
        raise ConfigError(f"--slurm-cluster: {res.cluster!r} is not one of {', '.join(CLUSTERS)}")
    if res.cluster == "local" and res.nodes > 1:
        raise ConfigError(f"--nodes: the local cluster runs one node (got {res.nodes})")
    return res


def import_submitit() -> Any:
    try:
        import submitit
    except ImportError:
        raise DependencyError(f"--executor slurm: needs submitit; install it with {INSTALL}") from None
    return submitit


def make_executor(res: Resources) -> Any:
    """A submitit executor with these resources (Slurm, or the local one for tests)."""
    submitit = import_submitit()
    try:
        executor = submitit.AutoExecutor(
            res.folder,
            cluster=res.cluster,
            slurm_max_num_timeout=MAX_TIMEOUTS,
            local_max_num_timeout=MAX_TIMEOUTS,
        )
    except RuntimeError as e:  # SlurmExecutor: no srun here
        raise DependencyError(f"--executor slurm: {e} (submit from a Slurm login node)") from None
    slurm = {"partition": res.partition, "account": res.account, "qos": res.qos, "mem": res.mem}
    executor.update_parameters(
        name=res.name,
        timeout_min=res.time_min,
        nodes=res.nodes,
        tasks_per_node=res.ranks_per_node,
        cpus_per_task=res.cpus_per_task,
        gpus_per_node=res.gpus_per_node or None,
        stderr_to_stdout=True,
        slurm_signal_delay_s=SIGNAL_DELAY_S,
        **{f"slurm_{key}": value for key, value in slurm.items() if value is not None},
    )
    return executor


# --- inside a job ----------------------------------------------------------------------------


class Task(Protocol):
    """What a job runs: a picklable call, and the call to run after a requeue."""

    def __call__(self, *args: Any) -> Any: ...

    def requeued(self) -> Task: ...


@dataclass(frozen=True)
class Outcome:
    """What a task returns to the submitter: its value, or the one-line error and exit code it ended with."""

    value: Any = None
    error: str | None = None
    exit_code: int = 0


@dataclass(frozen=True)
class Requeueable:
    """`task` as a submitit job: rank variables exported first (`ranks`), an XdcError returned as an
    Outcome (its traceback in the log); `checkpoint` is what submitit calls on preemption or time-out."""

    task: Any
    ranks: bool = False

    def __call__(self, *args: Any) -> Outcome:
        if self.ranks:
            os.environ.update(rank_env(import_submitit().JobEnvironment()))
        try:
            return Outcome(value=self.task(*args))
        except XdcError as e:
            traceback.print_exc()
            return Outcome(error=e.format_message(), exit_code=e.exit_code)

    def checkpoint(self, *args: Any) -> Any:
        """The same call again, on `task.requeued()` (a run that started over resumes after a requeue)."""
        delayed = import_submitit().helpers.DelayedSubmission
        return delayed(dataclasses.replace(self, task=self.task.requeued()), *args)


def master_port(job_id: str) -> int:
    """A port from the job id: the same on every rank and after a requeue (which keeps the id)."""
    return random.Random(str(job_id)).randint(20000, 59999)


def rank_env(job: Any) -> dict[str, str]:
    """torchrun's variables (what trainer.distributed reads) from a submitit JobEnvironment.

    Rank 0 runs on the first host of the job, which serves the rendezvous. LOCAL_RANK picks the GPU:
    every rank of a node sees the node's GPUs (Slurm's --gpus-per-node).
    """
    return {
        "RANK": str(job.global_rank),
        "WORLD_SIZE": str(job.num_tasks),
        "LOCAL_RANK": str(job.local_rank),
        "LOCAL_WORLD_SIZE": str(job.num_tasks // max(job.num_nodes, 1)),
        "GROUP_RANK": str(job.node),
        "MASTER_ADDR": str(job.hostnames[0]),
        "MASTER_PORT": str(master_port(job.job_id)),
    }


# --- the submitter -----------------------------------------------------------------------------


@dataclass(frozen=True)
class TaskResult:
    """One array task or one rank, as the submitter saw it end."""

    index: int
    value: Any = None
    error: str | None = None
    exit_code: int = 0
    log: Path | None = None
    crashed: bool = False  # ended by an exception of our code, a signal or Slurm, not by an XdcError

    @property
    def ok(self) -> bool:
        return self.error is None


OnDone = Callable[[TaskResult], None]


def run_array(
    task: Task,
    args: Sequence[tuple],
    res: Resources,
    on_submit: Callable[[str], None] | None = None,
    on_done: OnDone | None = None,
) -> list[TaskResult]:
    """One array task per element of `args` (each `task(*element)`), waited for; results in that order."""
    executor = make_executor(res)
    with refused_as_config_error(), executor.batch():
        jobs = [executor.submit(Requeueable(task), *a) for a in args]
    if on_submit:
        on_submit(f"job {job_ids(jobs)}: {len(jobs)} array tasks; logs in {res.folder}")
    return wait(jobs, POLL_S[res.cluster], on_done)


def run_ranks(
    task: Task,
    res: Resources,
    on_submit: Callable[[str], None] | None = None,
    on_done: OnDone | None = None,
) -> list[TaskResult]:
    """One job of nodes x ranks_per_node ranks running `task()` in one process group; results by rank."""
    executor = make_executor(res)
    with refused_as_config_error():
        job = executor.submit(Requeueable(task, ranks=True))
    if on_submit:
        shape = f"{res.nodes} node(s) x {res.ranks_per_node} rank(s)"
        on_submit(f"job {job.job_id}: {shape}; logs in {res.folder}")
    return wait([job.task(r) for r in range(res.ranks)], POLL_S[res.cluster], on_done)


@contextlib.contextmanager
def refused_as_config_error() -> Iterator[None]:
    """sbatch's refusal (an unknown partition, a time past the partition's limit, ...) as one line."""
    from submitit.core.utils import FailedJobError

    try:
        yield
    except FailedJobError as e:
        lines = [line for line in str(e).splitlines() if line.strip()] or ["no reason given"]
        raise ConfigError(f"--executor slurm: sbatch refused the job ({lines[0].strip()})") from None


def job_ids(jobs: Sequence[Any]) -> str:
    ids = sorted({str(job.job_id).split("_")[0] for job in jobs})
    return ", ".join(ids[:3]) + (", ..." if len(ids) > 3 else "")


def wait(jobs: Sequence[Any], poll_s: float, on_done: OnDone | None = None) -> list[TaskResult]:
    """Every job's TaskResult once all have ended. Ctrl-C cancels the jobs still running."""
    results: dict[int, TaskResult] = {}
    try:
        while len(results) < len(jobs):
            for i, job in enumerate(jobs):
                if i not in results and job.done():
                    results[i] = result_of(job, i)
                    if on_done:
                        on_done(results[i])
            if len(results) < len(jobs):
                time.sleep(poll_s)
    except KeyboardInterrupt:
        for i, job in enumerate(jobs):
            if i not in results:
                job.cancel(check=False)
        raise
    return [results[i] for i in range(len(jobs))]


def result_of(job: Any, index: int) -> TaskResult:
    """A finished job's Outcome as a TaskResult; a crash or a task that left no result, as its error."""
    from submitit.core.utils import FailedJobError, UncompletedJobError

    log = Path(job.paths.stdout)
    try:
        outcome = job.result()
    except FailedJobError as e:
        error = f"crashed ({last_line(str(e))}); see {log}"
        return TaskResult(index, error=error, exit_code=1, log=log, crashed=True)
    except UncompletedJobError:
        error = f"ended without a result (killed, out of memory, cancelled or out of time); see {log}"
        return TaskResult(index, error=error, exit_code=1, log=log, crashed=True)
    return TaskResult(index, outcome.value, outcome.error, outcome.exit_code, log)


def last_line(trace: str) -> str:
    """The exception line of the traceback submitit reports (between its dashed rules)."""
    parts = trace.split("-" * 22)
    lines = [line.strip() for line in (parts[1] if len(parts) > 2 else trace).splitlines() if line.strip()]
    return lines[-1] if lines else "no traceback"


class TaskFailed(XdcError):
    """Tasks of a Slurm submission failed; the exit code is that of the first failure."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def failure(results: Sequence[TaskResult], what: str = "task") -> TaskFailed | None:
    """One error for the failed tasks (None if all ended well): the first that failed with an error of its
    own (others often fail only because it stopped), with its exit code; a crash or a kill exits 1."""
    failed = [r for r in results if not r.ok]
    if not failed:
        return None
    first = next((r for r in failed if not r.crashed), failed[0])
    return TaskFailed(
        f"{len(failed)} of {len(results)} {what}s failed; {what} {first.index}: {first.error}",
        first.exit_code,
    )
