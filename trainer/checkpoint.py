"""Checkpoints a run resumes from: atomic writes, weights_only loading, RNG and numpy packing, lookup.

A checkpoint file holds `{"format": FORMAT, "digest": <recipe digest>, "state": <state>}` where the
state contains only tensors, None, bools, ints, floats, strings, and dicts/lists/tuples of them, so
`torch.load(weights_only=True)` reads it without running pickled code. Numpy arrays (pseudo-labels)
and RNG states go through `pack_array` / `rng_state` first.

Layout under a run folder: `checkpoints/it{iteration:03d}-ep{epoch:03d}.pt`, where `epoch` counts the
epochs finished in that iteration (0: labels made, training not started). The newest is the one with
the largest (iteration, epoch); files being written are hidden (`.name.tmp-*`) until renamed.
"""

from __future__ import annotations

import io
import os
import random
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from xdctools.atomic import write_atomic
from xdctools.errors import DataError, DivergedError

FORMAT = 1
CHECKPOINT_DIR = "checkpoints"
_NAME = re.compile(r"^it(\d{3,})-ep(\d{3,})\.pt$")
_PRIMITIVES = (type(None), bool, int, float, str)


# --- checkpoints -----------------------------------------------------------------------------


def check_safe(obj: Any, where: str = "state") -> None:
    """TypeError naming the first value `torch.load(weights_only=True)` would refuse."""
    if isinstance(obj, torch.Tensor) or (isinstance(obj, _PRIMITIVES) and not isinstance(obj, np.generic)):
        return
    if isinstance(obj, dict):
        for key, value in obj.items():
            if not isinstance(key, (str, int)):
                raise TypeError(f"{where}: key {key!r} must be a str or int")
            check_safe(value, f"{where}.{key}")
        return
    if isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            check_safe(value, f"{where}[{i}]")
        return
    hint = " (use pack_array)" if isinstance(obj, np.ndarray | np.generic) else ""
    raise TypeError(f"{where}: {type(obj).__name__} cannot be loaded with weights_only{hint}")


def save_checkpoint(path: str | os.PathLike, state: Mapping[str, Any], *, digest: str = "") -> Path:
    """Write `state` atomically (temp + fsync + rename), tagged with the recipe digest."""
    state = dict(state)
    check_safe(state)
    payload = {"format": FORMAT, "digest": digest, "state": state}
    # Serialised in memory first: torch's zip writer turns a refused write (disk full) into a bare
    # RuntimeError; writing the bytes keeps the OSError, so the run fails with one line naming the file.
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    return write_atomic(path, lambda f: f.write(buffer.getbuffer()))


def load_checkpoint(path: str | os.PathLike, *, digest: str | None = None) -> dict[str, Any]:
    """The state saved by `save_checkpoint`, on the CPU; DataError if unreadable or from another recipe.

    `digest`: the current recipe's digest; a checkpoint written under another one is refused.
    """
    path = Path(path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise DataError(f"{path}: checkpoint not found") from None
    except Exception as e:  # zip, pickle and EOF errors all mean the same here
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise DataError(f"{path}: corrupt or not a checkpoint ({first})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT or "state" not in payload:
        raise DataError(f"{path}: not an xdctools checkpoint (format {FORMAT})")
    if digest is not None and payload.get("digest") != digest:
        raise DataError(
            f"{path}: written by another recipe (digest {payload.get('digest')!r}, this recipe {digest!r}); "
            "use the recipe it was made with, or another run.out"
        )
    return payload["state"]


def checkpoint_path(run_dir: str | os.PathLike, iteration: int, epoch: int) -> Path:
    """Where the checkpoint after `epoch` finished epochs of 0-based `iteration` goes."""
    return Path(run_dir) / CHECKPOINT_DIR / f"it{iteration:03d}-ep{epoch:03d}.pt"


def list_checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, int, Path]]:
    """(iteration, epoch, path) of every complete checkpoint, oldest first; temp files are skipped."""
    folder = Path(run_dir) / CHECKPOINT_DIR
    if not folder.is_dir():
        return []
    found = []
    for entry in folder.iterdir():
        match = _NAME.match(entry.name)
        if match and entry.is_file():
            found.append((int(match.group(1)), int(match.group(2)), entry))
    return sorted(found)


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint of a run (largest iteration, then epoch), or None."""
    found = list_checkpoints(run_dir)
    return found[-1][2] if found else None


def diverged_error(run_dir: str | os.PathLike, where: str, advice: str) -> DivergedError:
    """The one-line error of a run whose loss went non-finite `where`, naming its newest checkpoint:
    callers check before a checkpoint of the diverged weights is written, so that one is good."""
    kept = latest_checkpoint(run_dir)
    last = f"the last good checkpoint, kept, is {kept}" if kept else "no checkpoint was written yet"
    return DivergedError(
        f"{run_dir}: the training loss is not finite (NaN or inf) {where}; the run stopped and {last}. "
        + advice
    )


def prune_checkpoints(run_dir: str | os.PathLike, *, keep_last: int = 2) -> list[Path]:
    """Delete old checkpoints: keep the newest `keep_last` and the last one of every iteration.

    Also removes temp files left by a crash. Returns what was deleted.
    """
    found = list_checkpoints(run_dir)
    last_of_iteration = {it: path for it, _, path in found}  # sorted, so the last wins
    keep = {path for _, _, path in found[-keep_last:]} if keep_last > 0 else set()
    keep |= set(last_of_iteration.values())
    removed = [path for _, _, path in found if path not in keep]
    folder = Path(run_dir) / CHECKPOINT_DIR
    if folder.is_dir():
        removed += [p for p in folder.iterdir() if p.name.startswith(".") and ".pt.tmp-" in p.name]
    for path in removed:
        path.unlink(missing_ok=True)
    return removed


# --- packing what weights_only refuses ---------------------------------------------------------


def pack_array(array: np.ndarray) -> torch.Tensor:
    """A numpy array as a tensor of the same dtype and shape (a copy), e.g. int32 pseudo-labels."""
    array = np.asarray(array)
    if array.dtype.kind not in "biuf" or array.dtype.byteorder == ">":
        raise TypeError(f"pack_array: dtype {array.dtype} has no torch equivalent")
    return torch.from_numpy(np.array(array, copy=True, order="C"))


def unpack_array(tensor: torch.Tensor) -> np.ndarray:
    """Inverse of `pack_array`: the numpy array, same dtype and shape."""
    return tensor.detach().cpu().numpy().copy()


def seed_all(seed: int) -> None:
    """Seed torch's, numpy's and Python's global generators: torch's alone decides the weights, but a
    checkpoint saves all three (`rng_state`), so a rerun writes the same bytes only when all are seeded."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """The global RNG states of torch (CPU and every CUDA device), numpy and `random`, weights_only-safe."""
    version, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "name": str(name),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "python": {"version": int(version), "mt": torch.tensor(mt, dtype=torch.int64), "gauss": gauss},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what `rng_state` returned (CUDA states only when the device count matches)."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state((n["name"], keys, n["pos"], n["has_gauss"], n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(x) for x in p["mt"].tolist()), p["gauss"]))
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available() and torch.cuda.device_count() == len(cuda):
        torch.cuda.set_rng_state_all(cuda)


def generator_state(generator: np.random.Generator | torch.Generator) -> dict[str, Any]:
    """A numpy Generator's bit-generator state or a torch Generator's state, weights_only-safe."""
    if isinstance(generator, torch.Generator):
        return {"kind": "torch", "state": generator.get_state()}
    return {"kind": "numpy", "state": _plain(generator.bit_generator.state)}


def set_generator_state(generator: np.random.Generator | torch.Generator, state: Mapping[str, Any]) -> None:
    if isinstance(generator, torch.Generator):
        generator.set_state(state["state"])
    else:
        generator.bit_generator.state = _numpy_back(state["state"])


def _plain(obj: Any) -> Any:
    """Numpy scalars and arrays inside a bit-generator state -> ints and tensors."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, np.ndarray):
        return {"__array__": pack_array(obj)}
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def _numpy_back(obj: Any) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {"__array__"}:
            return unpack_array(obj["__array__"])
        return {k: _numpy_back(v) for k, v in obj.items()}
    return obj
