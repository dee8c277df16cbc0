"""Log-mel spectrograms of the shard format (pure: arrays in, arrays out)."""

from __future__ import annotations

from fractions import Fraction

import librosa
import numpy as np

from xdctools.shard import format as fmt


def log_mel(audio: np.ndarray, sr: int = fmt.SAMPLE_RATE) -> np.ndarray:
    """float32 (N_MELS, 1 + len(audio) // HOP_LENGTH) in dB; column j is centred at j / MEL_FPS seconds.

    `audio` is mono float in [-1, 1] at `sr` Hz; digital silence maps to TOP_DB_FLOOR.
    """
    y = np.ascontiguousarray(audio, dtype=np.float32)
    if y.ndim != 1:
        raise ValueError(f"log_mel expects mono audio of shape (samples,), got {y.shape}")
    power = librosa.feature.melspectrogram(
        y=y,
        sr=sr,
        n_fft=fmt.N_FFT,
        hop_length=fmt.HOP_LENGTH,
        win_length=fmt.WIN_LENGTH,
        window="hann",
        center=True,
        pad_mode="constant",
        power=2.0,
        n_mels=fmt.N_MELS,
        fmin=fmt.FMIN,
        fmax=fmt.FMAX,
    )
    return librosa.power_to_db(power, ref=1.0, amin=1e-10, top_db=None).astype(np.float32)


def silent_mel(width: int) -> np.ndarray:
    """float32 (N_MELS, width) of TOP_DB_FLOOR: the whole-video mel of a missing or silent track."""
    return np.full((fmt.N_MELS, width), fmt.TOP_DB_FLOOR, dtype=np.float32)


def segment_mel(full: np.ndarray, start_frame: int, num_frames: int, fps: Fraction) -> np.ndarray:
    """float16 (N_MELS, segment_mel_frames) cut from the whole-video mel `full` (N_MELS, F).

    Columns follow `format.segment_mel_origin`, so stored column MEL_PAD_FRAMES is the segment's start;
    columns before the audio starts or after it ends are TOP_DB_FLOOR.
    """
    width = fmt.segment_mel_frames(num_frames, fps)
    origin = fmt.segment_mel_origin(start_frame, fps)
    out = np.full((fmt.N_MELS, width), fmt.TOP_DB_FLOOR, dtype=np.float16)
    lo, hi = max(origin, 0), min(origin + width, full.shape[1])
    if hi > lo:
        out[:, lo - origin : hi - origin] = full[:, lo:hi]
    return out


def audio_only_mel(full: np.ndarray, num_samples: int) -> np.ndarray:
    """float16 mel of an audio-only sample: covers [-MEL_PAD_SECONDS, duration + MEL_PAD_SECONDS].

    Same layout as a segment whose "frames" are mel frames: column MEL_PAD_FRAMES is time 0.
    """
    frames = -(-num_samples // fmt.HOP_LENGTH)
    return segment_mel(full, 0, frames, Fraction(fmt.MEL_FPS))
