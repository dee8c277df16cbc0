"""Decoding helpers shared by tests that check real media files as a player sees them."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np


def decode(path: Path) -> tuple[np.ndarray, np.ndarray, int]:
    """Frames uint8 (T, H, W, 3), mono float32 audio and its sample rate, as a player would see them."""
    with av.open(str(path)) as c:
        frames = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])
    with av.open(str(path)) as c:
        rate = c.streams.audio[0].sample_rate
        audio = np.concatenate([f.to_ndarray().reshape(-1) for f in c.decode(audio=0)])
    return frames, audio.astype(np.float32), rate
