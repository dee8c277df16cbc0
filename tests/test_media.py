"""Per-file processing of `xdctools shard` on the real media collection: samples or a specific reason."""

from __future__ import annotations

import io
import json
import pickle
import subprocess
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from xdctools.errors import ConfigError, InputError
from xdctools.shard import format as fmt
from xdctools.shard.jobs import Job
from xdctools.shard.media import (
    AUDIO_FILE,
    REASON_KINDS,
    JobResult,
    MediaFailure,
    build_command,
    check_ffmpeg,
    cut_frames,
    os_failure,
    output_fps,
    output_size,
    probe,
    probe_summary,
    process_job,
    pyav_summary,
    run_ffmpeg,
    run_ffprobe,
    segment_counts,
    summarize,
)
from xdctools.shard.params import ShardParams

SMALL = ShardParams(short_side=64)
EXPECTED_FAILURES = {
    "edge/empty.mp4": "empty_file",
    "edge/truncated_R6llTwEh07w.mp4": "unreadable",
    "edge/jpeg_named_mp4.mp4": "not_a_video",
    "edge/rotated_90.mov": "too_short",  # 0.1 s: 3 frames
    "edge/corrupted_nal.mp4": "corrupt_stream",  # ffmpeg rejects one of its 50 packets
}


def job_for(media_dir: Path, rel: str, index: int = 0, **kw) -> Job:
    return Job(set_name="test", index=index, path=str(media_dir / rel), name=rel.rsplit(".", 1)[0], **kw)


def ffprobe(path: Path, *args: str) -> dict:
    out = subprocess.run(["ffprobe", "-v", "error", *args, "-of", "json", str(path)], capture_output=True)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def members(sample: list[tuple[str, bytes]]) -> dict[str, bytes]:
    """ext -> bytes, checking the sample's members share one key."""
    keys = {name.split(".", 1)[0] for name, _ in sample}
    assert len(keys) == 1, keys
    return {name.split(".", 1)[1]: data for name, data in sample}


def first_frame_rgb(path: Path, size: tuple[int, int] | None = None) -> np.ndarray:
    """First decoded frame as (H, W, 3) uint8, through ffmpeg with its default autorotate."""
    scale = ["-vf", f"scale={size[0]}:{size[1]}"] if size else []
    args = ["ffmpeg", "-nostdin", "-v", "error", "-i", str(path), *scale, "-frames:v", "1"]
    raw = subprocess.run([*args, "-f", "rawvideo", "-pix_fmt", "rgb24", "-"], capture_output=True, check=True)
    info = ffprobe(path, "-show_entries", "stream=width,height", "-select_streams", "v:0")["streams"][0]
    w, h = size or (info["width"], info["height"])
    return np.frombuffer(raw.stdout, np.uint8).reshape(h, w, 3)


@pytest.fixture(scope="module")
def swept(media_dir: Path) -> dict[str, JobResult]:
    """Every file of the collection, processed once at short side 64 (audio not required)."""
    files = sorted(p for p in media_dir.rglob("*") if p.is_file())
    assert len(files) >= 29
    return {
        str(p.relative_to(media_dir)): process_job(
            job_for(media_dir, str(p.relative_to(media_dir)), i), SMALL
        )
        for i, p in enumerate(files)
    }


# --- the whole collection ----------------------------------------------------------------------


def test_every_file_is_sharded_or_fails_with_its_reason(swept: dict[str, JobResult]) -> None:
    reasons = {rel: (r.reason if not r.ok else None) for rel, r in swept.items()}
    expected = {rel: EXPECTED_FAILURES.get(rel) for rel in swept}
    assert reasons == expected
    for result in swept.values():
        if result.ok:
            assert result.samples and result.reason is None
        else:
            assert result.samples == [] and result.detail
    assert "moov atom not found" in swept["edge/truncated_R6llTwEh07w.mp4"].detail
    assert "Error while decoding stream #0:0" in swept["edge/corrupted_nal.mp4"].detail


def test_segments_match_ffprobe_frame_counts(swept: dict[str, JobResult], tmp_path: Path) -> None:
    for rel, result in swept.items():
        if not result.ok:
            continue
        meta = result.meta
        counts = []
        for i, sample in enumerate(result.samples):
            seg = tmp_path / f"seg{i}.webm"
            seg.write_bytes(members(sample)["webm"])
            stream = ffprobe(
                seg, "-count_frames", "-show_entries", "stream=codec_name,nb_read_frames,width,height"
            )
            stream = stream["streams"][0]
            info = fmt.decode_info(members(sample)[fmt.INFO_EXT])
            assert stream["codec_name"] == "vp9", rel
            assert int(stream["nb_read_frames"]) == info["num_frames"], (rel, i)
            assert (stream["width"], stream["height"]) == (meta["width"], meta["height"]), rel
            counts.append(info["num_frames"])
        assert sum(counts) == meta["frames"], rel
        assert all(c == SMALL.segment_frames for c in counts[:-1]) and 0 < counts[-1] <= SMALL.segment_frames
        assert min(meta["width"], meta["height"]) == 64 and meta["width"] % 2 == meta["height"] % 2 == 0, rel
        # the constant-rate video spans the source's duration (within the edge frames)
        duration = meta["source"]["video"]["duration"] or meta["source"]["duration"]
        if duration is not None:
            assert abs(meta["frames"] - duration * Fraction(meta["fps"])) <= 2, rel


def test_members_of_every_sample(swept: dict[str, JobResult]) -> None:
    order = {ext: i for i, ext in enumerate(fmt.MEMBER_ORDER)}
    for rel, result in swept.items():
        for i, sample in enumerate(result.samples):
            exts = [name.split(".", 1)[1] for name, _ in sample]
            assert exts == sorted(exts, key=order.__getitem__), rel
            assert sample[0][0].split(".", 1)[0] == fmt.make_key(
                list(swept).index(rel), rel.rsplit(".", 1)[0], i
            )
            parts = members(sample)
            for ext in (fmt.INFO_EXT, fmt.MEL_EXT):
                assert parts[ext][:8] == b"\x93NUMPY\x01\x00", (rel, ext)  # npy v1.0, as DALI needs
            info = fmt.decode_info(np.load(io.BytesIO(parts[fmt.INFO_EXT])))
            mel = np.load(io.BytesIO(parts[fmt.MEL_EXT]))
            doc = json.loads(parts[fmt.META_EXT])
            fps = Fraction(info["fps_num"], info["fps_den"])
            assert mel.dtype == np.float16 and mel.shape == (fmt.N_MELS, info["mel_frames"])
            assert info["mel_frames"] == fmt.segment_mel_frames(info["num_frames"], fps)
            assert (info["segment"], info["num_segments"]) == (i, len(result.samples))
            assert info["video_frames"] == result.meta["frames"] and info["label"] == -1
            assert info["has_audio"] == int(result.meta["has_audio"]) == int(doc["audio"]["has_audio"])
            if not info["has_audio"]:
                assert np.all(mel == fmt.TOP_DB_FLOOR), rel
            assert doc["segment"] == {
                "index": i,
                "start_frame": info["start_frame"],
                "num_frames": info["num_frames"],
                "start_s": float(info["start_frame"] / fps),
                "duration_s": float(info["num_frames"] / fps),
                "mel_origin": fmt.segment_mel_origin(info["start_frame"], fps),
            }
            assert doc["source"]["path"] == result.meta["source"]["path"]
            assert doc["mel"]["n_mels"] == fmt.N_MELS and doc["mel"]["hop_length"] == fmt.HOP_LENGTH
            assert doc["video"]["fps"] == result.meta["fps"] and doc["codec"] == SMALL.to_dict(
                output_only=True
            )
            assert parts[fmt.META_EXT] == json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
            assert fmt.CLS_EXT not in parts


def test_audio_streams_are_found_downmixed_and_judged(swept: dict[str, JobResult]) -> None:
    audible = {rel for rel, r in swept.items() if r.ok and r.meta["has_audio"]}
    assert audible == {
        "edge/big_buck_bunny_432_433.webm",  # Vorbis stereo
        "edge/big_buck_bunny_small.mp4",  # 5.1 AAC, downmixed
        "edge/chaplin.mp4",
        "edge/fire2.mp4",
        "edge/mpeg4_mp3_stereo.avi",
        "edge/nasa_13013.mp4",
        "edge/realshort.mp4",
        "kinetics/flipping pancake/flipping_a_pancake.mkv",
        "kinetics/using segway/R6llTwEh07w_000000_000010.mp4",
        "kinetics/using segway/SOX5yA1l24A_000299_000309.mp4",
        "kinetics/using segway/WUzgd7C1pWA_000101_000111.mp4",
    }
    assert swept["edge/big_buck_bunny_small.mp4"].meta["source"]["audio"]["channels"] == 6
    nasa = swept["edge/nasa_13013.mp4"].meta  # the first of two video and two audio streams
    assert nasa["source"]["audio"]["sample_rate"] == 8000 and nasa["source"]["video"]["width"] == 320
    for rel in ("edge/cockatoo.mp4", "edge/no_duration.webm"):  # digitally silent tracks
        assert swept[rel].meta["audio_silent"] is True and not swept[rel].meta["has_audio"]
    for rel in audible:
        meta = swept[rel].meta
        assert abs(meta["audio_samples"] / fmt.SAMPLE_RATE - meta["duration_s"]) < 0.2, rel
        mel = np.load(io.BytesIO(members(swept[rel].samples[0])[fmt.MEL_EXT]))
        assert mel[:, fmt.MEL_PAD_FRAMES :].max() > -60, rel  # sound where the video is
        assert np.all(mel[:, : fmt.MEL_PAD_FRAMES - 1] == fmt.TOP_DB_FLOOR), rel  # nothing before t=0


def test_results_pickle(swept: dict[str, JobResult]) -> None:
    for result in (swept["edge/chaplin.mp4"], swept["edge/empty.mp4"]):
        again = pickle.loads(pickle.dumps(result))
        assert again == result


# --- policies and single files -----------------------------------------------------------------


def test_audio_required_rejects_missing_and_silent_audio(media_dir: Path) -> None:
    strict = ShardParams(short_side=64, audio_required=True)
    assert process_job(job_for(media_dir, "edge/h264_no_audio.mp4"), strict).reason == "no_audio"
    cockatoo = process_job(job_for(media_dir, "edge/cockatoo.mp4"), strict)
    assert cockatoo.reason == "silent_audio" and "dBFS" in cockatoo.detail
    ok = process_job(job_for(media_dir, "edge/realshort.mp4"), strict)
    assert ok.ok and ok.meta["has_audio"]


def damage_audio_packets(src: Path, dst: Path, every: int = 3, count: int = 10) -> None:
    """Copy src with the payload of `count` of its audio packets overwritten by noise."""
    packets = ffprobe(src, "-select_streams", "a:0", "-show_entries", "packet=pos,size")["packets"]
    data = bytearray(src.read_bytes())
    rng = np.random.default_rng(0)
    for packet in packets[10 : 10 + every * count : every]:
        pos, size = int(packet["pos"]), int(packet["size"])
        data[pos + 2 : pos + size] = rng.integers(0, 256, size - 2, dtype=np.uint8).tobytes()
    dst.write_bytes(bytes(data))


def test_damaged_audio_is_dropped_or_fails_when_required(
    media_dir: Path, tmp_path: Path, swept: dict[str, JobResult]
) -> None:
    assert all(r.meta["audio_decode_errors"] == 0 for r in swept.values() if r.ok)  # good files: none
    damaged = tmp_path / "bunny_bad_audio.mp4"
    damage_audio_packets(media_dir / "edge/big_buck_bunny_small.mp4", damaged)
    job = Job(set_name="test", index=0, path=str(damaged), name="bunny_bad_audio")
    kept = process_job(job, SMALL)  # the video is intact: kept, its damaged audio dropped
    assert kept.ok and not kept.meta["has_audio"] and kept.meta["audio_decode_errors"] == 10
    doc = json.loads(members(kept.samples[0])[fmt.META_EXT])
    assert doc["audio"]["decode_errors"] == 10 and doc["audio"]["has_audio"] is False
    assert fmt.decode_info(members(kept.samples[0])[fmt.INFO_EXT])["has_audio"] == 0
    strict = process_job(job, ShardParams(short_side=64, audio_required=True))
    assert strict.reason == "corrupt_stream"
    assert strict.detail.startswith("audio: 10 decode error(s): Error while decoding stream #0:1")


def test_rotation_90_swaps_width_and_height(media_dir: Path) -> None:
    result = process_job(job_for(media_dir, "edge/rotated_90.mov"), ShardParams(short_side=64, min_frames=2))
    assert result.ok, result.detail
    assert result.meta["source"]["video"]["width"] > result.meta["source"]["video"]["height"]
    assert (result.meta["width"], result.meta["height"]) == (64, 114)  # 568x320 turned upright


def test_vfr_rotated_video_comes_out_upright_and_constant_rate(media_dir: Path, tmp_path: Path) -> None:
    params = ShardParams(short_side=128)
    result = process_job(job_for(media_dir, "edge/fire2.mp4"), params)
    assert result.ok and result.meta["source"]["video"]["rotation"] == 180
    seg = tmp_path / "seg.webm"
    seg.write_bytes(members(result.samples[0])["webm"])
    size = (result.meta["width"], result.meta["height"])
    ours = first_frame_rgb(seg).astype(np.float64)
    reference = first_frame_rgb(media_dir / "edge/fire2.mp4", size).astype(np.float64)  # autorotated
    upright = np.mean((ours - reference) ** 2)
    turned = np.mean((ours - reference[::-1, ::-1]) ** 2)
    assert upright * 5 < turned, (upright, turned)
    # constant rate: every packet lasts 1/fps (WebM stores milliseconds)
    pts = [float(p["pts_time"]) for p in ffprobe(seg, "-show_entries", "packet=pts_time")["packets"]]
    steps = np.diff(sorted(pts))
    assert len(pts) == result.meta["frames"] and np.all(
        np.abs(steps - 1 / Fraction(result.meta["fps"])) < 1e-3
    )


def test_two_runs_give_identical_members(media_dir: Path) -> None:
    for params in (SMALL, ShardParams(short_side=64, codec="h264")):
        job = job_for(media_dir, "edge/chaplin.mp4")
        first, second = process_job(job, params), process_job(job, params)
        assert first.ok and first.samples == second.samples and first.meta == second.meta


def test_h264_segments(media_dir: Path, tmp_path: Path) -> None:
    result = process_job(
        job_for(media_dir, "edge/big_buck_bunny_small.mp4"), ShardParams(short_side=64, codec="h264")
    )
    assert result.ok and len(result.samples) == 3
    for i, sample in enumerate(result.samples):
        parts = members(sample)
        assert "webm" not in parts
        seg = tmp_path / f"{i}.mp4"
        seg.write_bytes(parts["mp4"])
        assert b"moov" in parts["mp4"][:64]  # faststart: playable as a stream
        probe_out = ffprobe(
            seg, "-count_frames", "-show_entries", "stream=codec_name,nb_read_frames:packet=flags"
        )
        flags = [p["flags"].startswith("K") for p in probe_out["packets"]]
        assert probe_out["streams"][0]["codec_name"] == "h264"
        assert (
            int(probe_out["streams"][0]["nb_read_frames"])
            == fmt.decode_info(parts[fmt.INFO_EXT])["num_frames"]
        )
        assert flags == [n % 16 == 0 for n in range(len(flags))]  # closed GOP of 16, a keyframe first


def test_trim_to_annotated_range(media_dir: Path) -> None:
    rel = "kinetics/using segway/R6llTwEh07w_000000_000010.mp4"  # 30 fps, audio
    result = process_job(job_for(media_dir, rel, start=2.0, end=4.0), SMALL)
    assert result.ok and result.meta["frames"] == 60 and result.meta["audio_samples"] == 32_000
    assert result.meta["trim"] == [2.0, 4.0]
    past_end = process_job(job_for(media_dir, rel, start=12.0, end=14.0), SMALL)
    assert past_end.reason == "too_short" and "trimmed" in past_end.detail


def test_labels_and_extra_fields_reach_the_metadata(media_dir: Path) -> None:
    job = job_for(media_dir, "hmdb51/wave/TrumanShow_wave_f_nm_np1_fr_med_26.avi", index=7, label="wave")
    job = Job(**{**job.__dict__, "class_index": 3, "extra": (("split", 1), ("role", "train"))})
    (sample,) = process_job(job, SMALL).samples
    parts = members(sample)
    doc = json.loads(parts[fmt.META_EXT])
    assert parts[fmt.CLS_EXT] == b"3" and fmt.decode_info(parts[fmt.INFO_EXT])["label"] == 3
    assert (doc["label"], doc["class_index"], doc["split"], doc["role"], doc["set"]) == (
        "wave",
        3,
        1,
        "train",
        "test",
    )
    assert sample[0][0] == f"{fmt.make_key(7, job.name, 0)}.{fmt.CLS_EXT}"


def test_attached_picture_is_not_a_video_stream(tmp_path: Path, media_dir: Path) -> None:
    song = tmp_path / "song.mp3"
    subprocess.run(
        ["ffmpeg", "-nostdin", "-v", "error", "-f", "lavfi", "-i", "sine=frequency=440:duration=1",
         "-f", "lavfi", "-i", "color=red:size=32x32:duration=0.04", "-map", "0", "-map", "1",
         "-c:v", "mjpeg", "-disposition:v", "attached_pic", "-frames:v", "1", str(song)],
        check=True,
    )  # fmt: skip
    streams = ffprobe(song, "-show_streams")["streams"]
    assert [(s["codec_type"], s["disposition"]["attached_pic"]) for s in streams] == [
        ("audio", 0),
        ("video", 1),
    ]
    assert probe(song)["video"] is None
    job = Job("test", 0, str(song), "song")
    result = process_job(job, SMALL)
    assert result.reason == "no_video_stream" and "audio" in result.detail
    audio = process_job(Job("test", 0, str(song), "song", audio_only=True), SMALL)
    assert audio.ok and len(audio.samples) == 1 and audio.meta["has_audio"]
    assert (
        process_job(job_for(media_dir, "edge/h264_no_audio.mp4", audio_only=True), SMALL).reason == "no_audio"
    )


def test_timeout_is_a_reason(media_dir: Path) -> None:
    result = process_job(job_for(media_dir, "edge/cockatoo.mp4"), ShardParams(short_side=64, timeout_s=0.05))
    assert result.reason == "timeout" and REASON_KINDS[result.reason] == "transient"


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full (Linux)")
def test_a_full_disk_under_ffmpeg_is_disk_full_though_ffmpeg_exits_0(media_dir: Path, tmp_path: Path) -> None:
    """The real pass of one clip, its audio output on a device that is always full (ENOSPC): ffmpeg exits 0
    with truncated outputs, and only its stderr says so (before, such a clip was stored as if whole)."""
    job = job_for(media_dir, "edge/big_buck_bunny_432_433.webm")
    summary = probe_summary(job.path, 60)
    fps = output_fps(summary, SMALL)
    size = output_size(
        **{k: summary["video"][k] for k in ("width", "height", "sar", "rotation")}, short_side=64
    )
    (tmp_path / AUDIO_FILE).symlink_to("/dev/full")
    code, stderr = run_ffmpeg(build_command(job.path, summary, job, SMALL, fps, size), str(tmp_path), 60)
    assert code == 0
    with pytest.raises(MediaFailure) as failed:
        check_ffmpeg(code, stderr, job, summary, audio_required=False)
    assert failed.value.reason == "disk_full" and REASON_KINDS["disk_full"] == "transient"
    assert failed.value.detail.endswith(f"{AUDIO_FILE}: No space left on device")


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full (Linux)")
def test_machine_limits_raised_in_python_are_transient_and_other_errors_are_not(tmp_path: Path) -> None:
    with pytest.raises(OSError) as full:
        Path("/dev/full").write_bytes(b"x" * 8192)  # ENOSPC, for real
    assert os_failure(full.value).reason == "disk_full"
    assert os_failure(MemoryError()).reason == "out_of_memory"
    with pytest.raises(OSError) as absent:
        (tmp_path / "missing" / "x").write_bytes(b"")
    assert os_failure(absent.value) is None  # ENOENT: the run stops, the file is not blamed


def test_probe_summary_and_errors(media_dir: Path) -> None:
    summary = probe(media_dir / "edge/fire2.mp4")
    assert summary["video"]["codec"] == "h264" and summary["video"]["rotation"] == 180
    assert summary["audio"] == {
        "index": 1, "codec": "aac", "sample_rate": 48000, "channels": 1, "channel_layout": "mono"
    }  # fmt: skip
    json.dumps(summary)
    assert probe(media_dir / "edge/no_duration.webm")["duration"] is None
    with pytest.raises(InputError, match=r"empty\.mp4: empty file"):
        probe(media_dir / "edge/empty.mp4")


# Files the in-process probe leaves to ffprobe: unreadable ones, an image (a container not checked against
# ffprobe), and one with subtitle tracks (newer libav leaves them out of the container duration).
FFPROBE_ONLY = {
    "edge/empty.mp4",
    "edge/truncated_R6llTwEh07w.mp4",
    "edge/jpeg_named_mp4.mp4",
    "edge/nasa_13013.mp4",
}


def test_pyav_summary_equals_ffprobe_summary_on_every_file(media_dir: Path) -> None:
    fallbacks = set()
    files = sorted(p for p in media_dir.rglob("*") if p.is_file())
    assert len(files) >= 29
    for path in files:
        rel = path.relative_to(media_dir).as_posix()
        try:
            reference: dict | tuple = summarize(run_ffprobe(path, 60))
        except MediaFailure as exc:
            reference = (exc.reason, exc.detail)
        fast = pyav_summary(path, 60)
        if fast is None:
            fallbacks.add(rel)
        else:
            for key in reference:
                assert fast[key] == reference[key], (rel, key)
            assert fast == reference, rel
        try:
            combined: dict | tuple = probe_summary(path, 60)
        except MediaFailure as exc:
            combined = (exc.reason, exc.detail)
        assert combined == reference, rel  # failures keep ffprobe's reason and detail text
    assert fallbacks == FFPROBE_ONLY
    assert pyav_summary(media_dir / "edge/fire2.mp4", 60)["video"]["rotation"] == 180
    assert pyav_summary(media_dir / "edge/rotated_90.mov", 60)["video"]["rotation"] == 90


# --- pure pieces --------------------------------------------------------------------------------


def test_output_size_matches_ffmpeg_scale_rounding() -> None:
    assert output_size(340, 256, "1:1", 0, 256) == (340, 256)
    assert output_size(1280, 720, "1:1", 180, 256) == (456, 256)  # 455.1 -> even
    assert output_size(568, 320, "1:1", 90, 256) == (256, 454)
    assert output_size(720, 576, "16:15", 0, 256) == (342, 256)  # anamorphic PAL 4:3 -> square pixels


def test_segment_list_parsing() -> None:
    fps = Fraction(30000, 1001)
    text = "seg0000.webm,0.000000,2.135000\nseg0001.webm,2.135000,4.271000\nseg0002.webm,4.271000,4.672000\n"
    assert segment_counts(text, fps, 64) == (
        ["seg0000.webm", "seg0001.webm", "seg0002.webm"],
        [0, 64, 128],
        [64, 64, 12],
    )
    with pytest.raises(Exception, match="ran out"):
        segment_counts("seg0000.webm,0.0,10.0\n", fps, 64)
    assert cut_frames(2.0, Fraction(30), 64).split(",")[:3] == ["64", "128", "192"]
    assert len(cut_frames(None, Fraction(30), 64)) <= 100_000


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"codec": "av1"}, "codec"),
        ({"short_side": 255}, "short_side"),
        ({"short_side": 0}, "short_side"),
        ({"fps": "abc"}, "fps"),
        ({"fps": 0}, "fps"),
        ({"gop": 0}, "gop"),
        ({"segment_frames": 40}, "segment_frames"),
        ({"crf": 70}, "crf"),
        ({"codec": "h264", "crf": 60}, "crf"),
        ({"speed": 9}, "speed"),
        ({"ffmpeg_threads": 0}, "ffmpeg_threads"),
        ({"min_frames": 100}, "min_frames"),
        ({"sample_rate": 22050}, "sample_rate"),
        ({"timeout_s": -1}, "timeout_s"),
    ],
)
def test_params_validation_names_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=rf"^{field}: "):
        ShardParams(**kwargs)


def test_params_defaults_and_dict() -> None:
    assert ShardParams().crf == 32 and ShardParams(codec="h264").crf == 23
    params = ShardParams(fps="30000/1001")
    assert params.fps == Fraction(30000, 1001)
    data = params.to_dict()
    assert data["fps"] == "30000/1001" and list(data) == sorted(data)
    assert json.loads(json.dumps(data)) == data
    assert ShardParams(fps=29.97).fps == Fraction(2997, 100)
    assert "timeout_s" in data and "timeout_s" not in params.to_dict(output_only=True)
