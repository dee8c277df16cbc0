"""Run logger: JSONL + TensorBoard + PNG plots + report.md, and resume that matches an uninterrupted run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from trainer.log import (
    METRICS_FILE,
    TENSORBOARD_DIR,
    RunLogger,
    plot_metrics,
    read_metrics,
    write_report,
)
from xdctools.errors import DataError
from xdctools.recipe import parse_recipe

RECIPE = """
name: tiny
method: xdc
data: {shards: demo/shards, crop: 112, short_side: 128}
clustering: {k: 4, iterations: 2}
optim: {epoch_size: 32, batch_size: 8, lr: 0.05, step_epochs: 2, total_epochs: 2}
run: {probe: true}
"""
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run_events(logger: RunLogger, start: int = 0, stop: int | None = None) -> None:
    """A two-iteration XDC run's records, in order; only those with index in [start, stop) are logged."""
    records = []
    step = 0
    for it in range(2):
        for view, sizes in (("video", [5, 3, 0, 2]), ("audio", [4, 4, 1, 1])):
            nmi = 0.2 + 0.1 * it
            cluster = dict(iteration=it, view=view, k=4, sizes=np.array(sizes), empty=0, nmi=nmi, purity=0.5)
            records.append(("cluster", step, cluster))
        for ep in (1, 2):
            for _ in range(4):
                step += 1
                records.append(
                    ("step", step, dict(iteration=it, epoch=ep - 0.75, loss=torch.tensor(1.5), lr=0.01))
                )
            losses = dict(train_loss_video=1.4 - 0.1 * ep - 0.3 * it, val_loss_video=1.5 - 0.05 * ep)
            records.append(
                ("epoch", step, dict(iteration=it, epoch=ep, **losses, val_acc_audio=np.float32(0.25 * ep)))
            )
        records.append(("iteration", step, dict(iteration=it, epochs=2, stopped_early=it == 1, seconds=12.5)))
        for modality, acc in (("video", 0.3 + 0.2 * it), ("audio", 0.4)):
            records.append(("probe", step, dict(iteration=it, modality=modality, accuracy=acc, split="val")))
    for event, s, fields in records[start:stop]:
        logger.log(event, s, **fields)


def strip_time(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "time"} for r in records]


def scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(str(run_dir / TENSORBOARD_DIR), size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    return {tag: [(e.step, round(e.value, 6)) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_logger_writes_jsonl_tensorboard_plots_and_report(tmp_path: Path) -> None:
    with RunLogger(tmp_path) as logger:
        run_events(logger)
        plots = logger.plot()
        assert logger.state_dict() == {"lines": 30}

    records = read_metrics(tmp_path)
    assert len(records) == 30 and records[0]["event"] == "cluster"
    assert records[0]["sizes"] == [5, 3, 0, 2]  # numpy -> plain JSON
    epoch = next(r for r in records if r["event"] == "epoch")
    assert epoch["val_acc_audio"] == 0.25 and isinstance(epoch["time"], float)
    assert next(r for r in records if r["event"] == "step")["loss"] == 1.5

    tags = scalars(tmp_path)
    assert tags["epoch/train_loss_video"] == [(4, 1.3), (8, 1.2), (12, 1.0), (16, 0.9)]
    assert tags["cluster/video/nmi"] == [(0, 0.2), (8, 0.3)]
    assert tags["probe/audio/accuracy"] == [(8, 0.4), (16, 0.4)]
    assert "epoch/iteration" not in tags and "iteration/stopped_early" not in tags

    assert sorted(p.name for p in plots) == ["cluster_sizes.png", "losses.png", "nmi.png", "probe.png"]
    for path in plots:
        data = path.read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000

    recipe = parse_recipe(RECIPE, source="tiny.yaml")
    summary = {
        "status": "Finished: 2 iterations.",
        "seconds": 3725,
        "data": {"videos": 48, "segments": 96},
        "hardware": {"cpus": 2, "torch": torch.__version__},
        "final": {"video": {"probe": 0.5, "nmi": 0.3}, "audio": {"probe": 0.4, "nmi": 0.3}},
        "checkpoint": "checkpoints/it001-ep002.pt",
    }
    report = write_report(tmp_path, recipe, summary).read_text()
    assert report.startswith("# Run report: tiny\n\nFinished: 2 iterations.")
    assert "method: **xdc**" in report and "k 4," in report and "es 32, bs 8, lr 0.05" in report
    assert "videos 48, segments 96" in report and "wall time: 1h 02m 05s" in report
    assert "| iteration | epochs | early stop | train_loss_video | val_acc_audio | val_loss_video |" in report
    assert "| 1 | 2 | yes | 0.9 | 0.5 | 1.4 |" in report
    assert (
        "| 0 | video | 4 | 0 | 0 | 2 | 5 | 0.2 | 0.5 |" in report
    )  # k, empty, min, median, max, NMI, purity
    assert "| iteration | video | audio |\n|---|---|---|\n| 0 | 0.3 | 0.4 |\n| 1 | 0.5 | 0.4 |" in report
    assert "|  | probe | nmi |\n|---|---|---|\n| video | 0.5 | 0.3 |" in report
    assert "![losses](losses.png)" in report and "- checkpoint: checkpoints/it001-ep002.pt" in report


def test_resume_truncates_to_the_checkpoint_and_matches_an_uninterrupted_run(tmp_path: Path) -> None:
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    with RunLogger(straight) as logger:
        run_events(logger)

    with RunLogger(broken) as logger:
        run_events(logger, 0, 13)
        saved = logger.state_dict()  # what the checkpoint after record 13 holds
        run_events(logger, 13, 20)  # logged after the checkpoint, then the process dies ...
    with open(broken / METRICS_FILE, "a") as f:
        f.write('{"event": "step", "ste')  # ... in the middle of a line

    with RunLogger(broken, resume=saved) as logger:
        assert len(read_metrics(broken)) == 13
        run_events(logger, 13)
        plot_metrics(broken)
        assert logger.state_dict() == {"lines": 30}

    assert strip_time(read_metrics(broken)) == strip_time(read_metrics(straight))
    assert scalars(broken) == scalars(straight)  # events rebuilt from the kept records: no duplicates
    assert len(list((broken / TENSORBOARD_DIR).iterdir())) == 1


def test_fresh_start_drops_an_earlier_attempt_and_bad_resume_is_refused(tmp_path: Path) -> None:
    with RunLogger(tmp_path) as logger:
        run_events(logger, 0, 5)
    with RunLogger(tmp_path) as logger:  # no checkpoint was reached: start over
        assert read_metrics(tmp_path) == []
        run_events(logger, 0, 2)
    with pytest.raises(DataError, match=r"has 2 complete records, the checkpoint follows 9"):
        RunLogger(tmp_path, resume={"lines": 9})
    (tmp_path / METRICS_FILE).write_text('{"event": "step"}\nnot json\n')
    with pytest.raises(DataError, match=r"metrics\.jsonl: line 2: not JSON"):
        RunLogger(tmp_path, resume={"lines": 2})


def test_disabled_logger_writes_nothing(tmp_path: Path) -> None:
    run_dir = tmp_path / "rank1"
    with RunLogger(run_dir, enabled=False) as logger:
        record = logger.log("step", 3, loss=np.float32(2.0), bad=float("nan"))
        assert record["loss"] == 2.0 and record["bad"] is None
        assert logger.plot() == []
    assert not run_dir.exists()


def test_nonfinite_values_stay_valid_json_and_plots_skip_missing_data(tmp_path: Path) -> None:
    with RunLogger(tmp_path, tensorboard=False) as logger:
        logger.log("epoch", 4, iteration=0, epoch=1, train_loss=float("inf"), val_loss=2.0)
    line = (tmp_path / METRICS_FILE).read_text()
    assert json.loads(line)["train_loss"] is None and "Infinity" not in line
    assert [p.name for p in plot_metrics(tmp_path)] == ["losses.png"]  # no clusters or probes yet
    assert not (tmp_path / TENSORBOARD_DIR).exists()
