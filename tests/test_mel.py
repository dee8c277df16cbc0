"""Log-mel of the shard format: librosa's values, the mel frame <-> time mapping, audio aligned to video."""

from __future__ import annotations

import io
import subprocess
from fractions import Fraction
from pathlib import Path

import librosa
import numpy as np
import pytest
import soundfile

from xdctools.shard import format as fmt
from xdctools.shard.jobs import Job
from xdctools.shard.media import process_job
from xdctools.shard.mel import audio_only_mel, log_mel, segment_mel
from xdctools.shard.params import ShardParams

SR = fmt.SAMPLE_RATE
F16_TOL = 0.05  # dB: float16 keeps ~3 significant digits of values up to ~100 in magnitude


def reference_mel(y: np.ndarray) -> np.ndarray:
    """librosa called directly with the documented parameters."""
    power = librosa.feature.melspectrogram(
        y=y, sr=SR, n_fft=512, hop_length=320, win_length=400, window="hann", center=True,
        pad_mode="constant", power=2.0, n_mels=40, fmin=0.0, fmax=8000.0,
    )  # fmt: skip
    return librosa.power_to_db(power, ref=1.0, amin=1e-10, top_db=None)


def tone_then_chirp() -> np.ndarray:
    """1 s of a 1 kHz tone, then 1.5 s of a 200 Hz -> 6 kHz chirp, at 16 kHz, amplitude 0.5."""
    t = np.arange(SR) / SR
    tone = 0.5 * np.sin(2 * np.pi * 1000 * t)
    chirp = 0.5 * librosa.chirp(fmin=200, fmax=6000, sr=SR, duration=1.5)
    return np.concatenate([tone, chirp]).astype(np.float32)


def band_of(freq: float) -> int:
    """The mel band whose centre is nearest `freq`."""
    centres = librosa.mel_frequencies(n_mels=fmt.N_MELS + 2, fmin=fmt.FMIN, fmax=fmt.FMAX)[1:-1]
    return int(np.argmin(np.abs(centres - freq)))


def test_log_mel_is_librosa_with_the_format_parameters() -> None:
    y = tone_then_chirp()
    mel = log_mel(y)
    assert mel.dtype == np.float32 and mel.shape == (fmt.N_MELS, 1 + len(y) // fmt.HOP_LENGTH)
    np.testing.assert_allclose(mel, reference_mel(y), atol=1e-4)
    tone_cols = mel[:, 5:45]  # well inside the first second
    assert np.all(np.argmax(tone_cols, axis=0) == band_of(1000))
    chirp_peaks = np.argmax(mel[:, 55:120], axis=0)  # the chirp climbs through the bands
    assert chirp_peaks[-1] > chirp_peaks[0] + 10 and np.all(np.diff(chirp_peaks) >= -1)
    assert np.all(log_mel(np.zeros(SR, np.float32)) == fmt.TOP_DB_FLOOR)
    assert fmt.WINDOW_FRAMES == 100 and fmt.MEL_FPS == 50  # 2 s is exactly the audio encoder's 100 frames
    with pytest.raises(ValueError, match="mono"):
        log_mel(np.zeros((2, SR), np.float32))


def test_segment_mel_takes_the_right_columns() -> None:
    full = np.arange(fmt.N_MELS * 600, dtype=np.float32).reshape(fmt.N_MELS, 600) / 100 - 120
    fps = Fraction(30000, 1001)
    for start, count in [(0, 64), (64, 64), (320, 12), (384, 64)]:
        seg = segment_mel(full, start, count, fps)
        origin = fmt.segment_mel_origin(start, fps)
        assert seg.dtype == np.float16 and seg.shape == (fmt.N_MELS, fmt.segment_mel_frames(count, fps))
        for col in range(seg.shape[1]):
            src = origin + col
            expected = full[:, src] if 0 <= src < full.shape[1] else np.full(fmt.N_MELS, fmt.TOP_DB_FLOOR)
            np.testing.assert_allclose(seg[:, col], expected, atol=F16_TOL)
    first = segment_mel(full, 0, 64, fps)
    assert np.all(first[:, : fmt.MEL_PAD_FRAMES] == fmt.TOP_DB_FLOOR)  # before t = 0
    np.testing.assert_allclose(first[:, fmt.MEL_PAD_FRAMES], full[:, 0], atol=F16_TOL)  # column 50 = start


def test_audio_only_job_matches_librosa(tmp_path: Path) -> None:
    y = tone_then_chirp()
    wav = tmp_path / "tone_chirp.wav"
    soundfile.write(wav, y, SR, subtype="FLOAT")
    result = process_job(Job("fold1", 4, str(wav), "tone_chirp", audio_only=True), ShardParams())
    assert result.ok, result.detail
    ((info_name, info), (json_name, _), (mel_name, mel_bytes)) = result.samples[0]
    assert [info_name, json_name, mel_name] == [
        f"v00000004_tone_chirp_s000.{e}" for e in ("info.npy", "json", "mel.npy")
    ]
    stored = np.load(io.BytesIO(mel_bytes))
    info = fmt.decode_info(info)
    width = -(-len(y) // fmt.HOP_LENGTH) + 2 * fmt.MEL_PAD_FRAMES  # [-1 s, duration + 1 s]
    assert stored.dtype == np.float16 and stored.shape == (fmt.N_MELS, width) == (
        fmt.N_MELS,
        info["mel_frames"],
    )
    assert (info["has_audio"], info["num_frames"], info["fps_num"]) == (1, 0, 0)
    ref = reference_mel(y)
    pad = fmt.MEL_PAD_FRAMES
    np.testing.assert_allclose(stored[:, pad : pad + ref.shape[1]], ref, atol=F16_TOL, rtol=1e-3)
    assert np.all(stored[:, :pad] == fmt.TOP_DB_FLOOR) and np.all(
        stored[:, pad + ref.shape[1] :] == fmt.TOP_DB_FLOOR
    )
    assert np.argmax(stored[:, pad + 25]) == band_of(1000)
    assert result.meta["duration_s"] == pytest.approx(2.5)


def test_audio_only_resamples_and_downmixes(tmp_path: Path) -> None:
    t = np.arange(44_100 * 2) / 44_100
    left = 0.5 * np.sin(2 * np.pi * 1000 * t)
    wav = tmp_path / "stereo.wav"
    soundfile.write(wav, np.stack([left, np.zeros_like(left)], axis=1), 44_100)  # tone on one channel
    result = process_job(
        Job("fold1", 0, str(wav), "stereo", audio_only=True), ShardParams(audio_required=True)
    )
    assert result.ok and result.meta["audio_samples"] == 2 * SR
    mel = np.load(io.BytesIO(dict(result.samples[0])["v00000000_stereo_s000.mel.npy"]))
    assert np.all(np.argmax(mel[:, 60:140], axis=0) == band_of(1000))


def test_audio_is_aligned_with_video_in_every_segment(tmp_path: Path) -> None:
    """A tone that starts at t = 2 s in an mp4 (AAC, encoder delay) shows up at t = 2 s in every mel."""
    clip = tmp_path / "beep.mp4"
    subprocess.run(
        ["ffmpeg", "-nostdin", "-v", "error", "-f", "lavfi", "-i", "testsrc2=size=96x64:rate=25:duration=4",
         "-f", "lavfi", "-i", "aevalsrc='if(gte(t,2),0.5*sin(2*PI*1000*t),0)':s=44100:d=4",
         "-c:v", "libx264", "-preset", "ultrafast", "-c:a", "aac", "-shortest", str(clip)],
        check=True,
    )  # fmt: skip
    result = process_job(Job("train", 0, str(clip), "beep"), ShardParams(short_side=64))
    assert result.ok and result.meta["frames"] == 100 and len(result.samples) == 2
    fps = Fraction(25)
    onset_full = 2.0 * fmt.MEL_FPS  # mel column of t = 2 s in the whole video's mel
    for sample, start in zip(result.samples, (0, 64), strict=True):
        parts = {name.split(".", 1)[1]: data for name, data in sample}
        mel = np.load(io.BytesIO(parts[fmt.MEL_EXT])).astype(np.float32)
        onset = onset_full - fmt.segment_mel_origin(start, fps)  # the same instant, in stored columns
        loud = mel[band_of(1000)] > -40
        first_loud = int(np.argmax(loud))
        assert abs(first_loud - onset) <= 1, (start, first_loud, onset)
        assert not loud[:first_loud].any() and loud[first_loud : int(onset) + 20].all()


def test_silent_track_gives_a_floor_mel(tmp_path: Path) -> None:
    wav = tmp_path / "silence.wav"
    soundfile.write(wav, np.zeros(SR, np.float32), SR)
    kept = process_job(Job("fold1", 0, str(wav), "silence", audio_only=True), ShardParams())
    assert kept.ok and not kept.meta["has_audio"] and kept.meta["audio_silent"]
    mel = np.load(io.BytesIO(kept.samples[0][-1][1]))
    assert mel.shape == (fmt.N_MELS, 150) and np.all(mel == fmt.TOP_DB_FLOOR)
    strict = process_job(
        Job("fold1", 0, str(wav), "silence", audio_only=True), ShardParams(audio_required=True)
    )
    assert strict.reason == "silent_audio"
    assert audio_only_mel(np.zeros((fmt.N_MELS, 0), np.float32), SR).shape == (fmt.N_MELS, 150)


def test_clip_window_is_centred_and_stays_inside_the_video() -> None:
    fps, pad, width = Fraction(25), fmt.MEL_PAD_FRAMES, fmt.WINDOW_FRAMES

    def start(clip_start: int, *, segment_start: int = 0, frames: int = 100, video_frames: int = 100) -> int:
        mel = fmt.segment_mel_frames(frames, fps)
        kw = {"segment_start": segment_start, "video_frames": video_frames, "mel_frames": mel}
        return fmt.clip_mel_start(clip_start, 8, fps, **kw)

    # 4 s video, one segment: video time t is stored column pad + rate t
    rate = fmt.MEL_FPS
    assert start(46) == pad + 1 * rate  # clip centre 2.0 s: centred, the window is 1.0-3.0 s
    assert start(0) == pad  # centred would start at -0.84 s: shifted to the video's start
    assert start(92) == pad + 4 * rate - width  # and at its end
    for clip in range(0, 93):  # the clip's own span always lies inside its window
        first, last = (pad + Fraction(f * rate, 25) for f in (clip, clip + 8))
        assert start(clip) <= first and last <= start(clip) + width
    # the second segment (frames 64-99) of the same video: its stored mel starts at 64/25 - 1 s
    assert start(28, segment_start=64, frames=36) == pad + 4 * rate - width - round(Fraction(64 * rate, 25))
    # a 1.2 s video is shorter than the window: centred on the clip (0.6 s), padded with silence
    assert start(11, frames=30, video_frames=30) == pad + round(0.6 * rate) - width // 2
