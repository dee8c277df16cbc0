"""DALI's `mixed` (GPU) video decoding equals the CPU decode, VP9 and H.264, within a stated tolerance.

The tolerance (gpu_helpers.decode_close, in 8-bit levels, measured and justified there): the codecs
decode bit-exactly, so the two paths may differ only in the YUV -> RGB conversion (chroma upsampling,
rounding), which leaves luma alone: luma 99.9th percentile <= 15 (same frames), luma mean <= 2.5 and RGB
mean <= 3.0 (same colours). References: DALI's own CPU decoder for VP9; for H.264, which DALI cannot
decode on the CPU, FFmpeg's planes (PyAV) converted exactly as DALI's CPU decoder converts
(gpu_helpers.yuv_to_rgb, checked against it in test_gpu_check_cpu.py). Each set's worst clip is recorded
with the conversion the GPU frames match best, so a failure says whether frames or colours differ.
"""

from __future__ import annotations

import gpu_helpers as H
import numpy as np
import pytest
import torch

SETS = ["synth-vp9", "synth-h264", "media-vp9", "media-h264"]


@pytest.mark.parametrize("name", SETS)
def test_mixed_decode_equals_cpu_decode(gpu_shards: dict, name: str) -> None:
    root = H.shard_set(gpu_shards, name)
    codec = name.rsplit("-", 1)[1]
    samples = [
        (seg, f) for seg in H.segments(root, limit=6) for f in H.clip_frames(seg["info"]["num_frames"])
    ]
    videos, frame_lists = [s["video"] for s, _ in samples], [f for _, f in samples]
    gpu = H.dali_decode(videos, frame_lists, "mixed")
    if codec == "vp9":
        refs, reference = H.dali_decode(videos, frame_lists, "cpu"), "DALI cpu decoder"
    else:
        refs = [H.reference_clip(v, f) for v, f in zip(videos, frame_lists, strict=True)]
        reference = "FFmpeg planes, DALI cpu conversion"
    diffs = []
    for got, ref, f in zip(gpu, refs, frame_lists, strict=True):
        assert got.shape == ref.shape == (len(f), *ref.shape[1:]), f"{name}: {got.shape} vs {ref.shape}"
        diffs.append(H.pixel_difference(got, ref))
    worst = max(range(len(diffs)), key=lambda i: (diffs[i]["luma_p999"], diffs[i]["mean"]))
    variant, fit = H.best_conversion(gpu[worst], videos[worst], frame_lists[worst])
    H.record(
        f"decode {name}",
        reference=reference,
        clips=len(samples),
        **{f"worst_{k}": v for k, v in diffs[worst].items()},
        rgb_mean_over_clips=float(np.mean([d["mean"] for d in diffs])),
        gpu_matches_best=variant,
        best_fit_rgb_mean=fit["mean"],
        best_fit_luma_p999=fit["luma_p999"],
    )
    bad = [i for i, d in enumerate(diffs) if not H.decode_close(d)]
    if fit["luma_p999"] <= H.LUMA_P999_MAX:
        diagnosis = f"the frames are right: they match the {variant} conversion of FFmpeg's planes"
    else:
        diagnosis = (
            f"no standard conversion of these frames matches (best: {variant}): wrong or corrupt frames"
        )
    assert not bad, (
        f"{name}: {len(bad)} of {len(diffs)} clips differ from the {reference} beyond tolerance; worst "
        f"(segment {samples[worst][0]['key']}, from frame {frame_lists[worst][0]}): "
        f"{H.describe(diffs[worst])}; {diagnosis} ({H.describe(fit)})"
    )


def _rows(loader) -> dict[str, torch.Tensor]:
    batches = list(loader)
    return {k: torch.cat([b[k].cpu() for b in batches]) for k in batches[0]}


def test_gpu_loader_equals_cpu_loader_vp9(gpu_shards: dict) -> None:
    """The trainer's extraction loader (centred clip, centre crop, normalised) on `gpu` vs `cpu`."""
    from trainer.data import KINETICS_MEAN, KINETICS_STD, ClipSpec, Runtime, extract_loader, find_shards

    shards = find_shards(H.shard_set(gpu_shards, "synth-vp9"), "train")
    clip = ClipSpec(crop=112)
    gpu = _rows(extract_loader(shards, batch_size=8, clip=clip, run=Runtime(device="gpu", num_threads=4)))
    cpu = _rows(extract_loader(shards, batch_size=8, clip=clip, run=Runtime(device="cpu", num_threads=4)))
    for key in ("index", "segment", "frame", "label"):
        assert torch.equal(gpu[key], cpu[key]), key
    torch.testing.assert_close(gpu["audio"], cpu["audio"], rtol=0, atol=1e-6)
    diff = H.pixel_difference(
        H.levels(gpu["video"].numpy(), KINETICS_MEAN, KINETICS_STD),
        H.levels(cpu["video"].numpy(), KINETICS_MEAN, KINETICS_STD),
        channel_axis=1,
    )
    H.record("loader gpu vs cpu synth-vp9", clips=len(gpu["index"]), **diff)
    assert H.decode_close(diff), f"extraction loader, gpu vs cpu: {H.describe(diff)}"


def test_gpu_loader_h264_equals_reference(gpu_shards: dict) -> None:
    """The extraction loader on H.264 shards (GPU only) against FFmpeg's frames, converted and cropped
    as the CPU path would (the synthetic frames are 176x128: the centre 112 crop is at x 32, y 8)."""
    from trainer.data import KINETICS_MEAN, KINETICS_STD, ClipSpec, Runtime, extract_loader, find_shards

    root = H.shard_set(gpu_shards, "synth-h264")
    shards = find_shards(root, "train")
    segs = H.segments(root)
    loader = extract_loader(shards, batch_size=8, clip=ClipSpec(crop=112), run=Runtime(device="gpu"))
    batch = next(iter(loader))
    video = H.levels(batch["video"].cpu().numpy(), KINETICS_MEAN, KINETICS_STD)  # (B, 3, L, H, W)
    diffs = []
    for row, seg in enumerate(segs[: len(video)]):
        info = seg["info"]
        assert (info["video"], info["segment"]) == (int(batch["index"][row]), int(batch["segment"][row]))
        local = int(batch["frame"][row]) - info["start_frame"]
        ref = H.reference_clip(seg["video"], list(range(local, local + 8)))  # (L, 128, 176, 3)
        assert ref.shape[1:3] == (128, 176), ref.shape
        ref = ref[:, 8:120, 32:144].transpose(3, 0, 1, 2)  # (3, L, 112, 112)
        diffs.append(H.pixel_difference(video[row], ref, channel_axis=0))
    worst = max(diffs, key=lambda d: d["luma_p999"])
    H.record("loader gpu synth-h264 vs reference", clips=len(diffs), **worst)
    assert all(H.decode_close(d) for d in diffs), f"H.264 loader vs FFmpeg reference: {H.describe(worst)}"
