"""Audio-visual alignment of clips loaded on the GPU: a white flash and a click at the same moment.

The check of tests/test_data.py (test_training_clips_hear_what_they_show, test_eval_clips_hear_what_they_show)
with DALI's `mixed` decoding, for VP9 and H.264 shards: every clip's frames are white exactly where the
flash is, and its mel window has the click where the frame <-> time mapping puts it.
"""

from __future__ import annotations

from pathlib import Path

import gpu_helpers as H
import pytest
import torch

FLASH_TIME = 2.5  # seconds, in a 5 s video at 25 fps: frames 62, 63, 64 are white
FLASH_FPS = 25
FLASH_FIRST, FLASH_FRAMES = round(FLASH_TIME * FLASH_FPS), 3


@pytest.fixture(scope="module", params=["vp9", "h264"])
def flash(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    H.require("dali", "shard-tools")
    from xdctools.shard.params import ShardParams
    from xdctools.shard.plan import build_plan
    from xdctools.shard.run import run_shard
    from xdctools.synth import write_flash_click

    root = tmp_path_factory.mktemp(f"flash-{request.param}")
    write_flash_click(root / "videos" / "flash" / "flash.mp4", FLASH_TIME, seconds=5.0, fps=FLASH_FPS)
    params = ShardParams(short_side=128, codec=request.param)
    run_shard(build_plan(root / "videos"), params, root / "shards", shard_size=2, workers=2)
    return root / "shards"


def _rows(loader) -> dict[str, torch.Tensor]:
    batches = list(loader)
    assert batches[0]["video"].is_cuda and batches[0]["audio"].is_cuda
    return {name: torch.cat([b[name] for b in batches]) for name in batches[0]}


def _check(rows: dict[str, torch.Tensor], stride: int) -> int:
    return H.flash_and_click(
        rows,
        stride=stride,
        flash_first=FLASH_FIRST,
        flash_frames=FLASH_FRAMES,
        flash_time=FLASH_TIME,
        fps=FLASH_FPS,
    )


def test_training_clips_hear_what_they_show_on_gpu(flash: Path) -> None:
    from trainer.data import ClipSpec, Runtime, find_shards, train_loader

    shards = find_shards(flash, "train")
    run = Runtime(device="gpu", seed=1)
    rows = _rows(train_loader(shards, batch_size=16, epoch_size=320, clip=ClipSpec(crop=96), run=run))
    assert len(rows["frame"]) == 320
    seen = _check(rows, stride=1)
    H.record(f"alignment train {shards.video_ext}", clips=320, clips_with_flash=seen)
    assert seen >= 3


def test_eval_clips_hear_what_they_show_on_gpu(flash: Path) -> None:
    from trainer.data import ClipSpec, Runtime, eval_loader, find_shards

    shards = find_shards(flash, "train")
    clip = ClipSpec(crop=96, stride=2)
    rows = _rows(eval_loader(shards, batch_size=2, num_clips=40, clip=clip, run=Runtime(device="gpu")))
    assert rows["clip"].tolist() == list(range(40))
    seen = _check(rows, stride=2)
    H.record(f"alignment eval {shards.video_ext}", clips=40, clips_with_flash=seen)
    assert seen >= 3
