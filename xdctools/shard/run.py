"""The shard run loop: plan -> units -> ordered worker results -> tars, markers, dataset.json; resumable."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import multiprocessing
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xdctools import __version__
from xdctools.errors import ConfigError, DataError, XdcError
from xdctools.shard import format as fmt
from xdctools.shard.jobs import Job, Plan
from xdctools.shard.media import MEDIA, REASON_KINDS, TRANSIENT, process_job
from xdctools.shard.params import OPERATIONAL, ShardParams
from xdctools.shard.read import DATASET_FILE
from xdctools.shard.write import TMP_SUFFIX, ShardWriter, write_file

DATASET_FORMAT_VERSION = 1
PARAMS_FILE = "params.json"
ERRORS_FILE = "errors.jsonl"
MARKER_SUFFIX = ".stats.json"
MISSING_FILE = "missing_file"  # plan.py's reason for an annotated file not found on disk
# Every reason a marker may hold, and its kind. processing_error was written by versions before the error
# policy for an exception of our own code; it is read as transient, so the next run retries those files.
RECORDED_KINDS = {**REASON_KINDS, MISSING_FILE: MEDIA, "processing_error": TRANSIENT}
KINDS = (MEDIA, TRANSIENT)
DEFAULT_MAX_FAILED = 0.05  # share of the inputs that may fail for a media reason before the command exits 5
WINDOW_PER_WORKER = 4  # jobs in flight per worker: keeps workers busy past a slow file, memory bounded
# Modules the default processor loads lazily on its first file (librosa.feature.spectral imports scipy.signal:
# seconds per process). The fork server imports them once for all workers.
WARM_MODULES = ("librosa.feature.spectral",)

MEL_CONSTANTS = (
    "SAMPLE_RATE",
    "N_MELS",
    "HOP_LENGTH",
    "WIN_LENGTH",
    "N_FFT",
    "FMIN",
    "FMAX",
    "MEL_FPS",
    "TOP_DB_FLOOR",
    "WINDOW_SECONDS",
    "WINDOW_FRAMES",
    "MEL_PAD_SECONDS",
    "MEL_PAD_FRAMES",
)

Progress = Callable[[int, int, int, int], None]  # (done, total, ok, failed), or a tqdm bar
Process = Callable[[Job, ShardParams], Any]  # returns a JobResult (ok, samples, reason, detail, meta)


class InternalError(XdcError):
    """An exception of our own code while a file was processed: the run stops, the file is not blamed.

    Its `__cause__` holds the exception and its traceback (a worker's included); the command prints it.
    """

    exit_code = 1


@dataclass(frozen=True)
class Unit:
    """`shard_size` consecutive jobs of one set: the unit of writing, resuming and node assignment."""

    set_name: str
    number: int
    jobs: tuple[Job, ...]

    @property
    def stem(self) -> str:
        return f"{self.set_name}-{self.number:06d}"

    @property
    def marker(self) -> str:
        return f"{self.set_name}/{self.stem}{MARKER_SUFFIX}"


MISSING_SHOWN = 3  # annotated-but-missing files named in the summary (errors.jsonl lists them all)


def missing_line(entry: dict) -> str:
    """One missing file as the summary names it: its annotation's file and line when known, and its path."""
    return f"{entry['source']}: {entry['path']}" if entry.get("source") else str(entry["path"])


@dataclass
class Summary:
    """What a node's units hold (written now or by an earlier run) and what this run did."""

    ok: int = 0
    failed: dict[str, int] = field(default_factory=dict)  # reason -> videos
    missing: int = 0  # annotated files not found on disk (the plan's, whichever node)
    missing_first: list[str] = field(default_factory=list)  # the first few, "file:line: path"
    videos: int = 0  # inputs in this node's units: ok + failed
    hours: float = 0.0
    bytes: int = 0  # tar bytes in this node's units
    units_written: int = 0
    units_skipped: int = 0  # complete before this run started
    units_retried: int = 0  # written again by this run for the failures an earlier run recorded
    shards_written: int = 0  # tar parts written by this run
    shards_skipped: int = 0
    complete: bool = False  # every unit of the plan (all nodes) is done and dataset.json written
    errors_path: Path | None = None
    dataset_path: Path | None = None

    def failed_by_kind(self) -> dict[str, dict[str, int]]:
        """kind -> reason -> videos, every kind present (empty when none failed so)."""
        out: dict[str, dict[str, int]] = {kind: {} for kind in KINDS}
        for reason, n in sorted(self.failed.items()):
            out[kind_of(reason)][reason] = n
        return out


# --- pure: units, parameters, records ---------------------------------------------------------


def kind_of(reason: str) -> str:
    """media or transient; a reason of another processor's own making is the file's (media)."""
    return RECORDED_KINDS.get(reason, MEDIA)


def with_kind(entry: dict) -> dict:
    """A failure entry with `kind` just before `reason` (entries of older markers have none)."""
    out = {}
    for key, value in entry.items():
        if key == "reason":
            out["kind"] = entry.get("kind") or kind_of(value)
        if key != "kind":
            out[key] = value
    return out


def needs_retry(record: dict, retry_media: bool) -> bool:
    """Whether a unit's record asks for it to be written again: a transient failure (any with retry_media)."""
    kinds = {with_kind(failure)["kind"] for failure in record["failures"]}
    return TRANSIENT in kinds or (retry_media and MEDIA in kinds)


def failure_verdict(summary: Summary, max_failed: float = DEFAULT_MAX_FAILED) -> str | None:
    """Why the run is not a success (the command exits 5), or None: a transient failure is left (the next
    run retries it), or more than `max_failed` of the inputs failed for a media reason."""
    by_kind = summary.failed_by_kind()
    transient = sum(by_kind[TRANSIENT].values())
    if transient:
        return (
            f"{transient} of {summary.videos} inputs failed for a transient reason "
            f"({_reason_list(by_kind[TRANSIENT])}); run the same command again to retry them"
        )
    media = sum(by_kind[MEDIA].values())
    if media > max_failed * summary.videos:
        return (
            f"{media} of {summary.videos} inputs ({media / summary.videos:.1%}) failed for a media reason "
            f"({_reason_list(by_kind[MEDIA])}), more than --max-failed {max_failed:g}; see errors.jsonl"
        )
    return None


def _reason_list(counts: dict[str, int]) -> str:
    return ", ".join(f"{reason}: {n}" for reason, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def make_units(plan: Plan, shard_size: int) -> list[Unit]:
    """All units of the plan in a fixed order: sets in plan order, then by position."""
    units = []
    for set_name, jobs in plan.sets.items():
        for number, start in enumerate(range(0, len(jobs), shard_size)):
            units.append(Unit(set_name, number, tuple(jobs[start : start + shard_size])))
    return units


def node_units(units: list[Unit], node_rank: int, num_nodes: int) -> list[Unit]:
    """Round-robin over the plan's units, so nodes share every set evenly with no coordinator."""
    return [unit for i, unit in enumerate(units) if i % num_nodes == node_rank]


def plan_fingerprint(plan: Plan) -> str:
    """Hash of everything that decides the layout: a changed input tree must not resume into old units."""
    h = hashlib.sha256()
    h.update(json.dumps([plan.kind, plan.classes]).encode())
    for set_name, jobs in plan.sets.items():
        h.update(set_name.encode())
        for job in jobs:
            h.update(json.dumps(_hashed_fields(job), default=str).encode())
    return h.hexdigest()


def _hashed_fields(job: Job) -> list:
    """A job's field values; the multi-label ones only when set, so a single-label plan keeps the hash it
    had before they existed (its params.json is unchanged and an older folder can still be resumed)."""
    fields = dataclasses.asdict(job)
    if not job.class_indices:
        del fields["labels"], fields["class_indices"]
    return list(fields.values())


def mel_constants() -> dict[str, Any]:
    return {name.lower(): getattr(fmt, name) for name in MEL_CONSTANTS}


def run_parameters(
    plan: Plan, params: ShardParams, shard_size: int, max_shard_bytes: int | None
) -> dict[str, Any]:
    """Everything that changes the bytes or the layout of the output (not workers, not the node split)."""
    return {
        "format_version": DATASET_FORMAT_VERSION,
        "shard": params.to_dict(output_only=True),
        "mel": mel_constants(),
        "info_fields": list(fmt.INFO_FIELDS),
        "shard_size": shard_size,
        "max_shard_bytes": max_shard_bytes,
        "kind": plan.kind,
        "shuffle_seed": plan.shuffle_seed,
        "plan_sha256": plan_fingerprint(plan),
    }


def comparable(parameters: dict) -> dict:
    """Parameters as two runs compare them: without the operational fields (threads, timeout), which
    folders written before they were left out still hold."""
    shard = {k: v for k, v in parameters.get("shard", {}).items() if k not in OPERATIONAL}
    return {**parameters, "shard": shard} if "shard" in parameters else parameters


def parameter_differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Human-readable `key: old -> new` lines, recursing into nested dicts."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += parameter_differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out


def _video_seconds(result: Any) -> float:
    meta = getattr(result, "meta", None) or {}
    return float(meta.get("duration_s") or 0.0)


def unit_record(unit: Unit, parts: list[dict], failures: list[dict], ok: int, seconds: float) -> dict:
    """The unit marker's content: deterministic (no times, no host names), so reruns write the same bytes."""
    return {
        "set": unit.set_name,
        "unit": unit.number,
        "first_video": unit.jobs[0].index if unit.jobs else 0,
        "videos": len(unit.jobs),
        "ok": ok,
        "failed": len(failures),
        "samples": sum(p["samples"] for p in parts),
        "bytes": sum(p["bytes"] for p in parts),
        "hours": round(seconds / 3600, 6),
        "parts": parts,
        "failures": failures,
    }


def error_lines(plan: Plan, records: list[dict]) -> list[dict]:
    """errors.jsonl: annotated-but-missing files first (plan order), then failures in plan order."""
    lines = [with_kind({"set": None, "path": m.get("path"), "name": None, **m}) for m in plan.missing]
    for rec in records:
        lines += [with_kind({"set": rec["set"], **failure}) for failure in rec["failures"]]
    return lines


def common_extra(jobs: list[Job]) -> dict:
    """The bookkeeping every job of a set shares (split, subset, fold); per-video values are left out."""
    common = dict(jobs[0].extra) if jobs else {}
    for job in jobs[1:]:
        extra = dict(job.extra)
        common = {k: v for k, v in common.items() if extra.get(k) == v}
    return common


def label_fields(plan: Plan) -> dict:
    """dataset.json's keys of a multi-label set (none otherwise, so single-label files stay as they were)."""
    if not plan.multi_label:
        return {}
    return {"multi_label": True, "class_ids": list(plan.class_ids)}


def dataset_record(plan: Plan, parameters: dict, records: list[dict]) -> dict:
    """dataset.json from the plan and every unit marker (records in make_units order)."""
    sets: dict[str, dict] = {}
    reasons: Counter[str] = Counter()
    for m in plan.missing:
        reasons[m.get("reason", MISSING_FILE)] += 1
    for set_name, jobs in plan.sets.items():
        sets[set_name] = {
            "videos": len(jobs),
            "ok": 0,
            "failed": 0,
            "samples": 0,
            "bytes": 0,
            "hours": 0.0,
            "split": common_extra(jobs),
            "shards": [],
        }
    for rec in records:
        s = sets[rec["set"]]
        for key in ("ok", "failed", "samples", "bytes"):
            s[key] += rec[key]
        s["hours"] = round(s["hours"] + rec["hours"], 6)
        for part in rec["parts"]:
            where = {"tar": f"{rec['set']}/{part['tar']}", "idx": f"{rec['set']}/{part['idx']}"}
            s["shards"].append({**part, **where})
        reasons.update(f["reason"] for f in rec["failures"])
    keys = ("videos", "ok", "failed", "samples", "bytes")
    totals = {key: sum(s[key] for s in sets.values()) for key in keys}
    totals["hours"] = round(sum(s["hours"] for s in sets.values()), 6)
    totals["missing"] = len(plan.missing)
    return {
        "format_version": DATASET_FORMAT_VERSION,
        "created_by": f"xdctools {__version__}",
        "parameters": parameters,
        "kind": plan.kind,
        "classes": list(plan.classes),
        **label_fields(plan),
        "totals": totals,
        "failures_by_reason": dict(sorted(reasons.items())),
        "failures_by_kind": {
            kind: sum(n for r, n in reasons.items() if kind_of(r) == kind) for kind in KINDS
        },
        "sets": sets,
        "files": [{"tar": shard["tar"], "idx": shard["idx"]} for s in sets.values() for shard in s["shards"]],
    }


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=1, ensure_ascii=False) + "\n").encode()


# --- I/O: parameters, markers, cleanup --------------------------------------------------------


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: cannot read ({e}); remove it or use another output directory") from e


def check_or_write_parameters(out_dir: Path, parameters: dict, node_rank: int) -> None:
    """Refuse to mix runs: the output must be empty of shards, or made with exactly these parameters."""
    params_path = out_dir / PARAMS_FILE
    dataset_path = out_dir / DATASET_FILE
    old = None
    source = params_path
    if params_path.exists():
        old = _read_json(params_path)
    elif dataset_path.exists():
        old, source = _read_json(dataset_path).get("parameters", {}), dataset_path
    elif any(out_dir.glob(f"*/*{MARKER_SUFFIX}")):
        raise DataError(f"{out_dir}: holds unit markers but no {PARAMS_FILE}; use another output directory")
    if old is not None:
        diff = parameter_differences(comparable(old), parameters)
        if diff:
            raise ConfigError(
                f"{source}: output was made with different parameters ({'; '.join(diff[:4])}"
                f"{'; ...' if len(diff) > 4 else ''}); use another output directory"
            )
    if not params_path.exists():
        write_file(params_path, _json_bytes(parameters), tmp_suffix=f".{node_rank}{TMP_SUFFIX}")


def _clear_unit(set_dir: Path, unit: Unit) -> None:
    """Delete what an interrupted attempt left (parts, idx, .tmp files); the unit is redone from scratch."""
    for pattern in (f"{unit.stem}-*", f"{unit.stem}{MARKER_SUFFIX}{TMP_SUFFIX}"):
        for path in set_dir.glob(pattern):
            path.unlink()


# --- workers ----------------------------------------------------------------------------------


def _call(process: Process, params: ShardParams, job: Job) -> Any:
    """Runs in a worker. An exception is not the file's failure: it reaches the parent, which stops."""
    return process(job, params)


def _internal_error(job: Job, exc: Exception) -> InternalError:
    text = str(exc).strip().splitlines()
    what = f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
    return InternalError(
        f"{job.path}: internal error while processing it ({what}); a bug in xdctools, not a fault of the "
        "file: the run stopped and recorded nothing against it"
    )


def _ordered_results(
    jobs: Iterable[Job], params: ShardParams, workers: int, process: Process
) -> Iterator[tuple[Job, Any]]:
    """Results in job order with at most WINDOW_PER_WORKER*workers jobs in flight (bounded memory)."""
    call = functools.partial(_call, process, params)
    if workers <= 1:
        for job in jobs:
            try:
                result = call(job)
            except XdcError:
                raise
            except Exception as e:
                raise _internal_error(job, e) from e
            yield job, result
        return
    # Workers fork from a clean server process (not from this one, which may hold torch's threads) that
    # imported the processor's modules once, instead of once per worker.
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload([process.__module__, *WARM_MODULES])
    window = WINDOW_PER_WORKER * workers
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        pending: deque[tuple[Job, Future]] = deque()
        it = iter(jobs)
        try:
            for job in it:
                pending.append((job, pool.submit(call, job)))
                if len(pending) >= window:
                    break
            while pending:
                job, future = pending.popleft()
                try:
                    result = future.result()
                except BrokenProcessPool as e:
                    raise XdcError(f"{job.path}: a worker process died while processing it ({e})") from e
                except XdcError:
                    raise
                except Exception as e:  # the worker's traceback is its __cause__
                    raise _internal_error(job, e) from e
                nxt = next(it, None)
                if nxt is not None:
                    pending.append((nxt, pool.submit(call, nxt)))
                yield job, result
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


# --- the run ----------------------------------------------------------------------------------


def _failure_entry(job: Job, result: Any) -> dict:
    reason = str(getattr(result, "reason", None) or "unknown")
    return {
        "index": job.index,
        "path": job.path,
        "name": job.name,
        "kind": kind_of(reason),
        "reason": reason,
        "detail": str(getattr(result, "detail", None) or ""),
    }


def _add_record(summary: Summary, rec: dict) -> None:
    summary.ok += rec["ok"]
    summary.hours = round(summary.hours + rec["hours"], 6)
    summary.bytes += rec["bytes"]
    for failure in rec["failures"]:
        summary.failed[failure["reason"]] = summary.failed.get(failure["reason"], 0) + 1


@dataclass
class _Counts:
    total: int
    done: int = 0
    ok: int = 0
    failed: int = 0


def _write_unit(
    out_dir: Path,
    unit: Unit,
    results: Iterator[tuple[Job, Any]],
    max_shard_bytes: int | None,
    counts: _Counts,
    progress: Progress | None,
) -> dict:
    """Stream one unit's results into its parts, then write its marker (last, atomically)."""
    failures: list[dict] = []
    ok, seconds = 0, 0.0
    with ShardWriter(out_dir / unit.set_name, unit.stem, max_shard_bytes) as writer:
        for _ in unit.jobs:
            job, result = next(results)
            if result.ok and result.samples:
                writer.write_video(result.samples)
                ok += 1
                seconds += _video_seconds(result)
                counts.ok += 1
            else:
                failures.append(_failure_entry(job, result))
                counts.failed += 1
            counts.done += 1
            if progress:
                progress(counts.done, counts.total, counts.ok, counts.failed)
    rec = unit_record(unit, [part.to_dict() for part in writer.parts], failures, ok, seconds)
    write_file(out_dir / unit.marker, _json_bytes(rec))
    return rec


def _finish_dataset(out_dir: Path, plan: Plan, parameters: dict, units: list[Unit], node_rank: int) -> bool:
    """Write errors.jsonl and dataset.json when every unit of the plan (any node's) is complete."""
    markers = [out_dir / unit.marker for unit in units]
    if not all(m.exists() for m in markers):
        return False
    records = [_read_json(m) for m in markers]
    tmp = f".{node_rank}{TMP_SUFFIX}"
    errors = "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in error_lines(plan, records))
    write_file(out_dir / ERRORS_FILE, errors.encode(), tmp_suffix=tmp)
    dataset = _json_bytes(dataset_record(plan, parameters, records))
    write_file(out_dir / DATASET_FILE, dataset, tmp_suffix=tmp)
    return True


def _as_callback(progress: Any) -> Progress | None:
    """A tqdm bar (anything with `update` and `n`) becomes a callback that sets its total and advances it."""
    if progress is None or not (hasattr(progress, "update") and hasattr(progress, "n")):
        return progress
    bar = progress

    def report(done: int, total: int, ok: int, failed: int) -> None:
        bar.total = total
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(ok=ok, failed=failed, refresh=False)
        bar.update(done - bar.n)

    return report


def _check_args(shard_size: int, max_shard_bytes: int | None, workers: int, node_rank: int, num_nodes: int):
    if shard_size < 1:
        raise ConfigError(f"shard size must be at least 1 video, got {shard_size}")
    if max_shard_bytes is not None and max_shard_bytes <= 0:
        raise ConfigError(f"shard bytes must be positive, got {max_shard_bytes}")
    if workers < 1:
        raise ConfigError(f"workers must be at least 1, got {workers}")
    if num_nodes < 1 or not 0 <= node_rank < num_nodes:
        raise ConfigError(f"node rank must be in [0, {num_nodes}), got {node_rank}")


def run_shard(
    plan: Plan,
    params: ShardParams,
    out_dir: str | Path,
    *,
    shard_size: int = 1000,
    max_shard_bytes: int | None = None,
    workers: int = 1,
    node_rank: int = 0,
    num_nodes: int = 1,
    progress: Progress | None = None,
    process: Process = process_job,
    retry_failed: bool = False,
) -> Summary:
    """Shard this node's units of the plan into `out_dir`, skipping complete units; see docs/shard-format.md.

    A unit an earlier run completed with a transient failure is written again (with `retry_failed`, one
    with any failure). An exception of the processor other than a failure it returns stops the run
    (InternalError). `process` must be picklable (a module-level function) when `workers > 1`.
    """
    _check_args(shard_size, max_shard_bytes, workers, node_rank, num_nodes)
    progress = _as_callback(progress)
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"{out_dir}: cannot create the output directory ({e.strerror})") from e
    for name in (PARAMS_FILE, DATASET_FILE, ERRORS_FILE):  # this node's leftovers of a killed run
        (out_dir / f"{name}.{node_rank}{TMP_SUFFIX}").unlink(missing_ok=True)
    parameters = run_parameters(plan, params, shard_size, max_shard_bytes)
    check_or_write_parameters(out_dir, parameters, node_rank)

    units = make_units(plan, shard_size)
    mine = node_units(units, node_rank, num_nodes)
    summary = Summary(missing=len(plan.missing), videos=sum(len(unit.jobs) for unit in mine))
    summary.missing_first = [missing_line(m) for m in plan.missing[:MISSING_SHOWN]]
    todo = _units_to_write(out_dir, mine, summary, retry_failed)
    _prepare(out_dir, todo)

    counts = _Counts(total=sum(len(unit.jobs) for unit in todo))
    if progress:
        progress(0, counts.total, 0, 0)

    results = _ordered_results((job for unit in todo for job in unit.jobs), params, workers, process)
    try:
        for unit in todo:
            rec = _write_unit(out_dir, unit, results, max_shard_bytes, counts, progress)
            _add_record(summary, rec)
            summary.units_written += 1
            summary.shards_written += len(rec["parts"])
    finally:
        results.close()  # shuts the pool down if a write failed

    summary.complete = _finish_dataset(out_dir, plan, parameters, units, node_rank)
    if summary.complete:
        summary.errors_path = out_dir / ERRORS_FILE
        summary.dataset_path = out_dir / DATASET_FILE
    return summary


def _units_to_write(out_dir: Path, mine: list[Unit], summary: Summary, retry_failed: bool) -> list[Unit]:
    """This node's units without a marker, and those whose marker asks for a retry; the others are
    counted into `summary` as they are."""
    todo: list[Unit] = []
    for unit in mine:
        marker = out_dir / unit.marker
        rec = _read_json(marker) if marker.exists() else None
        if rec is not None and not needs_retry(rec, retry_failed):
            _add_record(summary, rec)
            summary.units_skipped += 1
            summary.shards_skipped += len(rec["parts"])
            continue
        summary.units_retried += rec is not None
        todo.append(unit)
    return todo


def _prepare(out_dir: Path, todo: list[Unit]) -> None:
    """Make the sets' folders and clear what earlier attempts left of the units to write. A unit written
    again loses its marker, and dataset.json and errors.jsonl, which describe it, go first."""
    for set_name in {unit.set_name for unit in todo}:
        (out_dir / set_name).mkdir(exist_ok=True)
    if any((out_dir / unit.marker).exists() for unit in todo):
        for name in (DATASET_FILE, ERRORS_FILE):
            (out_dir / name).unlink(missing_ok=True)
    for unit in todo:
        (out_dir / unit.marker).unlink(missing_ok=True)
        _clear_unit(out_dir / unit.set_name, unit)
