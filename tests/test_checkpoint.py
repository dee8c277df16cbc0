"""Checkpoints: weights_only round trip with RNG states and int32 labels, atomic writes, lookup, refusals."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import trainer.checkpoint as ckpt
from trainer.checkpoint import (
    check_safe,
    checkpoint_path,
    generator_state,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    pack_array,
    prune_checkpoints,
    rng_state,
    save_checkpoint,
    set_generator_state,
    set_rng_state,
    unpack_array,
)
from trainer.optim import LrSchedule, LrScheduler, build_optimizer
from xdctools.errors import DataError
from xdctools.recipe import Optim


def draws(gen: np.random.Generator) -> tuple:
    return (
        torch.rand(3).tolist(),
        np.random.rand(3).tolist(),
        [random.random() for _ in range(3)],
        gen.random(3),
    )


def trained_state() -> tuple[dict, nn.Module]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(2, 4, 3), nn.BatchNorm1d(4), nn.Flatten(), nn.Linear(8, 3))
    cfg = Optim(epoch_size=64, batch_size=8, lr=0.1, warmup_epochs=1, step_epochs=1, total_epochs=2)
    opt = build_optimizer(model.parameters(), cfg)
    sched = LrScheduler(opt, LrSchedule.from_config(cfg), 8)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(5, 2, 4)).square().mean().backward()
        opt.step()
        sched.step()
    state = {
        "iteration": 1,
        "epoch": 2,
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "labels": {"video": pack_array(np.arange(10, dtype=np.int32) % 3)},
        "history": [0.5, 0.25, None, ("a", 1)],
    }
    return state, model


def test_round_trip_is_weights_only_with_rng_and_int32_labels(tmp_path: Path) -> None:
    state, model = trained_state()
    gen = np.random.default_rng(7)
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    gen.random(5)
    state["rng"] = rng_state()
    state["sampler_rng"] = generator_state(gen)
    expected = draws(gen)

    path = save_checkpoint(checkpoint_path(tmp_path, 1, 2), state, digest="abc")
    assert path == tmp_path / "checkpoints" / "it001-ep002.pt"
    raw = torch.load(path, weights_only=True)  # what load_checkpoint relies on
    assert raw["format"] == ckpt.FORMAT and raw["digest"] == "abc"

    torch.manual_seed(99), np.random.seed(99), random.seed(99)
    loaded = load_checkpoint(path, digest="abc")
    other = np.random.default_rng(0)
    set_rng_state(loaded["rng"])
    set_generator_state(other, loaded["sampler_rng"])
    got = draws(other)
    assert got[:3] == expected[:3]
    np.testing.assert_array_equal(got[3], expected[3])

    labels = unpack_array(loaded["labels"]["video"])
    assert labels.dtype == np.int32 and labels.tolist() == (np.arange(10) % 3).tolist()
    assert loaded["history"] == [0.5, 0.25, None, ("a", 1)]
    assert loaded["scheduler"] == state["scheduler"]
    fresh = nn.Sequential(nn.Conv1d(2, 4, 3), nn.BatchNorm1d(4), nn.Flatten(), nn.Linear(8, 3))
    fresh.load_state_dict(loaded["model"])
    for key, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    assert loaded["optimizer"]["state"][0]["momentum_buffer"].equal(
        state["optimizer"]["state"][0]["momentum_buffer"]
    )


def test_torch_generator_state_round_trips(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(5)
    torch.rand(4, generator=gen)
    save_checkpoint(tmp_path / "g.pt", {"g": generator_state(gen)})
    expected = torch.rand(4, generator=gen)
    other = torch.Generator().manual_seed(0)
    set_generator_state(other, load_checkpoint(tmp_path / "g.pt")["g"])
    assert torch.equal(torch.rand(4, generator=other), expected)


def test_pack_array_keeps_dtype_and_refuses_objects() -> None:
    for dtype in (np.int32, np.int64, np.float16, np.float32, np.uint8, np.bool_):
        arr = (np.arange(6).reshape(2, 3) % 2).astype(dtype)
        back = unpack_array(pack_array(arr))
        assert back.dtype == arr.dtype and np.array_equal(back, arr)
    with pytest.raises(TypeError, match="no torch equivalent"):
        pack_array(np.array(["a", "b"]))


def test_unsafe_values_are_refused_before_writing(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match=r"state\.labels: ndarray .*\(use pack_array\)"):
        save_checkpoint(tmp_path / "x.pt", {"labels": np.zeros(3, dtype=np.int32)})
    with pytest.raises(TypeError, match=r"state\.stats\.loss: float64"):
        check_safe({"stats": {"loss": np.float64(0.5)}})
    with pytest.raises(TypeError, match=r"state\.items\[1\]: PosixPath"):
        check_safe({"items": [1, Path("x")]})
    assert not (tmp_path / "x.pt").exists() and not list(tmp_path.iterdir())


def test_interrupted_save_leaves_the_old_file_and_no_temp(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "checkpoints" / "it000-ep001.pt"
    save_checkpoint(path, {"epoch": 1})
    real_save = torch.save

    def save_then_die(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a zip")  # part of the file is on disk when the process is interrupted
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt.torch, "save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, {"epoch": 2})
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path / "checkpoints" / "it000-ep002.pt", {"epoch": 2})
    monkeypatch.setattr(ckpt.torch, "save", real_save)

    assert sorted(p.name for p in path.parent.iterdir()) == ["it000-ep001.pt"]
    assert load_checkpoint(path) == {"epoch": 1}
    assert latest_checkpoint(tmp_path) == path


def test_corrupt_foreign_and_missing_checkpoints_are_data_errors(tmp_path: Path) -> None:
    good = save_checkpoint(tmp_path / "good.pt", {"w": torch.ones(1000)}, digest="d1")
    data = good.read_bytes()
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint at all")
    torch.save({"weight": torch.ones(2)}, tmp_path / "plain.pt")  # a bare state dict, not ours
    for name in ("truncated.pt", "garbage.pt"):
        with pytest.raises(DataError, match=rf"{name}: corrupt or not a checkpoint"):
            load_checkpoint(tmp_path / name)
    with pytest.raises(DataError, match=r"plain\.pt: not an xdctools checkpoint"):
        load_checkpoint(tmp_path / "plain.pt")
    with pytest.raises(
        DataError, match=r"good.pt: written by another recipe \(digest 'd1', this recipe 'd2'\)"
    ):
        load_checkpoint(good, digest="d2")
    with pytest.raises(DataError, match=r"absent\.pt: checkpoint not found"):
        load_checkpoint(tmp_path / "absent.pt")
    assert torch.equal(load_checkpoint(good, digest="d1")["w"], torch.ones(1000))


def test_latest_checkpoint_orders_numerically_and_skips_temp_files(tmp_path: Path) -> None:
    assert latest_checkpoint(tmp_path) is None
    for it, ep in [(0, 0), (0, 999), (0, 1000), (1, 0), (1, 2)]:
        save_checkpoint(checkpoint_path(tmp_path, it, ep), {"it": it, "ep": ep})
    folder = tmp_path / "checkpoints"
    (folder / ".it002-ep000.pt.tmp-123-abcd").write_bytes(b"partial")
    (folder / "it009-ep000.pt.bak").write_bytes(b"")
    (folder / "notes.txt").write_text("x")
    assert [(i, e) for i, e, _ in list_checkpoints(tmp_path)] == [(0, 0), (0, 999), (0, 1000), (1, 0), (1, 2)]
    assert latest_checkpoint(tmp_path) == folder / "it001-ep002.pt"
    assert load_checkpoint(latest_checkpoint(tmp_path)) == {"it": 1, "ep": 2}

    removed = prune_checkpoints(tmp_path, keep_last=1)
    assert sorted(p.name for p in removed) == [
        ".it002-ep000.pt.tmp-123-abcd",
        "it000-ep000.pt",
        "it000-ep999.pt",
        "it001-ep000.pt",
    ]
    assert [p.name for _, _, p in list_checkpoints(tmp_path)] == ["it000-ep1000.pt", "it001-ep002.pt"]
