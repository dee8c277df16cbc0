"""`xdctools shard`: a video (or audio) collection -> WebDataset tar shards with DALI indexes."""

from __future__ import annotations

import dataclasses
import os
import re
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from xdctools.commands.progress import StageBars
from xdctools.commands.slurm_options import (
    ARRAY,
    COMMON,
    given,
    refuse_without_slurm,
    resources,
    slurm_options,
)
from xdctools.errors import DataError, XdcError
from xdctools.shard.plan import KINDS
from xdctools.tasks import ShardTask

if TYPE_CHECKING:
    from xdctools.shard.run import Summary
    from xdctools.slurm import TaskResult

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
_UNITS |= {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40, "K": 10**3, "M": 10**6, "G": 10**9}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*$")


class ByteSize(click.ParamType):
    """'1GB', '500MB', '1.5GiB' or a plain number of bytes."""

    name = "size"

    def convert(self, value, param, ctx) -> int:
        if isinstance(value, int):
            return value
        match = _SIZE.match(str(value))
        unit = match and _UNITS.get(match.group(2).upper())
        if not match or unit is None:
            self.fail(f"{value!r} is not a size like 1GB, 500MB or 1073741824", param, ctx)
        size = int(float(match.group(1)) * unit)
        if size <= 0:
            self.fail(f"{value!r} must be positive", param, ctx)
        return size


def parse_split(value: str | None) -> list[int] | str | None:
    """None -> the input kind's default; 'all'; '1' or '1,3' -> those split numbers."""
    if value is None:
        return None
    if value.strip().lower() == "all":
        return "all"
    try:
        ids = sorted({int(part) for part in value.split(",") if part.strip()})
    except ValueError:
        raise click.BadParameter(f"{value!r}: expected 1, 2, 3, a list like 1,3, or all") from None
    if not ids or ids[0] < 1:
        raise click.BadParameter(f"{value!r}: split numbers start at 1")
    return ids


KIND_NOTES = {"media": "", "transient": " (the next run retries them)"}


def format_summary(summary: Summary, out_dir: Path, pending: str | None = None) -> str:
    """The closing lines: ok / failed per kind and reason / hours / GB, and where the details are.

    `pending`: the last line when the dataset is not complete (default: this node waits for the others).
    """
    lines = [
        f"ok: {summary.ok} videos, {summary.hours:.2f} h of video, {summary.bytes / 1e9:.3f} GB of shards",
        *failure_lines(summary),
        f"units: {summary.units_written} written now ({summary.units_retried} of them retried), "
        f"{summary.units_skipped} already complete ({summary.shards_written} tar files written)",
    ]
    if summary.complete:
        lines += [f"dataset: {summary.dataset_path}", f"errors: {summary.errors_path}"]
    else:
        lines.append(
            pending or f"this node is done; {out_dir}/dataset.json is written when every node is done"
        )
    return "\n".join(lines)


def failure_lines(summary: Summary) -> list[str]:
    """failed: N of M (share), then each kind (always both) with its reasons, then missing files."""
    failed = sum(summary.failed.values())
    share = f" ({failed / summary.videos:.1%})" if summary.videos else ""
    lines = [f"failed: {failed} of {summary.videos} videos{share}"]
    for kind, reasons in summary.failed_by_kind().items():
        lines.append(f"  {kind}: {sum(reasons.values())}{KIND_NOTES[kind] if reasons else ''}")
        lines += [
            f"    {reason}: {n}" for reason, n in sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0]))
        ]
    if summary.missing:
        lines.append(f"annotated but not found: {summary.missing} (missing_file in errors.jsonl), e.g.")
        lines += [f"  {line}" for line in summary.missing_first]
    return lines


def task_line(result: TaskResult) -> str:
    """One array task as it ended: its counts, or its error."""
    if not result.ok:
        return f"task {result.index}: failed: {result.error}"
    s = result.value
    return (
        f"task {result.index}: {s.ok} ok, {sum(s.failed.values())} failed of {s.videos} videos; units: "
        f"{s.units_written} written, {s.units_skipped} already complete"
    )


@click.command("shard")
@click.argument("root", type=click.Path(exists=True, path_type=Path))
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path), help="Output directory.")
@click.option("--kind", type=click.Choice(KINDS), help="Input layout (detected when omitted).")
@click.option(
    "--csv",
    "csv_paths",
    multiple=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Kinetics csv (label,youtube_id,time_start,time_end,split) or AudioSet segments csv "
    "(YTID, start_seconds, end_seconds, positive_labels), told apart by their first lines. Repeat it "
    "for several csvs of one kind in one folder (e.g. an AudioSet train and eval csv: a set each).",
)
@click.option(
    "--splits",
    type=click.Path(exists=True, path_type=Path),
    help="Official split files (UCF101 lists, HMDB51 split folder, ESC-50 meta/esc50.csv).",
)
@click.option(
    "--split",
    "split",
    default=None,
    help="Which splits (folds): 1, 2, 3, a list like 1,3, or all (default: split 1, all folds).",
)
@click.option(
    "--manifest",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Generic manifest, csv or jsonl: path, optional label, start, end.",
)
@click.option(
    "--classes",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Class index file (e.g. UCF101 classInd.txt; AudioSet's class_labels_indices.csv, default: the one "
    "beside the csv); default: sorted folder names.",
)
@click.option(
    "--set-name",
    default=None,
    help="Set name when the input has no splits (default: train; for an AudioSet csv its name: "
    "balanced_train, unbalanced_train, eval); not with several --csv.",
)
@click.option(
    "--order",
    type=click.Choice(["shuffled", "name"]),
    default="shuffled",
    show_default=True,
    help="Video order in the shards. Name order is class order, and DALI's shuffle buffer then "
    "fills training batches with a few classes; keep it only to match an older shard folder.",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the shuffled order.")
@click.option("--codec", type=click.Choice(["vp9", "h264"]), default="vp9", show_default=True)
@click.option(
    "--short-side", type=int, default=256, show_default=True, help="Short side of the video, pixels."
)
@click.option("--fps", default=None, help="Output frame rate (e.g. 25 or 30000/1001); default: the source's.")
@click.option("--gop", type=int, default=16, show_default=True, help="Keyframe interval, frames.")
@click.option("--segment-frames", type=int, default=64, show_default=True, help="Frames per stored segment.")
@click.option("--crf", type=int, default=None, help="Quality (default: vp9 32, h264 23).")
@click.option(
    "--audio",
    type=click.Choice(["required", "optional"]),
    default=None,
    help="required: drop videos without usable audio; optional: keep them with a floor-value mel "
    "(default: required for pretraining inputs, optional for UCF101/HMDB51).",
)
@click.option(
    "--workers",
    type=int,
    default=os.cpu_count() or 1,
    show_default="all CPUs",
    help="Worker processes, one ffmpeg each; the shards do not depend on it.",
)
@click.option("--ffmpeg-threads", type=int, default=1, show_default=True, help="Threads per ffmpeg process.")
@click.option("--shard-size", type=int, default=1000, show_default=True, help="Videos per shard unit.")
@click.option(
    "--shard-bytes", type=ByteSize(), default=None, help="Roll a unit to a new part past this (1GB)."
)
@click.option(
    "--node-rank", type=int, default=0, show_default=True, help="This machine's rank (Slurm array)."
)
@click.option("--num-nodes", type=int, default=1, show_default=True, help="Machines sharing the work.")
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=600.0,
    show_default=True,
    help="Seconds one file may take (probe and ffmpeg each); a file past it fails as timeout, a transient "
    "failure the next run retries.",
)
@click.option(
    "--max-failed",
    type=click.FloatRange(0, 1),
    default=0.05,  # run.DEFAULT_MAX_FAILED (not imported here: --help stays fast)
    show_default=True,
    help="Share of the inputs that may fail for a media reason (corrupt, too short, ...) before the command "
    "exits 5.",
)
@click.option(
    "--retry-failed",
    is_flag=True,
    help="Also retry the files that failed for a media reason (after you replaced them); transient "
    "failures are always retried.",
)
@slurm_options(time="4:00:00", cpus=16, ranks=False, folder="OUTPUT.slurm beside OUTPUT")
def shard(
    root: Path,
    output: Path,
    kind: str | None,
    csv_paths: tuple[Path, ...],
    splits: Path | None,
    split: str | None,
    manifest: Path | None,
    classes: Path | None,
    set_name: str | None,
    order: str,
    seed: int,
    codec: str,
    short_side: int,
    fps: str | None,
    gop: int,
    segment_frames: int,
    crf: int | None,
    audio: str | None,
    workers: int,
    ffmpeg_threads: int,
    shard_size: int,
    shard_bytes: int | None,
    node_rank: int,
    num_nodes: int,
    timeout: float,
    max_failed: float,
    retry_failed: bool,
    executor: str,
    **slurm: Any,
) -> None:
    """Re-encode the videos under ROOT into WebDataset shards that DALI streams.

    Each video becomes samples of up to --segment-frames frames (VP9 WebM, log-mel .npy, metadata); files
    that cannot be used are listed with their kind and reason in OUTPUT/errors.jsonl. Rerun the same
    command to resume: complete shard units are kept, files that failed for a transient reason (timeout,
    disk full, out of memory, ffmpeg killed) are retried. Exit 5 when transient failures are left or more
    than --max-failed of the inputs failed for a media reason. --executor slurm runs the units as a Slurm
    array (docs/scale.md).
    """
    from xdctools.shard.run import failure_verdict

    refuse_without_slurm(executor, (*COMMON, *ARRAY))
    task = shard_task(click.get_current_context().params)
    if executor == "slurm":
        shard_on_slurm(task, slurm, max_failed)
        return
    summary = shard_here(task, node_rank, num_nodes)
    click.echo(format_summary(summary, output))
    verdict = failure_verdict(summary, max_failed)
    if verdict:
        raise DataError(f"{summary.errors_path or output}: {verdict}")


def shard_task(o: dict[str, Any]) -> ShardTask:
    """The command's options (Click's parameters by name) as the task every node runs."""
    return ShardTask(
        o["root"],
        o["output"],
        inputs={
            "kind": o["kind"],
            "csv": list(o["csv_paths"]) or None,
            "splits": o["splits"],
            "split_ids": parse_split(o["split"]),
            "manifest": o["manifest"],
            "classes": o["classes"],
            "set_name": o["set_name"],
        },
        order=o["order"],
        seed=o["seed"],
        params={
            "codec": o["codec"],
            "short_side": o["short_side"],
            "fps": o["fps"],
            "gop": o["gop"],
            "segment_frames": o["segment_frames"],
            "crf": o["crf"],
            "ffmpeg_threads": o["ffmpeg_threads"],
            "timeout_s": o["timeout"],
        },
        audio=o["audio"],
        shard_size=o["shard_size"],
        max_shard_bytes=o["shard_bytes"],
        workers=o["workers"],
        retry_failed=o["retry_failed"],
    )


def shard_here(task: ShardTask, node_rank: int, num_nodes: int) -> Summary:
    """This process's slice, with a progress bar; a bug's traceback is printed before its one line."""
    from xdctools.shard.run import InternalError

    bars = StageBars("video", leave=True)
    try:
        return task(
            node_rank,
            num_nodes,
            lambda done, total, ok, failed: bars("shard", done, total, ok=ok, failed=failed),
        )
    except InternalError as e:
        bars.close()
        traceback.print_exception(e.__cause__)  # the bug's traceback (a worker's included), then one line
        raise
    except OSError as e:
        raise XdcError(f"{e.filename or task.output}: {e.strerror or e}") from e
    finally:
        bars.close()


def shard_on_slurm(task: ShardTask, slurm: dict[str, Any], max_failed: float) -> None:
    """An array of --slurm-tasks tasks (task R of M: --node-rank R --num-nodes M), then one summary."""
    from xdctools.shard.run import failure_verdict
    from xdctools.slurm import failure, import_submitit, run_array
    from xdctools.tasks import merge_summaries

    if given(("node_rank", "num_nodes")):
        raise click.UsageError(
            "--node-rank/--num-nodes: set by the array with --executor slurm (--slurm-tasks)"
        )
    out = task.output.resolve()
    res = resources(
        slurm,
        folder=out.with_name(out.name + ".slurm"),
        name="xdctools-shard",
        gpus=False,
        array=slurm["slurm_tasks"],
    )
    import_submitit()
    res = dataclasses.replace(res, array=min(res.array, max(task.units(), 1)))  # no task without a unit
    if not given(("workers",)):
        task = dataclasses.replace(task, workers=res.cpus_per_task)
    echo = click.echo
    results = run_array(
        task,
        [(rank, res.array) for rank in range(res.array)],
        res,
        on_submit=lambda line: echo(f"submitted {line}", err=True),
        on_done=lambda r: echo(f"task {r.index} ended" + ("" if r.ok else " with an error"), err=True),
    )
    merged = merge_summaries([r.value for r in results if r.ok])
    error = failure(results)
    pending = f"{task.output}/dataset.json is written when every task is done: run the same command again"
    click.echo("\n".join([*map(task_line, results), format_summary(merged, task.output, pending)]))
    if error is not None:
        raise error
    verdict = failure_verdict(merged, max_failed)
    if verdict:
        raise DataError(f"{merged.errors_path or task.output}: {verdict}")
