"""Features of every video: both encoders over each segment once, pooled per video, written to a Zarr store.

Rows of the store are the shard set's videos in ascending video index (`Catalog.videos`); a row is the
mean of its segments' features (the centre clip of each segment, no augmentation, encoders in eval
mode). Labels made from the store are therefore aligned with `Catalog.videos`.

With several ranks, each rank reads its contiguous range of segments (DALI's sharding) and pools them
as they stream by. Writing is split by Zarr chunk, so no two processes ever write one chunk:
- a rank writes itself every chunk made only of videos whose segments it read all of ("direct" chunks,
  nearly all of them at scale: memory is one chunk);
- the rest (chunks holding a video split between ranks, or rows of several ranks) goes to every rank
  as float64 sums and counts through one all-gather, and rank 0 merges and writes it. That is at
  most a few chunks per rank, whatever the data size.
Gathering everything to rank 0 would be simpler but holds N x d on one process (65M videos x 1024
floats is 266 GB); this keeps per-rank memory bounded and the 1-process and N-process stores equal.

Resume: a store whose attributes match (weights digest, iteration, extraction parameters) is reused:
complete, it is returned as is; partial, chunks already written are skipped (and batches made only
of them are not run through the encoders).
"""

from __future__ import annotations

import hashlib
import os
from array import array
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from trainer import distributed, sampling
from trainer.data import ClipSpec, Runtime, ShardSet, extract_loader
from trainer.models import autocast
from xdctools.errors import ConfigError, DataError, InputError
from xdctools.features.store import FeatureStore, create_store, open_store
from xdctools.shard import format as fmt
from xdctools.shard.read import locations, read_samples

Progress = Callable[..., None]  # progress(stage, done, total, **info)


# --- what the shards hold, without decoding -----------------------------------------------------


@dataclass(frozen=True)
class Catalog:
    """Every sample's video index and label, in DALI's reading order, read from the `info.npy` members.

    videos: (N,) int64 ascending, the store's rows; labels: (N,) int64 class per video, -1 unknown.
    A multi-label set (AudioSet: `labels.npy` members) has no single class (labels all -1) and carries
    each row's class list instead, as CSR arrays aligned with `videos`: the classes of row r are
    `label_values[label_offsets[r]:label_offsets[r + 1]]`, sorted. That is memory in the number of
    labels (2M AudioSet videos x ~2.7 labels: ~60 MB), where an N x C table would be 4 GB of float32.
    """

    sample_video: np.ndarray  # (S,) int64
    sample_label: np.ndarray  # (S,) int64
    videos: np.ndarray  # (N,) int64
    labels: np.ndarray  # (N,) int64
    source: str = "shards"
    label_offsets: np.ndarray | None = None  # (N + 1,) int64; None unless multi-label
    label_values: np.ndarray | None = None  # (label_offsets[-1],) int64 class indices

    @property
    def num_videos(self) -> int:
        return len(self.videos)

    @property
    def has_labels(self) -> bool:
        """Some video has a single class (`labels`); false for a multi-label set, see `multi_label`."""
        return bool((self.labels >= 0).any())

    @property
    def multi_label(self) -> bool:
        """The set carries class lists (`label_offsets`, `label_values`) rather than one class per video."""
        return self.label_offsets is not None

    def rows_of(self, video: np.ndarray) -> np.ndarray:
        """Store rows of video indices; DataError for an index that is not in the set."""
        video = np.asarray(video, dtype=np.int64)
        rows = np.searchsorted(self.videos, video)
        rows = np.minimum(rows, len(self.videos) - 1)
        if not np.array_equal(self.videos[rows], video):
            bad = video[self.videos[rows] != video][:5].tolist()
            raise DataError(f"{self.source}: video indices {bad} are not in the catalog of this shard set")
        return rows

    def label_set(self, row: int) -> np.ndarray:
        """Class indices of one store row: its list in a multi-label set, else [label], or [] if unknown."""
        if self.label_offsets is not None and self.label_values is not None:
            return self.label_values[self.label_offsets[row] : self.label_offsets[row + 1]]
        label = self.labels[row]
        return self.labels[row : row + 1] if label >= 0 else self.labels[:0]

    def multi_hot(self, rows: np.ndarray, num_classes: int) -> np.ndarray:
        """(len(rows), num_classes) float32 targets of store rows: 1 at each of a row's classes.

        A single-label set gives one-hot rows (all zero where the label is unknown), so one training
        path serves both. DataError for a row out of range or a class index >= num_classes.
        """
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        if rows.size and (rows.min() < 0 or rows.max() >= self.num_videos):
            raise DataError(f"{self.source}: rows outside 0..{self.num_videos - 1}")
        if self.label_offsets is not None and self.label_values is not None:
            starts, stops = self.label_offsets[rows], self.label_offsets[rows + 1]
            classes = self.label_values[concat_ranges(starts, stops - starts)]
            hit_rows = np.repeat(np.arange(len(rows)), stops - starts)
        else:
            labels = self.labels[rows]
            hit_rows = np.flatnonzero(labels >= 0)
            classes = labels[hit_rows]
        if classes.size and classes.max() >= num_classes:
            raise DataError(f"{self.source}: class index {int(classes.max())} >= num_classes {num_classes}")
        out = np.zeros((len(rows), num_classes), dtype=np.float32)
        out[hit_rows, classes] = 1.0
        return out


def concat_ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenated `arange(start, start + length)` for each pair, without a Python loop."""
    lengths = np.asarray(lengths, dtype=np.int64)
    ends = np.cumsum(lengths)
    total = int(ends[-1]) if len(ends) else 0
    return np.repeat(np.asarray(starts, dtype=np.int64) - (ends - lengths), lengths) + np.arange(total)


def read_catalog(shards: ShardSet) -> Catalog:
    """Read the info member of every sample (one seek per sample through the .idx offsets), and the
    `labels.npy` member that follows it in a multi-label set.

    Checks the layout extraction relies on: the segments of a video are consecutive samples.
    """
    videos, labels = [], []
    offsets, values = array("q", [0]), array("q")  # per-sample label lists, 8 bytes a label
    multi = False
    for sample in read_samples(locations(shards.tars), (fmt.INFO_EXT, fmt.LABELS_EXT)):
        video, label = sample.decode(fmt.INFO_EXT, _video_and_label)
        videos.append(video)
        labels.append(label)
        if fmt.LABELS_EXT in sample.members:
            values.frombytes(sample.decode(fmt.LABELS_EXT, fmt.decode_labels).tobytes())
            multi = True
        offsets.append(len(values))
    lists = (np.frombuffer(offsets, dtype=np.int64), np.frombuffer(values, dtype=np.int64)) if multi else None
    return catalog_from(
        np.array(videos, dtype=np.int64),
        np.array(labels, dtype=np.int64),
        str(shards.tars[0].parent),
        sample_label_lists=lists,
    )


def _video_and_label(data: bytes) -> tuple[int, int]:
    """The two fields of an info member the catalog needs, without building decode_info's dict."""
    info = fmt.decode_int64_vector(data)
    return int(info[fmt.INFO["video"]]), int(info[fmt.INFO["label"]])


def catalog_from(
    sample_video: np.ndarray,
    sample_label: np.ndarray,
    source: str = "shards",
    *,
    sample_label_lists: tuple[np.ndarray, np.ndarray] | None = None,
) -> Catalog:
    """Build and check a Catalog from per-sample video indices and labels (pure).

    `sample_label_lists` is (offsets (S + 1,), values): the class list of every sample of a multi-label
    set, CSR; every segment of a video must carry the same list.
    """
    sample_video = np.asarray(sample_video, dtype=np.int64)
    sample_label = np.asarray(sample_label, dtype=np.int64)
    if sample_video.size == 0:
        raise DataError(f"{source}: no samples")
    starts = np.r_[True, sample_video[1:] != sample_video[:-1]]
    videos = np.unique(sample_video)
    if int(starts.sum()) != len(videos):
        repeated = sample_video[starts][np.unique(sample_video[starts], return_counts=True)[1].argmax()]
        raise DataError(f"{source}: the segments of video {repeated} are not consecutive samples")
    first = np.flatnonzero(starts)
    order = np.argsort(sample_video[first])
    labels = sample_label[first][order]
    mismatch = sample_label != np.repeat(sample_label[first], np.diff(np.r_[first, len(sample_video)]))
    if mismatch.any():
        bad = int(sample_video[np.flatnonzero(mismatch)[0]])
        raise DataError(f"{source}: the segments of video {bad} carry different labels")
    if sample_label_lists is None:
        return Catalog(sample_video, sample_label, videos, labels, source)
    offsets, values = _video_label_lists(sample_video, first, order, sample_label_lists, source)
    return Catalog(sample_video, sample_label, videos, labels, source, offsets, values)


def _video_label_lists(
    sample_video: np.ndarray,
    first: np.ndarray,
    order: np.ndarray,
    lists: tuple[np.ndarray, np.ndarray],
    source: str,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-video CSR class lists (in `videos` order) from per-sample ones, checked equal across segments."""
    offsets, values = (np.asarray(a, dtype=np.int64) for a in lists)
    samples = len(sample_video)
    if offsets.shape != (samples + 1,) or offsets[0] != 0 or offsets[-1] != len(values):
        raise DataError(f"{source}: label-list offsets {offsets.shape} do not fit {samples} samples")
    lengths = np.diff(offsets)
    if (lengths < 0).any() or (values < 0).any():
        raise DataError(f"{source}: label lists hold negative lengths or class indices")
    head = np.repeat(first, np.diff(np.r_[first, samples]))  # each sample's first segment
    counterpart = np.repeat(offsets[head] - offsets[:-1], lengths)  # same position in the first segment
    counterpart += np.arange(len(values))
    differs = lengths != lengths[head]
    unequal = np.flatnonzero(values != values[counterpart])
    differs[np.searchsorted(offsets, unequal, side="right") - 1] = True
    if differs.any():
        bad = int(sample_video[np.flatnonzero(differs)[0]])
        raise DataError(f"{source}: the segments of video {bad} carry different label lists")
    chosen = first[order]
    video_offsets = np.r_[0, np.cumsum(lengths[chosen])].astype(np.int64)
    return video_offsets, values[concat_ranges(offsets[chosen], lengths[chosen])]


# --- who writes which rows (pure) -----------------------------------------------------------------


@dataclass(frozen=True)
class WritePlan:
    """One rank's part of an extraction: its segments, its videos' rows, and the rows it writes itself.

    samples [s0, s1) are the segments the rank reads; rows [r0, r1) the videos they belong to; rows
    [d0, d1) (whole chunks) are written by this rank, every other row it touches is sent to rank 0.
    """

    s0: int
    s1: int
    r0: int
    r1: int
    d0: int
    d1: int


def write_plan(catalog: Catalog, rank: int, world: int, chunk_rows: int) -> WritePlan:
    s0, s1 = sampling.rank_range(len(catalog.sample_video), rank, world)
    n = catalog.num_videos
    if s1 <= s0:
        return WritePlan(s0, s1, 0, 0, 0, 0)
    rows = catalog.rows_of(catalog.sample_video[[s0, s1 - 1]])
    r0, r1 = int(rows[0]), int(rows[1]) + 1
    # whole rows: every segment of the video is in [s0, s1)
    first_whole = s0 == 0 or catalog.sample_video[s0 - 1] != catalog.sample_video[s0]
    last_whole = s1 == len(catalog.sample_video) or catalog.sample_video[s1] != catalog.sample_video[s1 - 1]
    w0, w1 = r0 + (not first_whole), r1 - (not last_whole)
    d0 = -(-w0 // chunk_rows) * chunk_rows
    d1 = w1 if w1 == n else w1 // chunk_rows * chunk_rows
    if d1 <= d0:
        d0 = d1 = w0
    return WritePlan(s0, s1, r0, r1, d0, d1)


# --- the extraction -------------------------------------------------------------------------------


def weights_digest(modules: Mapping[str, nn.Module | Mapping[str, torch.Tensor]]) -> str:
    """16 hex digits of SHA-256 over every tensor of the named modules (or state dicts), in key order.

    Names the encoder weights features came from, however the checkpoint was packaged.
    """
    h = hashlib.sha256()
    for name in sorted(modules):
        module = modules[name]
        state = module.state_dict() if isinstance(module, nn.Module) else module
        for key in sorted(state):
            tensor = state[key].detach().cpu().contiguous()
            h.update(f"{name}.{key}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
            h.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def extract_features(
    encoders: Mapping[str, nn.Module],
    shards: ShardSet,
    out: str | os.PathLike,
    *,
    batch_size: int,
    clip: ClipSpec,
    run: Runtime,
    catalog: Catalog | None = None,
    device: torch.device | str = "cpu",
    precision: str = "fp32",
    channels_last: bool = False,
    attrs: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    chunk_rows: int | None = None,
    progress: Progress | None = None,
    stage: str = "extract",
) -> FeatureStore:
    """Write (or finish) the store at `out` on every rank together; returns it opened, complete.

    encoders: {"video": ..., "audio": ...} (one or both) with `forward_features` and `feature_dim`.
    attrs: recorded on the store; with `weights_digest` of the encoders (added here as "checkpoint")
    they decide whether an existing store is this extraction's (resume) or another's: then InputError,
    or replaced when `overwrite`. Call on all ranks; `run` gives rank and world size. `chunk_rows`
    overrides the store's row chunking (default: chunks of >= 1 MiB).
    """
    _check_encoders(encoders, clip)
    out = Path(out)
    device = torch.device(device)
    catalog = catalog or read_catalog(shards)
    if len(catalog.sample_video) != len(shards):
        raise DataError(
            f"{out}: the catalog has {len(catalog.sample_video)} samples, the shards {len(shards)}"
        )
    dims = {m: int(e.feature_dim) for m, e in encoders.items()}
    attrs = _store_attrs(attrs, encoders, clip, len(shards))
    store = _open_or_create(out, catalog, dims, attrs, overwrite, chunk_rows)
    if store.complete:
        return store

    plan = write_plan(catalog, run.rank, run.world_size, store.chunk_rows)
    written = store.written_mask()
    pooler = _Pooler(store, catalog, plan, written)
    loader = extract_loader(shards, batch_size=batch_size, clip=clip, run=run)
    total = plan.s1 - plan.s0
    pos = plan.s0
    with eval_mode(encoders), torch.inference_mode():
        for batch in loader:
            index = batch["index"].numpy()
            expected = catalog.sample_video[pos : pos + len(index)]
            if not np.array_equal(index, expected):
                raise DataError(
                    f"{shards.tars[0].parent}: extraction read videos {index[:4].tolist()} at sample "
                    f"{pos}, the catalog says {expected[:4].tolist()} (shards changed?)"
                )
            rows = catalog.rows_of(index)
            if pooler.skippable(rows):
                features = None
            else:
                features = forward_batch(encoders, batch, device, precision, channels_last)
            pooler.add(rows, features)
            pos += len(index)
            if progress:
                progress(stage, pos - plan.s0, total)
    if pos != plan.s1:
        raise DataError(f"{shards.tars[0].parent}: extraction read {pos - plan.s0} samples, expected {total}")
    pooler.finish()
    _write_shared(store, pooler.held(), catalog)
    distributed.barrier()
    store = open_store(out, mode="r+")
    store.require_complete()
    return store


def _check_encoders(encoders: Mapping[str, nn.Module], clip: ClipSpec) -> None:
    """Refuse encoders or clips that cannot make a store."""
    if not encoders or set(encoders) - {"video", "audio"}:
        raise ConfigError(f"extract: encoders must be 'video' and/or 'audio', got {sorted(encoders)}")
    if "video" in encoders and not clip.video:
        raise ConfigError("extract: a video encoder needs clips with video (ClipSpec.video=True)")


def _store_attrs(
    attrs: Mapping[str, Any] | None, encoders: Mapping[str, nn.Module], clip: ClipSpec, samples: int
) -> dict[str, Any]:
    """The store's attributes: the caller's, the weights digest and the extraction parameters, which
    together decide whether an existing store is this extraction's."""
    return {
        **(attrs or {}),
        "checkpoint": weights_digest(encoders),
        "modalities": sorted(encoders),
        "extraction": {
            "clip_frames": clip.length,
            "stride": clip.stride,
            "crop": clip.crop,
            "short_side": clip.short_side,
            "samples": samples,
            "pooling": "mean of each segment's centre clip",
        },
    }


def _open_or_create(
    out: Path,
    catalog: Catalog,
    dims: dict[str, int],
    attrs: dict[str, Any],
    overwrite: bool,
    chunk_rows: int | None,
) -> FeatureStore:
    """Rank 0 creates or checks the store, the others open it after; the decision is broadcast."""
    problem = None
    if distributed.is_main():
        try:
            if out.exists():
                store = open_store(out, mode="r+")
                same = store.n == catalog.num_videos and store.dims == dims
                same = same and all(store.attrs.get(k) == _jsonish(v) for k, v in attrs.items())
                if not same:
                    if not overwrite:
                        raise InputError(
                            f"{out}: holds features of other weights or data (use another path or overwrite)"
                        )
                    create_store(
                        out, catalog.num_videos, dims, attrs=attrs, overwrite=True, chunk_rows=chunk_rows
                    )
            else:
                create_store(out, catalog.num_videos, dims, attrs=attrs, chunk_rows=chunk_rows)
        except (InputError, DataError, ConfigError) as e:
            problem = e
    problem = distributed.broadcast_object(problem)
    if problem is not None:
        raise problem
    store = open_store(out, mode="r+")
    if distributed.is_main() and not store.complete:
        done = store.written_mask()
        if not np.array_equal(store.read_index()[done], catalog.videos[done]):
            raise DataError(f"{out}: written rows belong to other videos than these shards'")
    return store


def _jsonish(value: Any) -> Any:
    """What a value reads back as from Zarr attributes (tuples become lists)."""
    if isinstance(value, Mapping):
        return {str(k): _jsonish(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonish(v) for v in value]
    return value


def forward_batch(
    encoders: Mapping[str, nn.Module],
    batch: Mapping[str, torch.Tensor],
    device: torch.device,
    precision: str,
    channels_last: bool,
) -> dict[str, np.ndarray]:
    """(B, d) float32 features per modality, on the CPU."""
    out = {}
    with autocast(device, precision):  # bf16/fp16 on CPU as on GPU
        for m, encoder in encoders.items():
            x = batch[m].to(device, non_blocking=True)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last_3d if x.ndim == 5 else torch.channels_last)
            out[m] = encoder.forward_features(x).float().cpu().numpy()
    return out


@contextmanager
def eval_mode(encoders: Mapping[str, nn.Module]) -> Iterator[None]:
    """The encoders in eval mode (batch-norm statistics frozen) inside, each one's own mode restored after."""
    modes = {m: e.training for m, e in encoders.items()}
    for e in encoders.values():
        e.eval()
    try:
        yield
    finally:
        for m, e in encoders.items():
            e.train(modes[m])


def encoded_clips(
    encoders: Mapping[str, nn.Module],
    loader: Iterable[Mapping[str, torch.Tensor]],
    *,
    device: torch.device | str,
    precision: str = "fp32",
    channels_last: bool = False,
) -> Iterator[tuple[Mapping[str, torch.Tensor], dict[str, np.ndarray]]]:
    """(batch, modality -> (B, d) float32 features) for every non-empty batch of a set's clips, every
    encoder over one decoding, in eval mode: what the probe's clip means are summed from as they stream.
    (One encoder's rows collected whole: `trainer.evaluate.scoring.forward_clips`.)"""
    device = torch.device(device)
    with eval_mode(encoders):
        for batch in loader:
            if batch["index"].numel() == 0:
                continue
            with torch.inference_mode():
                features = forward_batch(encoders, batch, device, precision, channels_last)
            yield batch, features


class _Pooler:
    """Running per-video sums of streamed segment features; writes direct chunks as they complete."""

    def __init__(self, store: FeatureStore, catalog: Catalog, plan: WritePlan, written: np.ndarray) -> None:
        self.store, self.plan, self.written, self.videos = store, plan, written, catalog.videos
        self.current: int | None = None
        self.sums: dict[str, np.ndarray] = {}
        self.count = 0
        self.chunk: dict[int, dict[str, np.ndarray]] = {}
        self.shared: list[tuple[int, dict[str, np.ndarray], int]] = []  # (row, sums, count)

    def _direct(self, row: int) -> bool:
        return self.plan.d0 <= row < self.plan.d1

    def skippable(self, rows: np.ndarray) -> bool:
        """True when every row is in a direct chunk already written: no need to compute features."""
        return bool(((rows >= self.plan.d0) & (rows < self.plan.d1)).all() and self.written[rows].all())

    def add(self, rows: np.ndarray, features: Mapping[str, np.ndarray] | None) -> None:
        for i, row in enumerate(rows.tolist()):
            if row != self.current:
                self._close()
                self.current, self.count = row, 0
                self.sums = {}
            if features is None:
                continue
            for m, x in features.items():
                if m in self.sums:
                    self.sums[m] += x[i]
                else:
                    self.sums[m] = x[i].astype(np.float64)
            self.count += 1

    def _close(self) -> None:
        row = self.current
        if row is None or not self.sums:
            return
        if self._direct(row):
            if not self.written[row]:
                self._put(row, {m: s / self.count for m, s in self.sums.items()})
        else:
            self.shared.append((row, self.sums, self.count))

    def _put(self, row: int, means: dict[str, np.ndarray]) -> None:
        self.chunk[row] = means
        c0 = row // self.store.chunk_rows * self.store.chunk_rows
        c1 = min(c0 + self.store.chunk_rows, self.store.n)
        if row == c1 - 1:  # rows come in order, so the chunk is complete
            if len(self.chunk) != c1 - c0:
                raise DataError(
                    f"{self.store.path}: chunk at row {c0} got {len(self.chunk)} of {c1 - c0} rows"
                )
            data = {m: np.stack([self.chunk[r][m] for r in range(c0, c1)]) for m in self.store.modalities}
            self.store.write_rows(c0, data, self.videos[c0:c1])
            self.chunk = {}

    def finish(self) -> None:
        self._close()
        self.current = None
        if self.chunk:
            raise DataError(f"{self.store.path}: rows {sorted(self.chunk)[:5]} were pooled but never written")

    def held(self) -> tuple[np.ndarray, dict[str, np.ndarray], np.ndarray]:
        """(rows, sums per modality (float64), counts) of everything this rank does not write itself."""
        rows = np.array([r for r, _, _ in self.shared], dtype=np.int64)
        counts = np.array([c for _, _, c in self.shared], dtype=np.int64)
        sums = {
            m: np.stack([s[m] for _, s, _ in self.shared])
            if self.shared
            else np.zeros((0, self.store.dims[m]), dtype=np.float64)
            for m in self.store.modalities
        }
        return rows, sums, counts


def _write_shared(
    store: FeatureStore, held: tuple[np.ndarray, dict[str, np.ndarray], np.ndarray], catalog: Catalog
) -> None:
    """All-gather the rows no rank writes alone; rank 0 merges sums per row and writes them."""
    rows, sums, counts = held
    rows = distributed.all_gather_rows(rows)
    counts = distributed.all_gather_rows(counts)
    sums = {m: distributed.all_gather_rows(x) for m, x in sums.items()}
    if not distributed.is_main() or not len(rows):
        return
    order = np.argsort(rows, kind="stable")
    rows, counts = rows[order], counts[order]
    unique, first = np.unique(rows, return_index=True)
    total = np.add.reduceat(counts, first)
    means = {m: np.add.reduceat(x[order], first, axis=0) / total[:, None] for m, x in sums.items()}
    # the merged rows are whole chunks (write_plan gives direct ranges in whole chunks): write run by run
    breaks = np.flatnonzero(np.diff(unique) != 1) + 1
    for run_rows, piece in zip(
        np.split(unique, breaks), np.split(np.arange(len(unique)), breaks), strict=True
    ):
        store.write_rows(int(run_rows[0]), {m: x[piece] for m, x in means.items()}, catalog.videos[run_rows])


# --- encoders from a checkpoint file ------------------------------------------------------------------


@dataclass(frozen=True)
class LoadedEncoders:
    encoders: dict[str, nn.Module]
    source: str  # "xdctools" (a training checkpoint / encoders.pt) or the video layout of a plain state dict
    iteration: int | None


def load_encoders(
    path: str | os.PathLike, *, modalities: tuple[str, ...] | None = None, bn_eps: float | None = None
) -> LoadedEncoders:
    """The encoders of a checkpoint: ours (both; shapes and layout read from the tensors), or a plain
    R(2+1)D-18 state dict (video only: the official XDC weights, torchvision's layout, DDP-wrapped...).

    bn_eps: BatchNorm eps of a plain state dict's model; default 1e-3 for the XDC layout (the official
    weights come from Caffe2), 1e-5 for torchvision's. `modalities` restricts what is built.
    """
    from trainer.models import video_model_for
    from trainer.models.weights import audio_model_for, read_payload, unwrap_state_dict

    path = Path(path)
    obj = read_payload(path)
    ours = isinstance(obj, Mapping) and isinstance(obj.get("state"), Mapping) and "format" in obj
    if ours:
        state = obj["state"]
        model = state.get("model")
        if not isinstance(model, Mapping):
            raise DataError(f"{path}: xdctools checkpoint without model weights")
        parts = {
            m: {k[len(f"encoders.{m}.") :]: v for k, v in model.items() if k.startswith(f"encoders.{m}.")}
            for m in ("video", "audio")
        }
        parts = {m: sd for m, sd in parts.items() if sd}
        eps = float(state.get("config", {}).get("bn_eps", 1e-5)) if bn_eps is None else bn_eps
        iteration = state.get("iteration")
    else:
        parts = {"video": unwrap_state_dict(obj, source=str(path))}
        eps = bn_eps
        iteration = None
    wanted = tuple(parts) if modalities is None else modalities
    if missing := [m for m in wanted if m not in parts]:
        raise DataError(f"{path}: holds no {' or '.join(missing)} encoder (has {', '.join(parts) or 'none'})")
    encoders: dict[str, nn.Module] = {}
    source = "xdctools"
    if "video" in wanted:
        from trainer.models.weights import detect_layout

        layout = detect_layout(parts["video"], source=str(path))
        if not ours:
            source = layout
        video_eps = eps if eps is not None else (1e-3 if layout == "xdc" else 1e-5)
        encoders["video"] = video_model_for(parts["video"], bn_eps=video_eps)
    if "audio" in wanted:
        config = state.get("config", {}) if ours else {}
        encoders["audio"] = audio_model_for(
            parts["audio"],
            source=str(path),
            maxpool=bool(config.get("audio_maxpool", False)),
            bn_eps=eps if eps is not None else 1e-5,
        )
    return LoadedEncoders(encoders, source, None if iteration is None else int(iteration))
