"""The speed options on CPU: channels-last, bf16 and fp16 autocast (fp16 with its GradScaler) and
torch.compile (inductor) each run a real XDC training step (`trainer.step.train_step` on the learner
`trainer.session` builds and wraps, both encoders at width 0.125, on real batches of the tiny shards) and a
real extraction pass (`trainer.extract.extract_features`), compared with eager fp32 from the same weights.

Tolerances, from the numerics and from the spread measured over 5 seeds x 3 batches (2-core AMD EPYC,
torch 2.13 CPU; max over the 15 cases in brackets):

- Extraction (encoders in eval mode) is well conditioned: a 1e-3 perturbation of the clip stays ~1e-3
  at every block. fp32 options differ from eager by float32 rounding only: per-row relative error
  [4.5e-6] <= FP32_FEATURES 5e-5. bf16 rounds every conv and matmul input to an 8-bit mantissa
  (relative 2^-9 per rounding; sqrt(18 layers) x 2 x 2^-9 ~ 1.7e-2 as a random walk) [1.3e-2] <=
  BF16_FEATURES 5e-2; fp16 has 11 bits, 8x finer [1.4e-3] <= FP16_FEATURES 1e-2.
- A training step is not: BatchNorm on batch statistics makes the randomly initialised encoders
  amplify any perturbation ~1.4x per residual block (a 1e-3 jitter of the clip is ~1e-1 at layer4 in
  training mode, measured in float64), and a ReLU whose input sits within rounding of 0 flips its
  gradient mask outright. So the loss and the heads' gradients (which see the pooled features) agree
  closely, the encoders' gradients only as far as that sensitivity allows:
  * fp32 options: loss [2.9e-6] <= 2e-5 relative; heads' gradients [1.5e-4] <= 1e-3 relative;
    encoders' gradients cosine [>= 0.989] >= 0.95 and norm ratio within 0.9..1.1 (fp32 eager itself
    is up to 2.4e-2 away from a float64 step: a single flipped ReLU mask).
  * bf16: loss [4.8e-3] <= 2e-2 relative; heads' gradients cosine [>= 0.988] >= 0.95. The video
    encoder's gradient has a cosine of only 0.24..0.62 with fp32's; that is what the fp32 step itself
    gives on the same clip jittered by 2^-9 (bf16's half ulp): 0.30..0.64. So each encoder's gradient
    is asserted against that jitter baseline, measured in the test: its distance to fp32's at most
    JITTER_FACTOR x the jitter's, plus a norm ratio within 0.5..2 (a lost unscale or a dropped path
    is far outside both).
- fp16 is tested for its GradScaler: a step whose scaled gradients overflow is skipped (every weight
  unchanged) and halves the scale; a normal step updates every weight, keeps the scale, and its
  unscaled gradient is fp32's (heads [2.8e-2] <= 0.1 relative; encoders' norm ratio within 0.5..2).
"""

from __future__ import annotations

import copy
import math
import types
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from trainer import distributed, session
from trainer.data import ClipSpec, Runtime, ShardSet, find_shards, train_loader
from trainer.extract import extract_features, read_catalog
from trainer.models import prepare_for_speed, r2plus1d_18
from trainer.optim import build_optimizer
from trainer.step import LabelTables, Learner, make_scaler, train_step
from xdctools.recipe import Recipe, parse_recipe

CPU = torch.device("cpu")
K = 3
BATCH = 4
CLIP = ClipSpec(length=4, crop=64)
EXTRACT_BATCH = 6  # 18 segments: 3 equal batches (a compiled encoder recompiles for a shorter one)
PARTS = {"video": "encoders.video.", "audio": "encoders.audio.", "heads": "heads."}

FP32_LOSS, FP32_HEADS, FP32_COSINE, FP32_NORM, FP32_FEATURES = 2e-5, 1e-3, 0.95, (0.9, 1.1), 5e-5
BF16_LOSS, BF16_HEADS_COSINE, BF16_FEATURES, JITTER_FACTOR = 2e-2, 0.95, 5e-2, 2.0
FP16_HEADS, FP16_FEATURES, LOOSE_NORM = 0.1, 1e-2, (0.5, 2.0)


def speed_recipe(shards: Path, seed: int = 0, **model) -> Recipe:
    """An XDC recipe on the tiny shards with the given model speed options."""
    doc = {
        "name": "speed",
        "method": "xdc",
        "seed": seed,
        "data": {"shards": str(shards), "clip_frames": 4, "crop": 64, "short_side": 64, "num_threads": 1},
        "model": {"width": 0.125, **model},
        "clustering": {"k": K},
        "optim": {"epoch_size": BATCH, "batch_size": BATCH, "lr": 0.1, "step_epochs": 1, "total_epochs": 1},
        "run": {"out": "unused"},
    }
    return parse_recipe(yaml.safe_dump(doc))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Torch on one thread here: on a shared 2-core machine, parallel regions wait for the busy other
    core (bf16 extraction of the tiny set: 4 s on 1 thread, 11-12 s on 2)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@dataclass
class Data:
    root: Path
    shards: ShardSet
    tables: LabelTables
    batches: list[dict[str, torch.Tensor]]


@pytest.fixture(scope="module")
def data(tiny_shards: Path) -> Data:
    """Real training batches of the tiny set; each head learns the videos' classes, one video held out."""
    shards = find_shards(tiny_shards, "train")
    catalog = read_catalog(shards)
    held = session.held_out_videos(catalog.num_videos, 0.2, 0)
    labels = {("video", "other"): catalog.labels, ("audio", "other"): (catalog.labels + 1) % K}
    tables = LabelTables(catalog.videos, labels, held)
    batches = [
        next(iter(train_loader(shards, batch_size=BATCH, epoch_size=BATCH, clip=CLIP, run=Runtime(seed=s))))
        for s in range(2)
    ]
    return Data(tiny_shards, shards, tables, batches)


@dataclass
class Learned:
    recipe: Recipe
    learner: Learner
    model: torch.nn.Module  # what train_step calls (the learner: one process)


def build(data: Data, seed: int = 0, **model) -> Learned:
    """The learner `xdctools train` builds for these options, wrapped as the loop wraps it."""
    recipe = speed_recipe(data.root, seed, **model)
    learner = session.build_learner(recipe, {"video": K, "audio": K})
    return Learned(recipe, learner, session.wrap_for_training(learner, recipe, distributed.Dist()))


@dataclass
class Step:
    loss: np.ndarray  # (heads,) mean training loss of each head
    grads: dict[str, torch.Tensor]  # float64 copies of every parameter's gradient
    moved: dict[str, bool]  # whether the optimizer changed each parameter


def step(
    run: Learned,
    data: Data,
    batch: dict[str, torch.Tensor],
    start: dict[str, torch.Tensor],
    scaler: torch.amp.GradScaler | None = None,
) -> Step:
    """One `train_step` from the weights `start` with a fresh optimizer, as the loop takes it."""
    run.learner.load_state_dict(start)
    run.learner.train()
    optimizer = build_optimizer(run.learner.parameters(), run.recipe.optim)
    before = {n: p.detach().clone() for n, p in run.learner.named_parameters()}
    precision = run.recipe.model.precision
    stats = train_step(
        run.model,
        optimizer,
        make_scaler(CPU, precision) if scaler is None else scaler,
        batch,
        data.tables.batch(batch["index"], CPU),
        device=CPU,
        precision=precision,
        channels_last=run.recipe.model.channels_last,
    )
    params = dict(run.learner.named_parameters())
    return Step(
        (stats[:, 0] / stats[:, 1]).double().numpy(),
        {n: p.grad.detach().double().clone() for n, p in params.items()},
        {n: not torch.equal(p.detach(), before[n]) for n, p in params.items()},
    )


def features(run: Learned, data: Data, out: Path, start: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """Every video's pooled features from the weights `start`, extracted as the loop extracts them."""
    run.learner.load_state_dict(start)
    store = extract_features(
        dict(run.learner.encoders),
        data.shards,
        out,
        batch_size=EXTRACT_BATCH,
        clip=CLIP,
        run=Runtime(seed=run.recipe.seed),
        device=CPU,
        precision=run.recipe.model.precision,
        channels_last=run.recipe.model.channels_last,
    )
    return {m: store.read(m, 0, store.n).astype(np.float64) for m in store.modalities}


def flat(grads: dict[str, torch.Tensor], prefix: str) -> torch.Tensor:
    return torch.cat([g.flatten() for n, g in grads.items() if n.startswith(prefix)])


def compare(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], prefix: str) -> dict[str, float]:
    """`a` against the reference `b` over the parameters under `prefix`: relative error, cosine, norms."""
    x, y = flat(a, prefix), flat(b, prefix)
    return {
        "error": ((x - y).norm() / y.norm()).item(),
        "cosine": (x @ y / (x.norm() * y.norm())).item(),
        "norm_ratio": (x.norm() / y.norm()).item(),
    }


def row_error(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> dict[str, float]:
    """Per modality, the largest per-video relative distance of the features `a` to the reference `b`."""
    return {m: float((np.linalg.norm(a[m] - b[m], axis=1) / np.linalg.norm(b[m], axis=1)).max()) for m in b}


def set_scale(scaler: torch.amp.GradScaler, scale: float) -> None:
    """What restoring a checkpoint does to the scaler (`trainer.state.restore`), with another scale."""
    scaler.load_state_dict({**scaler.state_dict(), "scale": scale})


def jittered(batch: dict[str, torch.Tensor], seed: int, scale: float) -> dict[str, torch.Tensor]:
    """The batch with its clips and spectrograms multiplied by (1 + scale * N(0, 1))."""
    gen = torch.Generator().manual_seed(seed)
    return {
        k: v * (1 + scale * torch.randn(v.shape, generator=gen)) if k in ("video", "audio") else v
        for k, v in batch.items()
    }


def check_fp32_agreement(fast: Step, ref: Step, what: str) -> None:
    np.testing.assert_allclose(fast.loss, ref.loss, rtol=FP32_LOSS, err_msg=f"{what}: loss")
    heads = compare(fast.grads, ref.grads, PARTS["heads"])
    assert heads["error"] <= FP32_HEADS, f"{what}: heads' gradient {heads}"
    for part in ("video", "audio"):
        s = compare(fast.grads, ref.grads, PARTS[part])
        assert s["cosine"] >= FP32_COSINE, f"{what}: {part} encoder gradient {s}"
        assert FP32_NORM[0] <= s["norm_ratio"] <= FP32_NORM[1], f"{what}: {part} encoder gradient {s}"
    assert all(fast.moved.values()), f"{what}: the step left {[n for n, m in fast.moved.items() if not m]}"


# --- fp32 options: channels-last, compile ---------------------------------------------------------


def test_channels_last_steps_and_extracts_as_fp32_eager(data: Data, tmp_path: Path) -> None:
    eager, fast = build(data), build(data, channels_last=True)
    video = fast.learner.encoders["video"]
    assert video.stem[0].weight.is_contiguous(memory_format=torch.channels_last_3d)  # on CPU too
    assert fast.learner.encoders["audio"].conv1.weight.is_contiguous(memory_format=torch.channels_last)
    start = copy.deepcopy(eager.learner.state_dict())
    errors = row_error(
        features(fast, data, tmp_path / "cl.zarr", start),
        features(eager, data, tmp_path / "fp32.zarr", start),
    )
    assert max(errors.values()) <= FP32_FEATURES, errors
    for i, batch in enumerate(data.batches):
        check_fp32_agreement(step(fast, data, batch, start), step(eager, data, batch, start), f"batch {i}")
    # the trained weights keep the layout (the optimizer updates them in place)
    assert video.stem[0].weight.is_contiguous(memory_format=torch.channels_last_3d)


@pytest.mark.slow
def test_compiled_encoders_step_and_extract_as_eager(data: Data, tmp_path: Path) -> None:
    """inductor's C++ kernels on CPU: one compilation for the training step (forward and backward of both
    encoders), one for extraction (eval mode, inference); the second batch reuses the first's code."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    eager, fast = build(data), build(data, compile=True)
    for encoder in fast.learner.encoders.values():
        assert isinstance(encoder.forward_features, types.MethodType)
        assert encoder.forward_features.__self__ is encoder  # compiled in place, not wrapped
    assert list(fast.learner.state_dict()) == list(eager.learner.state_dict())  # checkpoint keys kept
    start = copy.deepcopy(eager.learner.state_dict())
    ref_steps = [step(eager, data, batch, start) for batch in data.batches]
    first = step(fast, data, data.batches[0], start)
    graphs = counters["stats"]["unique_graphs"]
    assert graphs >= 2  # both encoders went through inductor
    second = step(fast, data, data.batches[1], start)
    assert counters["stats"]["unique_graphs"] == graphs, "the second step recompiled"
    for i, (fast_step, ref) in enumerate(zip((first, second), ref_steps, strict=True)):
        check_fp32_agreement(fast_step, ref, f"batch {i}")
    errors = row_error(
        features(fast, data, tmp_path / "c.zarr", start), features(eager, data, tmp_path / "e.zarr", start)
    )
    assert max(errors.values()) <= FP32_FEATURES, errors
    assert counters["stats"]["unique_graphs"] > graphs  # extraction ran compiled code of its own


def test_compile_changes_the_encoder_in_place() -> None:
    """No compilation runs here: what `prepare_for_speed(compile=True)` leaves behind."""
    torch.manual_seed(0)
    model = r2plus1d_18(width=0.125)
    keys = list(model.state_dict())
    same = prepare_for_speed(model, compile=True)
    assert same is model and list(model.state_dict()) == keys  # no `_orig_mod.` prefix
    assert model.forward_features.__self__ is model
    twin = copy.deepcopy(model)  # a deep copy runs its own weights, never the original's
    assert twin.forward_features.__self__ is twin
    assert twin.forward_features.__func__ is model.forward_features.__func__


# --- bf16 ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("channels_last", [False, True], ids=["bf16", "bf16+channels-last"])
def test_bf16_steps_and_extracts_as_fp32_within_its_rounding(
    data: Data, tmp_path: Path, channels_last: bool
) -> None:
    """bf16 autocast on CPU, alone and with channels-last (the GPU recipes' pair)."""
    eager, fast = build(data), build(data, precision="bf16", channels_last=channels_last)
    start = copy.deepcopy(eager.learner.state_dict())
    errors = row_error(
        features(fast, data, tmp_path / "b.zarr", start), features(eager, data, tmp_path / "e.zarr", start)
    )
    assert max(errors.values()) <= BF16_FEATURES, errors
    assert max(errors.values()) > 2**-12, errors  # it did run in bf16
    for i, batch in enumerate(data.batches):
        ref, low = step(eager, data, batch, start), step(fast, data, batch, start)
        # the same fp32 step on the clip jittered by bf16's half ulp: how far rounding alone moves it
        jitter = step(eager, data, jittered(batch, i, 2**-9), start)
        np.testing.assert_allclose(low.loss, ref.loss, rtol=BF16_LOSS, err_msg=f"batch {i}: loss")
        heads = compare(low.grads, ref.grads, PARTS["heads"])
        assert heads["cosine"] >= BF16_HEADS_COSINE, f"batch {i}: heads' gradient {heads}"
        for part in ("video", "audio"):
            s, base = (
                compare(low.grads, ref.grads, PARTS[part]),
                compare(jitter.grads, ref.grads, PARTS[part]),
            )
            assert s["error"] <= JITTER_FACTOR * base["error"], f"batch {i}: {part}: bf16 {s}, jitter {base}"
            assert LOOSE_NORM[0] <= s["norm_ratio"] <= LOOSE_NORM[1], f"batch {i}: {part}: {s}"
        assert all(low.moved.values())


# --- fp16 and its GradScaler -----------------------------------------------------------------------


def test_fp16_scaler_skips_an_overflowing_step_and_halves_its_scale(data: Data, tmp_path: Path) -> None:
    eager, fast = build(data), build(data, precision="fp16")
    start = copy.deepcopy(eager.learner.state_dict())
    errors = row_error(
        features(fast, data, tmp_path / "h.zarr", start), features(eager, data, tmp_path / "e.zarr", start)
    )
    assert 2**-15 < max(errors.values()) <= FP16_FEATURES, errors
    batch = data.batches[0]
    scaler = make_scaler(CPU, "fp16")
    assert scaler.is_enabled() and scaler.get_scale() == 2.0**16
    assert not make_scaler(CPU, "bf16").is_enabled() and not make_scaler(CPU, "fp32").is_enabled()

    # 2^40 x a loss of ~1 is far past fp16's largest number (65504): the gradients overflow
    set_scale(scaler, 2.0**40)
    skipped = step(fast, data, batch, start, scaler)
    assert not any(skipped.moved.values()), "an overflowing step changed weights"
    assert not all(math.isfinite(g.sum().item()) for g in skipped.grads.values())
    assert scaler.get_scale() == 2.0**39  # halved (backoff factor 0.5)

    # a scale the gradients fit under: the step is taken and the scale stays
    set_scale(scaler, 2.0**8)
    taken = step(fast, data, batch, start, scaler)
    ref = step(eager, data, batch, start)
    assert all(taken.moved.values()) and scaler.get_scale() == 2.0**8
    assert all(torch.isfinite(g).all() for g in taken.grads.values())
    heads = compare(taken.grads, ref.grads, PARTS["heads"])  # unscaled: fp32's gradient
    assert heads["error"] <= FP16_HEADS, heads
    for part in ("video", "audio"):
        s = compare(taken.grads, ref.grads, PARTS[part])
        assert LOOSE_NORM[0] <= s["norm_ratio"] <= LOOSE_NORM[1], f"{part}: {s}"
