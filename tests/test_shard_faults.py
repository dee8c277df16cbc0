"""The shard error policy under real faults: a file-size limit that kills ffmpeg (SIGXFSZ) or fails our own
tar write (EFBIG), a timeout, a bug in our code, a replaced file; exit codes, per-kind counts, --max-failed.

Every run goes through the real CLI on real clips; the file-size limits are set on a subprocess with
`resource.setrlimit(RLIMIT_FSIZE)`, so ffmpeg dies of SIGXFSZ while Python (which ignores that signal) gets
EFBIG. One test patches a third-party function (librosa), never one of ours; it says why.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import resource
import subprocess
import sys
import tarfile
from pathlib import Path

import librosa
import pytest
from click.testing import CliRunner

from xdctools.commands.shard import format_summary, shard
from xdctools.errors import DataError, DiskFullError
from xdctools.shard.media import DISK_FULL, REASONS, TIMEOUT, TRANSIENT, stopped_failure
from xdctools.shard.params import ShardParams
from xdctools.shard.plan import build_plan
from xdctools.shard.run import (
    DEFAULT_MAX_FAILED,
    RECORDED_KINDS,
    InternalError,
    Summary,
    failure_verdict,
    kind_of,
    needs_retry,
    run_shard,
    with_kind,
)

ROOT = Path(__file__).resolve().parents[1]
# Two units of real clips and one of broken files (name order, 2 videos a unit): a/ 2.4 s and 2.8 s
# without audio, b/ 1 s and 1.2 s with audio, broken/ an empty file and a truncated MP4.
PICKS = {
    "a": [
        "hmdb51/wave/RATRACE_wave_f_nm_np1_fr_goo_37.avi",
        "hmdb51/cartwheel/Turnk_r_Pippi_Michel_cartwheel_f_cm_np2_le_med_6.avi",
    ],
    "b": ["edge/big_buck_bunny_432_433.webm", "edge/realshort.mp4"],
    "broken": ["edge/empty.mp4", "edge/truncated_R6llTwEh07w.mp4"],
}
OPTIONS = [
    "--short-side",
    "64",
    "--shard-size",
    "2",
    "--order",
    "name",
    "--audio",
    "optional",
    "--workers",
    "1",
]
FFMPEG_LIMIT = 8_000  # below every clip's first segment, above each of our JSON files
TAR_LIMIT = 110_000  # above every file ffmpeg writes (the 1.2 s clip's audio: 77 kB), below unit 0's tar


def output_files(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def errors_of(out: Path) -> dict[str, dict]:
    rows = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    return {row["name"]: row for row in rows}


def last_line(text: str) -> str:
    return text.strip().splitlines()[-1]


def run_limited(args: list[str], limit: int) -> subprocess.CompletedProcess:
    """`xdctools shard ARGS` in a process (and its ffmpeg children) whose files cannot grow past `limit`."""

    def limit_file_size() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "xdctools", "shard", *args]
    return subprocess.run(
        command, env=env, preexec_fn=limit_file_size, capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="module")
def tree(media_dir: Path, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("faults")
    for folder, picks in PICKS.items():
        (root / folder).mkdir()
        for rel in picks:
            (root / folder / Path(rel).name).symlink_to(media_dir / rel)
    return root


def cli_args(tree: Path, out: Path, *extra: str) -> list[str]:
    return [str(tree), "-o", str(out), *OPTIONS, "--max-failed", "0.5", *extra]


@pytest.fixture(scope="module")
def reference(tree: Path, tmp_path_factory) -> dict[str, bytes]:
    """The undisturbed run: 4 clips sharded, the 2 broken files failed for a media reason (exit 0: 2 of 6
    is within --max-failed 0.5)."""
    out = tmp_path_factory.mktemp("reference") / "out"
    result = CliRunner().invoke(shard, cli_args(tree, out))
    assert result.exit_code == 0, result.output
    assert "media: 2\n    empty_file: 1\n    unreadable: 1\n  transient: 0\n" in result.stdout
    return output_files(out)


def samples(reference: dict[str, bytes]) -> list[tuple[dict, int]]:
    """(JSON member, bytes of the video segment) of every sample of the reference's tars."""
    out = []
    for name, data in reference.items():
        if name.endswith(".tar"):
            with tarfile.open(fileobj=io.BytesIO(data)) as tar:
                found = {m.name: tar.extractfile(m).read() for m in tar}
            for member, payload in found.items():
                if member.endswith(".json"):
                    out.append((json.loads(payload), len(found[member[: -len("json")] + "webm"])))
    return out


# --- disk full ----------------------------------------------------------------------------------


def test_ffmpeg_killed_by_a_file_size_limit_is_transient_and_the_rerun_retries_it(
    tree: Path, reference: dict[str, bytes], tmp_path: Path
):
    # The limit's premise: each clip's first segment is larger (ffmpeg dies), our JSON files are smaller.
    first_segments = [size for doc, size in samples(reference) if doc["segment"]["index"] == 0]
    assert len(first_segments) == 4 and min(first_segments) > FFMPEG_LIMIT
    out = tmp_path / "out"
    args = cli_args(tree, out)
    proc = run_limited(args, FFMPEG_LIMIT)
    assert proc.returncode == DataError.exit_code == 5, proc.stderr
    assert "transient: 4 (the next run retries them)\n    disk_full: 4\n" in proc.stdout
    assert "media: 2\n    empty_file: 1\n    unreadable: 1\n" in proc.stdout
    assert last_line(proc.stderr) == (
        f"Error: {out / 'errors.jsonl'}: 4 of 6 inputs failed for a transient reason (disk_full: 4); "
        "run the same command again to retry them"
    )
    errors = errors_of(out)
    for name, row in errors.items():
        if name.startswith("broken/"):
            assert row["kind"] == "media"
        else:  # the fact: ffmpeg dies of SIGXFSZ
            assert (row["kind"], row["reason"]) == ("transient", "disk_full")
            assert row["detail"] == "ffmpeg killed by SIGXFSZ (exit -25): a file-size limit was reached"
    assert list(errors["a/RATRACE_wave_f_nm_np1_fr_goo_37.avi"]) == [
        *("set", "index", "path", "name", "kind", "reason", "detail")
    ]
    dataset = json.loads((out / "dataset.json").read_text())
    assert dataset["failures_by_kind"] == {"media": 2, "transient": 4}
    records = [json.loads((out / f"train/train-{u:06d}.stats.json").read_text()) for u in range(3)]
    # Units 0 and 1 are not complete (their marker asks for a retry); unit 2 failed for media reasons only.
    assert [needs_retry(rec, retry_media=False) for rec in records] == [True, True, False]
    assert not list(out.glob("train/*.tar")) and not list(out.rglob("*.tmp"))
    kept = (out / "train/train-000002.stats.json").stat()

    result = CliRunner().invoke(shard, args)  # the space is back
    assert result.exit_code == 0, result.output
    assert "units: 2 written now (2 of them retried), 1 already complete" in result.stdout
    assert output_files(out) == reference
    again = (out / "train/train-000002.stats.json").stat()
    assert (again.st_ino, again.st_mtime_ns) == (kept.st_ino, kept.st_mtime_ns)  # not rewritten


def test_our_own_tar_write_past_a_file_size_limit_fails_in_one_line_and_leaves_no_partial_file(
    tree: Path, reference: dict[str, bytes], tmp_path: Path
):
    # The limit's premise: every file ffmpeg writes (segments, 16 kHz float32 audio) is smaller, unit 0's tar
    # larger.
    largest_ffmpeg_file = max(
        max(size, 4 * doc["audio"]["stored_samples"]) for doc, size in samples(reference)
    )
    assert largest_ffmpeg_file < TAR_LIMIT < len(reference["train/train-000000-00.tar"])
    out = tmp_path / "out"
    proc = run_limited(cli_args(tree, out), TAR_LIMIT)
    assert proc.returncode == DiskFullError.exit_code == 7 and proc.stdout == ""
    assert "Traceback" not in proc.stderr
    assert last_line(proc.stderr) == (
        f"Error: {out / 'train/train-000000-00.tar'}: cannot write (File too large); free space (or raise "
        "the file-size limit) and run the same command again (nothing half-written was kept)"
    )
    assert sorted(output_files(out)) == ["params.json"]  # no tar, no .tmp, no marker, no dataset.json

    result = CliRunner().invoke(shard, cli_args(tree, out))
    assert result.exit_code == 0, result.output
    assert output_files(out) == reference


# --- timeout ------------------------------------------------------------------------------------


def test_a_timeout_is_transient_and_the_rerun_retries_it(
    tree: Path, reference: dict[str, bytes], tmp_path: Path
):
    out = tmp_path / "out"
    result = CliRunner().invoke(shard, cli_args(tree, out, "--timeout", "0.01"))
    assert result.exit_code == 5, result.output
    errors = errors_of(out)
    clips = [name for name in errors if not name.startswith("broken/")]
    assert len(clips) == 4
    for name in clips:
        assert (errors[name]["kind"], errors[name]["reason"]) == (TRANSIENT, TIMEOUT)
        assert errors[name]["detail"].endswith("took more than 0.01 s (--timeout)")
    assert errors["broken/empty.mp4"]["reason"] == "empty_file"  # judged before any process starts
    assert all(row["kind"] == kind_of(row["reason"]) for row in errors.values())
    assert f"transient: {sum(r['kind'] == TRANSIENT for r in errors.values())} (" in result.stdout

    result = CliRunner().invoke(shard, cli_args(tree, out))  # the default timeout: a rerun may change it
    assert result.exit_code == 0, result.output
    assert output_files(out) == reference


# --- a bug in our code --------------------------------------------------------------------------


def test_a_bug_stops_the_command_with_its_traceback_and_blames_no_file(
    media_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """librosa is patched to raise, as an unforeseen exception would: no input makes our own code raise (a
    bug we found would be fixed, and the test with it) and there is no option for it, so a third-party
    call is the one place to inject it; every line of ours runs as it does for real."""
    root = tmp_path / "tree"
    (root / "a").mkdir(parents=True)
    (root / "a" / "silent.avi").symlink_to(media_dir / PICKS["a"][0])  # no audio: no spectrogram
    (root / "a" / "voiced.mp4").symlink_to(media_dir / "edge/realshort.mp4")
    out = tmp_path / "out"
    args = [str(root), "-o", str(out), *OPTIONS, "--shard-size", "1"]

    def melspectrogram(*args, **kwargs):
        raise RuntimeError("injected: an exception nobody anticipated")

    monkeypatch.setattr(librosa.feature, "melspectrogram", melspectrogram)
    result = CliRunner().invoke(shard, args)
    assert result.exit_code == InternalError.exit_code == 1
    assert result.stdout == ""
    assert "Traceback (most recent call last)" in result.stderr and "in log_mel" in result.stderr
    assert last_line(result.stderr) == (
        f"Error: {root / 'a/voiced.mp4'}: internal error while processing it (RuntimeError: injected: an "
        "exception nobody anticipated); a bug in xdctools, not a fault of the file: the run stopped and "
        "recorded nothing against it"
    )
    # Unit 0 (the clip before it) is complete; nothing names the file; no errors.jsonl or dataset.json.
    assert sorted(output_files(out)) == [
        "params.json",
        "train/train-000000-00.idx",
        "train/train-000000-00.tar",
        "train/train-000000.stats.json",
    ]
    assert json.loads((out / "train/train-000000.stats.json").read_text())["failures"] == []

    monkeypatch.undo()  # fixed: the rerun keeps unit 0 and does the rest
    result = CliRunner().invoke(shard, args)
    assert result.exit_code == 0, result.output
    assert "units: 1 written now (0 of them retried), 1 already complete" in result.stdout


def test_a_job_that_makes_our_code_raise_in_a_worker_stops_the_run(tree: Path, tmp_path: Path):
    """A job whose bookkeeping field collides with a metadata field (a planner bug): our sample builder
    refuses it in a worker process; the parent stops with the worker's traceback as the cause."""
    plan = build_plan(tree)
    jobs = plan.sets["train"][:2]
    bad = dataclasses.replace(jobs[0], extra=(("duration", 1),))
    plan.sets = {"train": [bad, jobs[1]]}
    with pytest.raises(InternalError, match=r"RATRACE.*: internal error while processing it") as raised:
        run_shard(plan, ShardParams(short_side=64, audio_required=False), tmp_path, workers=2)
    cause = raised.value.__cause__
    assert isinstance(cause, ValueError) and "collides with a metadata field" in str(cause)
    assert "build_samples" in str(cause.__cause__)  # the worker's traceback
    assert sorted(output_files(tmp_path)) == ["params.json"]


# --- media failures: --retry-failed, --max-failed, exit codes ---------------------------------------


def test_retry_failed_processes_a_replaced_file_again(media_dir: Path, tmp_path: Path):
    root = tmp_path / "tree"
    (root / "x").mkdir(parents=True)
    replaced = root / "x" / "clip.webm"
    replaced.write_bytes(b"")  # an empty download
    (root / "x" / "other.mp4").symlink_to(media_dir / "edge/realshort.mp4")
    out = tmp_path / "out"
    args = [str(root), "-o", str(out), *OPTIONS, "--shard-size", "1"]

    result = CliRunner().invoke(shard, args)  # 1 of 2 failed: more than the default 5%
    assert result.exit_code == 5
    assert "failed: 1 of 2 videos (50.0%)\n  media: 1\n    empty_file: 1\n  transient: 0\n" in result.stdout
    assert last_line(result.stderr) == (
        f"Error: {out / 'errors.jsonl'}: 1 of 2 inputs (50.0%) failed for a media reason (empty_file: 1), "
        "more than --max-failed 0.05; see errors.jsonl"
    )
    result = CliRunner().invoke(shard, [*args, "--max-failed", "0.5"])  # allowed: nothing is redone
    assert (
        result.exit_code == 0
        and "units: 0 written now (0 of them retried), 2 already complete" in result.stdout
    )

    replaced.write_bytes((media_dir / "edge/big_buck_bunny_432_433.webm").read_bytes())
    result = CliRunner().invoke(shard, [*args, "--max-failed", "0.5"])  # media failures are not retried
    assert result.exit_code == 0 and "empty_file: 1" in result.stdout
    result = CliRunner().invoke(shard, [*args, "--retry-failed"])
    assert result.exit_code == 0, result.output
    assert "failed: 0 of 2 videos (0.0%)" in result.stdout
    assert "units: 1 written now (1 of them retried), 1 already complete" in result.stdout
    assert (out / "errors.jsonl").read_text() == ""

    fresh = tmp_path / "fresh"
    assert (
        CliRunner().invoke(shard, [str(root), "-o", str(fresh), *OPTIONS, "--shard-size", "1"]).exit_code == 0
    )
    assert output_files(out) == output_files(fresh)


def test_every_reason_has_a_kind_and_the_docs_list_it():
    assert set(REASONS) <= set(RECORDED_KINDS) and set(RECORDED_KINDS.values()) == {"media", "transient"}
    assert (kind_of("missing_file"), kind_of("processing_error"), kind_of("timeout")) == (
        "media",
        "transient",
        "transient",
    )
    docs = (ROOT / "docs/shard.md").read_text()
    for reason, kind in RECORDED_KINDS.items():
        assert f"| `{reason}` | {kind} |" in docs, reason


def test_exit_status_of_processes():
    assert stopped_failure(0, "ffmpeg") is None and stopped_failure(1, "ffmpeg") is None
    reasons = {code: stopped_failure(code, "ffmpeg").reason for code in (-25, -9, -15, 255, -11, -6)}
    assert reasons == {
        -25: DISK_FULL,  # SIGXFSZ: a file-size limit
        -9: "ffmpeg_killed",  # SIGKILL: the out-of-memory killer
        -15: "ffmpeg_killed",
        255: "ffmpeg_killed",  # ffmpeg caught SIGTERM/SIGINT and stopped
        -11: "ffmpeg_crashed",  # SIGSEGV on this input: a media reason, not retried forever
        -6: "ffmpeg_crashed",
    }


def test_records_of_older_versions_get_their_kind():
    legacy = {"index": 3, "path": "p", "name": "n", "reason": "processing_error", "detail": "KeyError: 'x'"}
    assert list(with_kind(legacy)) == ["index", "path", "name", "kind", "reason", "detail"]
    assert with_kind(legacy)["kind"] == "transient"
    assert needs_retry({"failures": [legacy]}, retry_media=False)
    media = {**legacy, "reason": "too_short"}
    assert not needs_retry({"failures": [media]}, retry_media=False)
    assert needs_retry({"failures": [media]}, retry_media=True)


def test_summary_prints_each_kind_and_the_verdict_follows_max_failed(tmp_path: Path):
    summary = Summary(ok=97, failed={"corrupt_stream": 2, "too_short": 1}, videos=100, missing=4)
    summary.missing_first = ["m.csv:3: a.mp4", "m.csv:9: b.mp4", "m.csv:12: c.mp4"]
    text = format_summary(summary, tmp_path)
    assert "failed: 3 of 100 videos (3.0%)\n  media: 3\n    corrupt_stream: 2\n    too_short: 1\n" in text
    assert "  transient: 0\nannotated but not found: 4 (missing_file in errors.jsonl), e.g.\n" in text
    assert "\n  m.csv:3: a.mp4\n  m.csv:9: b.mp4\n  m.csv:12: c.mp4\n" in text  # named by their rows
    assert failure_verdict(summary) is None  # 3% <= 5%; missing files are not counted
    assert "3 of 100 inputs (3.0%) failed for a media reason" in failure_verdict(summary, 0.02)
    summary.failed["timeout"] = 1
    assert "  transient: 1 (the next run retries them)\n    timeout: 1\n" in format_summary(summary, tmp_path)
    assert failure_verdict(summary, 1.0).startswith(
        "1 of 100 inputs failed for a transient reason (timeout: 1)"
    )
    option = next(p for p in shard.params if p.name == "max_failed")
    assert option.default == DEFAULT_MAX_FAILED
