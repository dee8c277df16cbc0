"""Hand-crafted audio features for the first pseudo-labels (`clustering.init: handcrafted`).

The paper (§3.3, "Initialization and convergence") names the option: initial pseudo-labels from clustering
hand-crafted features such as audio spectrograms, which cut the iterations needed in its small-scale runs.
The shards already hold every segment's log-mel, so these cost one read of the mel members and no decoding:
per video, the mean and the standard deviation over time of each of the N_MELS bands (2 x 40 values), in
dB as stored. They are not standardised per band: that lifts the bands holding only the noise floor to the
weight of those holding the sound (on the synthetic tones, k-means NMI with the class fell from 1.0 to 0.59).

A segment's stored mel carries MEL_PAD_FRAMES of its neighbours' audio on each side (for the clip windows);
only its own span counts here, so a video's statistics are those of its whole soundtrack, each moment once.
Memory: two float64 accumulators of N_MELS per video (~650 bytes a video: 0.16 GB at Kinetics' 240K).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from trainer.data import ShardSet
from trainer.extract import Catalog
from xdctools.errors import DataError
from xdctools.features.store import FeatureStore, create_store
from xdctools.shard import format as fmt
from xdctools.shard.read import decode_npy, locations, read_samples

DIM = 2 * fmt.N_MELS  # per-band mean, then per-band standard deviation


def mel_statistics(shards: ShardSet, catalog: Catalog) -> np.ndarray:
    """(N, DIM) float32 per-band mean and std of each video's log-mel over its own span, in catalog order."""
    n = catalog.num_videos
    sums, squares = np.zeros((n, fmt.N_MELS)), np.zeros((n, fmt.N_MELS))
    frames = np.zeros(n)
    for sample in read_samples(locations(shards.tars), (fmt.INFO_EXT, fmt.MEL_EXT)):
        video = sample.decode(fmt.INFO_EXT, fmt.decode_info)["video"]
        own = sample.decode(fmt.MEL_EXT, _own_span)
        row = int(catalog.rows_of(np.array([video]))[0])
        sums[row] += own.sum(1)
        squares[row] += np.square(own).sum(1)
        frames[row] += own.shape[1]
    if (frames == 0).any():
        video = int(catalog.videos[np.flatnonzero(frames == 0)[0]])
        raise DataError(f"{shards.tars[0].parent}: video {video} has no mel frames (an empty soundtrack)")
    mean = sums / frames[:, None]
    std = np.sqrt(np.maximum(squares / frames[:, None] - np.square(mean), 0.0))
    return np.concatenate([mean, std], axis=1).astype(np.float32)


def _own_span(data: bytes) -> np.ndarray:
    """A stored mel member without the MEL_PAD_FRAMES of its neighbours' audio on each side, float64
    (N_MELS, frames); ValueError when it is not such a mel."""
    mel = decode_npy(data)
    if mel.ndim != 2 or mel.shape[0] != fmt.N_MELS:
        raise ValueError(f"shape {mel.shape}, not ({fmt.N_MELS}, frames)")
    pad = fmt.MEL_PAD_FRAMES
    own = mel[:, pad : mel.shape[1] - pad] if mel.shape[1] > 2 * pad else mel
    return own.astype(np.float64)


def write_handcrafted_store(
    path: Path, features: FeatureStore, shards: ShardSet, catalog: Catalog, attrs: dict
) -> FeatureStore:
    """A store beside `features` (same rows, same index) whose audio array is the mel statistics; the
    video array is copied chunk by chunk, so every view (cdc too) clusters from it."""
    stats = mel_statistics(shards, catalog)
    dims = {"audio": DIM} | ({"video": features.dims["video"]} if "video" in features.dims else {})
    store = create_store(path, features.n, dims, attrs=attrs, chunk_rows=features.chunk_rows, overwrite=True)
    for chunk in range(features.num_chunks):
        start, stop = features.chunk_range(chunk)
        rows = {"audio": stats[start:stop]}
        if "video" in dims:
            rows["video"] = features.read("video", start, stop)
        store.write_rows(start, rows, features.read_index(start, stop))
    return store
