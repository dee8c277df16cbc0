"""Processes of a run: torchrun's environment -> process group (gloo on CPU, nccl on GPU), few collectives.

Without torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK) everything runs as one process and every
collective is the identity, so library code calls them unconditionally. Arrays travel as numpy on the
way in and out; with nccl they go through the rank's GPU, with gloo through the CPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from xdctools.errors import ConfigError

# Rank 0 clusters while the others wait in a broadcast: allow for a long k-means at scale.
TIMEOUT = timedelta(hours=2)


@dataclass(frozen=True)
class Dist:
    """Where this process sits: rank among world_size, local_rank on its node, and its torch device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    group: bool = False  # a process group was started (torchrun launched this process, even alone)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """Train through DDP: several processes, or one that torchrun launched (the N-GPU path on one)."""
        return self.world_size > 1 or self.group


def env_ranks() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's variables; (0, 1, 0) without them."""
    try:
        rank = int(os.environ.get("RANK", "0"))
        world = int(os.environ.get("WORLD_SIZE", "1"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError as e:
        raise ConfigError(
            f"torchrun environment: RANK/WORLD_SIZE/LOCAL_RANK must be integers ({e})"
        ) from None
    if world < 1 or not 0 <= rank < world:
        raise ConfigError(f"torchrun environment: RANK {rank} is not in [0, WORLD_SIZE {world})")
    return rank, world, local


def init(device: str = "cpu") -> Dist:
    """Join the process group torchrun describes (idempotent); device "gpu"/"cuda" picks cuda:LOCAL_RANK.

    gloo on CPU, nccl on GPU. A process torchrun launched starts the group even alone
    (`--nproc_per_node=1`), so one GPU runs the same nccl/DDP path as N; a plain process starts none.
    """
    rank, world, local = env_ranks()
    gpu = device in ("gpu", "cuda")
    if gpu and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r}: no CUDA device is available here (use 'cpu')")
    if gpu:
        if local >= torch.cuda.device_count():
            raise ConfigError(f"LOCAL_RANK {local}: only {torch.cuda.device_count()} GPU(s) on this node")
        torch.cuda.set_device(local)
    where = torch.device("cuda", local) if gpu else torch.device("cpu")
    if (world > 1 or launched_by_torchrun()) and not dist.is_initialized():
        backend = "nccl" if gpu else "gloo"
        kwargs = {"device_id": where} if gpu else {}
        dist.init_process_group(backend=backend, timeout=TIMEOUT, **kwargs)
    return Dist(rank=rank, world_size=world, local_rank=local, device=where, group=dist.is_initialized())


def launched_by_torchrun() -> bool:
    """torchrun's rendezvous variables are set (a bare WORLD_SIZE=1 without a master is not a launch)."""
    return all(name in os.environ for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    """Processes in the group; 1 without one."""
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """True on rank 0, and in a single process."""
    return not active() or dist.get_rank() == 0


def barrier() -> None:
    if active():
        dist.barrier()


def cleanup() -> None:
    """Leave the process group (after a last barrier, so no rank exits while another still talks)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _comm_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def broadcast_object(obj: object, src: int = 0) -> object:
    """A small picklable object from `src` to every rank (shapes, dtypes, messages)."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, device=_comm_device())
    return box[0]


def broadcast_array(array: np.ndarray | None, src: int = 0) -> np.ndarray:
    """`src`'s array on every rank (others pass None or anything). Goes as one tensor, not a pickle."""
    if not active():
        if array is None:
            raise ValueError("broadcast_array: the source rank passed None")
        return np.asarray(array)
    header = None
    if dist.get_rank() == src:
        array = np.ascontiguousarray(array)
        header = (array.shape, array.dtype.str)
    shape, dtype = broadcast_object(header, src)
    device = _comm_device()
    if dist.get_rank() == src:
        tensor = torch.from_numpy(array.view(np.uint8).reshape(-1).copy()).to(device)
    else:
        tensor = torch.empty(int(np.prod(shape)) * np.dtype(dtype).itemsize, dtype=torch.uint8, device=device)
    dist.broadcast(tensor, src=src)
    return tensor.cpu().numpy().view(np.dtype(dtype)).reshape(shape)


def all_gather_rows(array: np.ndarray) -> np.ndarray:
    """Every rank's rows concatenated in rank order, on every rank; row counts may differ per rank.

    All ranks must pass the same trailing shape and dtype. Rows are padded to the largest count for
    the collective and trimmed after.
    """
    array = np.ascontiguousarray(array)
    if not active():
        return array
    world = dist.get_world_size()
    meta = [None] * world
    dist.all_gather_object(meta, (array.shape, array.dtype.str))
    tails = {(tuple(s[1:]), d) for s, d in meta}
    if len(tails) != 1:
        raise ValueError(f"all_gather_rows: ranks disagree on row shape/dtype: {sorted(tails)}")
    row_bytes = int(np.prod(array.shape[1:], dtype=np.int64)) * array.dtype.itemsize
    counts = [s[0] for s, _ in meta]
    most = max(counts) * row_bytes
    device = _comm_device()
    mine = torch.zeros(most, dtype=torch.uint8, device=device)
    if array.size:
        mine[: array.nbytes] = torch.from_numpy(array.view(np.uint8).reshape(-1).copy()).to(device)
    parts = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(parts, mine)
    rows = [
        part[: n * row_bytes].cpu().numpy().view(array.dtype).reshape(n, *array.shape[1:])
        for part, n in zip(parts, counts, strict=True)
    ]
    return np.concatenate(rows)


def all_reduce_sum(values: np.ndarray) -> np.ndarray:
    """Elementwise float64 sum over ranks (loss sums and counts of an epoch)."""
    values = np.asarray(values, dtype=np.float64)
    if not active():
        return values
    tensor = torch.from_numpy(values.copy()).to(_comm_device())
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.cpu().numpy()


def global_sum_(tensor: torch.Tensor) -> torch.Tensor:
    """Sum a device tensor over ranks in place (no host round trip); the identity in one process."""
    if active():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def global_min_(tensor: torch.Tensor) -> torch.Tensor:
    """Elementwise minimum over ranks, in place; the identity in one process."""
    if active():
        dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
    return tensor


def broadcast_buffers_(module: torch.nn.Module, src: int = 0) -> None:
    """Every rank takes `src`'s buffers (BatchNorm running statistics), in place.

    DDP sends rank 0's buffers before each forward, but after the last step of an epoch every rank
    holds statistics updated by its own last batch; features extracted or tested after it would then
    depend on which rank computed them.
    """
    if not active():
        return
    for buffer in module.buffers():
        dist.broadcast(buffer.data, src=src)
