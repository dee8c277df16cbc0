"""Encoders: torchvision equivalence, both weight layouts, strict loading, shapes, heads, speed options."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from torch import nn

from trainer.models import (
    Classifier,
    LinearHead,
    MultiHead,
    autocast,
    detect_layout,
    load_video_weights,
    memory_format_of,
    prepare_for_speed,
    r2plus1d_18,
    read_checkpoint,
    resnet18_audio,
    video_model_for,
)
from xdctools.errors import ConfigError, DataError, InputError

XDC_CONV2 = {"layer2.0.conv2": 288, "layer3.0.conv2": 576, "layer4.0.conv2": 1152}
TORCHVISION_CONV2 = {"layer2.0.conv2": 230, "layer3.0.conv2": 460, "layer4.0.conv2": 921}


def fill_by_rule(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The fixture's fill rule, applied in sorted key order with one seeded generator."""
    gen = torch.Generator().manual_seed(0)
    out = dict(state)
    for key in sorted(state):
        t = state[key]
        if not t.is_floating_point():
            continue
        r = torch.randn(t.shape, generator=gen, dtype=torch.float32)
        if key.endswith("running_var"):
            out[key] = 1 + 0.1 * r.abs()
        elif t.dim() > 1:
            out[key] = r * (2 / (t.numel() / t.shape[0])) ** 0.5
        elif key.endswith("weight"):
            out[key] = 1 + 0.1 * r
        else:
            out[key] = 0.1 * r
    return out


@pytest.fixture(scope="module")
def reference(shared_dir: Path) -> dict:
    return json.loads((shared_dir / "fixtures" / "torchvision_r2plus1d_18_reference.json").read_text())


@pytest.fixture(scope="module")
def small_state() -> dict[str, torch.Tensor]:
    """A width-0.25 torchvision-layout state dict with 10 classes and non-default values."""
    return fill_by_rule(r2plus1d_18(width=0.25, num_classes=10).state_dict())


def test_matches_torchvision_layer_for_layer(reference: dict) -> None:
    model = r2plus1d_18(num_classes=400).eval()
    state = model.state_dict()
    assert {k: list(v.shape) for k, v in state.items()} == reference["state_dict_shapes"]
    assert list(state) == list(reference["state_dict_shapes"])
    assert sum(p.numel() for p in model.parameters()) == reference["num_parameters"]
    model.load_state_dict(fill_by_rule(state), strict=True)
    x = torch.randn(2, 3, 8, 112, 112, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(x)
    expected = torch.tensor(reference["logits"])
    assert logits.shape == expected.shape == (2, 400)
    # The fixture's logits are rounded to 5 decimals: compare relative to the logits' scale.
    assert ((logits - expected).norm() / expected.norm()).item() < 1e-4
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())
    assert detect_layout(state) == "torchvision"


def test_xdc_layout_differs_only_in_three_mid_channel_counts() -> None:
    tv = r2plus1d_18().state_dict()
    xdc = r2plus1d_18(layout="xdc").state_dict()
    assert list(tv) == list(xdc)
    differing = {".".join(k.split(".")[:3]) for k in tv if tv[k].shape != xdc[k].shape}
    assert differing == set(XDC_CONV2)
    for conv, mid in XDC_CONV2.items():
        assert xdc[f"{conv}.0.0.weight"].shape[0] == mid
        assert xdc[f"{conv}.0.3.weight"].shape[1] == mid
        assert xdc[f"{conv}.0.1.running_var"].shape == (mid,)
        assert tv[f"{conv}.0.0.weight"].shape[0] == TORCHVISION_CONV2[conv]


def test_xdc_checkpoint_round_trip(tmp_path: Path) -> None:
    source = r2plus1d_18(layout="xdc", num_classes=400)
    state = fill_by_rule(source.state_dict())
    path = tmp_path / "xdc.pth"
    # As a DDP training script would save it: a container and "module." prefixes.
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}, path)

    assert detect_layout(read_checkpoint(path)) == "xdc"
    model = video_model_for(path, bn_eps=1e-3)
    assert model.layout == "xdc" and model.fc is None and model.feature_dim == 512
    assert model.stem[1].eps == 1e-3
    loaded = model.state_dict()
    for key, value in state.items():
        if not key.startswith("fc."):
            assert torch.equal(loaded[key], value), key

    with pytest.raises(DataError) as err:
        load_video_weights(r2plus1d_18(), path)
    message = err.value.message
    assert str(path) in message and "xdc-layout checkpoint" in message and "\n" not in message
    for conv, mid in XDC_CONV2.items():
        tv_mid = TORCHVISION_CONV2[conv]
        assert f"{conv}.0.0.weight: checkpoint [{mid}, " in message
        assert f"vs model [{tv_mid}, " in message


def test_wrong_shape_names_key_and_both_shapes(small_state: dict[str, torch.Tensor]) -> None:
    state = dict(small_state)
    state["layer3.1.conv1.0.3.weight"] = torch.zeros(64, 7, 3, 1, 1)
    model_shape = list(small_state["layer3.1.conv1.0.3.weight"].shape)
    with pytest.raises(DataError, match="shape") as err:
        load_video_weights(r2plus1d_18(width=0.25), state)
    expected = f"layer3.1.conv1.0.3.weight: checkpoint [64, 7, 3, 1, 1] vs model {model_shape}"
    assert expected in err.value.message
    assert err.value.exit_code == 5


def test_missing_and_unexpected_keys_are_named(small_state: dict[str, torch.Tensor]) -> None:
    state = {k: v for k, v in small_state.items() if k != "layer4.1.conv2.1.running_var"}
    state["layer5.0.weight"] = torch.zeros(3)
    with pytest.raises(DataError) as err:
        load_video_weights(r2plus1d_18(width=0.25), state)
    message = err.value.message
    assert "missing: layer4.1.conv2.1.running_var" in message
    assert "unexpected: layer5.0.weight" in message
    assert "shape" not in message


def test_missing_batch_counters_are_not_a_mismatch(small_state: dict[str, torch.Tensor]) -> None:
    state = {k: v for k, v in small_state.items() if not k.endswith("num_batches_tracked")}
    model = r2plus1d_18(width=0.25)
    assert load_video_weights(model, state) == "torchvision"
    assert torch.equal(model.state_dict()["layer1.0.conv1.1.weight"], state["layer1.0.conv1.1.weight"])


def test_fc_excluded_or_included_as_asked(small_state: dict[str, torch.Tensor]) -> None:
    model = r2plus1d_18(width=0.25, num_classes=5)
    fc_before = model.fc.weight.detach().clone()
    load_video_weights(model, small_state)  # the checkpoint's 10-class fc is ignored
    assert torch.equal(model.fc.weight, fc_before)
    assert torch.equal(model.layer4[1].conv2[1].bias, small_state["layer4.1.conv2.1.bias"])

    with pytest.raises(DataError, match=r"fc.weight: checkpoint \[10, 128\] vs model \[5, 128\]"):
        load_video_weights(model, small_state, include_fc=True)
    with pytest.raises(ConfigError, match="has no fc"):
        load_video_weights(r2plus1d_18(width=0.25), small_state, include_fc=True)

    model = r2plus1d_18(width=0.25, num_classes=10)
    load_video_weights(model, small_state, include_fc=True)
    assert torch.equal(model.fc.weight, small_state["fc.weight"])

    without_fc = {k: v for k, v in small_state.items() if not k.startswith("fc.")}
    with pytest.raises(DataError, match=re.escape("missing: fc.weight, fc.bias")):
        load_video_weights(model, without_fc, include_fc=True)

    rebuilt = video_model_for({"model": small_state}, include_fc=True)
    assert rebuilt.fc.out_features == 10 and rebuilt.feature_dim == 128
    assert torch.equal(rebuilt.fc.bias, small_state["fc.bias"])


def test_checkpoint_files_are_read_safely(tmp_path: Path, small_state: dict[str, torch.Tensor]) -> None:
    with pytest.raises(InputError, match=re.escape("missing.pth: checkpoint not found")):
        read_checkpoint(tmp_path / "missing.pth")
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(DataError, match=re.escape("garbage.pth: cannot read checkpoint")):
        read_checkpoint(garbage)
    # weights_only=True refuses arbitrary pickled objects instead of running their code.
    pickled = tmp_path / "pickled.pth"
    torch.save({"state_dict": small_state, "head": nn.Linear(2, 2)}, pickled)
    with pytest.raises(DataError, match=re.escape("pickled.pth: cannot read checkpoint")):
        read_checkpoint(pickled)
    compiled_names = tmp_path / "compiled.pth"
    torch.save({"model": {f"_orig_mod.{k}": v for k, v in small_state.items()}}, compiled_names)
    assert read_checkpoint(compiled_names).keys() == small_state.keys()
    optimizer_only = tmp_path / "optimizer.pth"
    torch.save({"optimizer": {"lr": 0.1}, "epoch": 2}, optimizer_only)
    with pytest.raises(DataError, match=re.escape("optimizer.pth: no state dict of tensors found")):
        read_checkpoint(optimizer_only)
    with pytest.raises(DataError, match=re.escape("not an R(2+1)D state dict")):
        detect_layout(resnet18_audio(width=0.25).state_dict())


def test_small_video_model_forward() -> None:
    model = r2plus1d_18(width=0.25).eval()
    assert model.feature_dim == 128 and model.fc is None
    assert model.stem[0].out_channels == 11 and model.layer1[0].conv1[0][0].out_channels == 36
    with torch.no_grad():
        features = model(torch.randn(1, 3, 8, 64, 64))
    assert features.shape == (1, 128) and torch.isfinite(features).all()


def test_audio_model_shapes() -> None:
    model = resnet18_audio().eval()
    sizes: list[tuple[int, ...]] = []
    model.layer4.register_forward_hook(lambda _m, _i, out: sizes.append(tuple(out.shape[1:])))
    with torch.no_grad():
        features = model(torch.randn(2, 1, 40, 100))
    assert features.shape == (2, 512) and model.feature_dim == 512
    assert sizes == [(512, 3, 7)]  # no max-pool: layer4 keeps 3 frequency × 7 time cells

    small = resnet18_audio(width=0.25, maxpool=True, num_classes=7).eval()
    with torch.no_grad():
        assert small.forward_features(torch.randn(3, 1, 40, 100)).shape == (3, 128)
        assert small(torch.randn(3, 1, 40, 100)).shape == (3, 7)
    assert "conv1.weight" in small.state_dict() and "layer4.1.bn2.running_var" in small.state_dict()


def test_heads_reset_changes_weights_and_keeps_shapes() -> None:
    head = LinearHead(128, 16)
    with torch.no_grad():
        head.bias.fill_(1.0)
    before = head.weight.detach().clone()
    head.reset_()
    assert head.weight.shape == (16, 128) and not torch.equal(head.weight, before)
    assert torch.count_nonzero(head.bias) == 0
    assert head.weight.std().item() == pytest.approx(0.01, rel=0.1)

    heads = MultiHead(128, {"own": 16, "other": 32})
    out = heads(torch.randn(4, 128))
    assert list(out) == ["own", "other"] and out["own"].shape == (4, 16) and out["other"].shape == (4, 32)
    own, other = (heads.heads[n].weight.detach().clone() for n in ("own", "other"))
    heads.reset_(["other"])
    assert torch.equal(heads.heads["own"].weight, own) and not torch.equal(heads.heads["other"].weight, other)
    heads.reset_()
    assert not torch.equal(heads.heads["own"].weight, own)
    with pytest.raises(ConfigError):
        MultiHead(128, {})


def test_gradients_flow_through_encoders_and_heads() -> None:
    for encoder, x in [
        (r2plus1d_18(width=0.25), torch.randn(2, 3, 4, 32, 32)),
        (resnet18_audio(width=0.25), torch.randn(2, 1, 40, 100)),
    ]:
        model = Classifier(encoder, MultiHead(encoder.feature_dim, {"own": 8, "other": 4}))
        out = model(x)
        loss = (
            nn.functional.cross_entropy(out["own"], torch.tensor([1, 2])) + out["other"].logsumexp(1).mean()
        )
        loss.backward()
        for name, p in model.named_parameters():
            assert p.grad is not None and torch.count_nonzero(p.grad) > 0, name


def test_speed_options_keep_outputs() -> None:
    model = r2plus1d_18(width=0.25).eval()
    x = torch.randn(1, 3, 4, 32, 32)
    with torch.no_grad():
        plain = model(x)
    fast = prepare_for_speed(model, channels_last=True)
    assert memory_format_of(fast) == torch.channels_last_3d
    assert fast.stem[0].weight.is_contiguous(memory_format=torch.channels_last_3d)
    with torch.no_grad():
        torch.testing.assert_close(fast(x.contiguous(memory_format=torch.channels_last_3d)), plain)
        dtypes: list[torch.dtype] = []
        fast.layer4.register_forward_hook(lambda _m, _i, out: dtypes.append(out.dtype))
        with autocast("cpu", "bf16"):
            low = fast(x)
    assert dtypes == [torch.bfloat16]  # convs ran in bf16; autocast pools in fp32
    torch.testing.assert_close(low.float(), plain, rtol=0.1, atol=0.1 * plain.abs().max().item())

    audio = prepare_for_speed(resnet18_audio(width=0.25), channels_last=True)
    assert audio.conv1.weight.is_contiguous(memory_format=torch.channels_last)


def test_bad_builder_arguments() -> None:
    with pytest.raises(ConfigError, match="width must be positive"):
        r2plus1d_18(width=0)
    with pytest.raises(ConfigError, match="layout must be"):
        r2plus1d_18(layout="caffe2")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="width must be positive"):
        resnet18_audio(width=-1)
