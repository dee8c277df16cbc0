"""Video checkpoints: read safely, detect the layout, load strictly (all but fc) or name what differs."""

from __future__ import annotations

import os
from collections.abc import Mapping
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trainer.models.audio import AudioResNet
from trainer.models.blocks import Layout, midplanes
from trainer.models.video import VideoResNet, r2plus1d_18
from xdctools.errors import ConfigError, DataError, InputError

StateDict = dict[str, torch.Tensor]
CheckpointLike = str | os.PathLike | Mapping[str, Any]

# Containers that training scripts wrap state dicts in, tried in this order.
CONTAINER_KEYS = ("state_dict", "model", "model_state_dict", "model_state")
# Prefixes added by DistributedDataParallel / DataParallel and by torch.compile.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
# The first block of layer2 is where the layouts differ (its conv2's mid channels).
LAYOUT_CONV1 = "layer2.0.conv1.0.0.weight"
LAYOUT_CONV2 = "layer2.0.conv2.0.0.weight"
MAX_LISTED = 30  # a layout mismatch differs in 18 tensors: list them all


def read_checkpoint(path: str | os.PathLike) -> StateDict:
    """Load a checkpoint file on CPU with `weights_only=True` (no code runs) and unwrap its state dict."""
    path = Path(path)
    return unwrap_state_dict(read_payload(path, full_error=True), source=str(path))


def read_payload(path: str | os.PathLike, *, full_error: bool = False) -> Any:
    """What a checkpoint file holds, as is: `torch.load` on CPU with `weights_only=True` (no code runs).

    InputError if the file is absent; DataError naming the first line of torch's error if it cannot be
    read, cut at 200 characters, or whole and chained to torch's error with `full_error`.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: checkpoint not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle, zip and weights_only errors all mean "unreadable"
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        if full_error:
            raise DataError(f"{path}: cannot read checkpoint ({reason})") from exc
        raise DataError(f"{path}: cannot read checkpoint ({reason[:200]})") from None


def unwrap_state_dict(obj: Any, *, source: str = "checkpoint") -> StateDict:
    """The tensor dict inside {"state_dict": ...}/{"model": ...} containers, without DDP/compile prefixes."""
    for _ in range(len(CONTAINER_KEYS) + 1):
        if not isinstance(obj, Mapping):
            break
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return _strip_prefixes(dict(obj))
        inner = next((obj[k] for k in CONTAINER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = inner
    if isinstance(obj, Mapping):
        keys = ", ".join(map(str, list(obj)[:8])) or "none"
        raise DataError(f"{source}: no state dict of tensors found (keys: {keys})")
    raise DataError(f"{source}: expected a state dict, found {type(obj).__name__}")


def _strip_prefixes(state: StateDict) -> StateDict:
    stripped = True
    while stripped:
        stripped = False
        for prefix in WRAPPER_PREFIXES:
            if all(k.startswith(prefix) for k in state):
                state = {k[len(prefix) :]: v for k, v in state.items()}
                stripped = True
    return state


def detect_layout(state: Mapping[str, torch.Tensor], *, source: str = "state dict") -> Layout:
    """Which layout a state dict has, from the mid channels of layer2.0.conv2 (works at any width)."""
    missing = [k for k in (LAYOUT_CONV1, LAYOUT_CONV2) if k not in state]
    if missing:
        raise DataError(f"{source}: not an R(2+1)D state dict (no {', '.join(missing)})")
    in_planes = state[LAYOUT_CONV1].shape[1]
    mid, planes = state[LAYOUT_CONV2].shape[:2]
    if mid == midplanes(in_planes, planes):
        return "torchvision"
    if mid == midplanes(planes, planes):
        return "xdc"
    raise DataError(
        f"{source}: {LAYOUT_CONV2} has {mid} mid channels, neither torchvision's "
        f"{midplanes(in_planes, planes)} nor XDC's {midplanes(planes, planes)}"
    )


def state_dict_diff(checkpoint: Mapping[str, torch.Tensor], model: Mapping[str, torch.Tensor]) -> str:
    """One line listing missing keys, unexpected keys and shape differences; "" when they match.

    A checkpoint without BatchNorm `num_batches_tracked` counters is not a mismatch: the counters only
    matter for momentum=None, and PyTorch itself fills them in for older state dicts.
    """
    missing = [k for k in model if k not in checkpoint and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in checkpoint if k not in model]
    shapes = [
        f"{k}: checkpoint {list(checkpoint[k].shape)} vs model {list(model[k].shape)}"
        for k in model
        if k in checkpoint and checkpoint[k].shape != model[k].shape
    ]
    parts = [
        f"{name}: {_listing(items)}"
        for name, items in [("missing", missing), ("unexpected", unexpected), ("shape", shapes)]
        if items
    ]
    return "; ".join(parts)


def _listing(items: list[str]) -> str:
    more = f" (+{len(items) - MAX_LISTED} more)" if len(items) > MAX_LISTED else ""
    return ", ".join(items[:MAX_LISTED]) + more


def _resolve(path_or_state: CheckpointLike) -> tuple[str, StateDict]:
    if isinstance(path_or_state, Mapping):
        return "state dict", unwrap_state_dict(path_or_state)
    return str(path_or_state), read_checkpoint(path_or_state)


def _is_fc(key: str) -> bool:
    return key.startswith("fc.")


def load_video_weights(
    model: nn.Module, path_or_state: CheckpointLike, *, include_fc: bool = False
) -> Layout:
    """Load a checkpoint into `model` strictly, all but `fc` unless include_fc; return its layout.

    Any missing or unexpected key or any shape difference raises DataError naming them all (the
    official XDC weights were loaded with strict=False upstream, which hides exactly that). With
    include_fc=False the model's fc (if any) keeps its values and the checkpoint's fc is ignored.
    """
    source, state = _resolve(path_or_state)
    return _load(model, state, source=source, include_fc=include_fc)


def _load(model: nn.Module, state: StateDict, *, source: str, include_fc: bool) -> Layout:
    layout = detect_layout(state, source=source)
    target = getattr(model, "_orig_mod", model)  # a torch.compile wrapper shares the parameters
    if include_fc and getattr(target, "fc", None) is None:
        raise ConfigError(f"{source}: include_fc=True but the model has no fc (build it with num_classes)")
    model_state = target.state_dict()
    if not include_fc:
        state = {k: v for k, v in state.items() if not _is_fc(k)}
        model_state = {k: v for k, v in model_state.items() if not _is_fc(k)}
    diff = state_dict_diff(state, model_state)
    if diff:
        model_layout = getattr(target, "layout", layout)
        hint = "" if model_layout == layout else f" ({model_layout}-layout model; use video_model_for)"
        raise DataError(f"{source}: {layout}-layout checkpoint does not match the model{hint}: {diff}")
    result = target.load_state_dict(state, strict=False)
    leftover = [k for k in result.missing_keys if not (_is_fc(k) or k.endswith("num_batches_tracked"))]
    if leftover or result.unexpected_keys:  # cannot happen after the diff above; kept as a guard
        raise DataError(f"{source}: keys not loaded: {_listing(leftover + result.unexpected_keys)}")
    return layout


def video_config(state: Mapping[str, torch.Tensor], *, source: str = "state dict") -> dict[str, Any]:
    """Builder arguments of `r2plus1d_18` matching a state dict: layout, planes, stem_mid, num_classes."""
    layout = detect_layout(state, source=source)
    keys = ["stem.0.weight"] + [f"layer{i}.0.conv1.1.weight" for i in range(1, 5)]
    missing = [k for k in keys if k not in state]
    if missing:
        raise DataError(f"{source}: not an R(2+1)D state dict (no {', '.join(missing)})")
    fc = state.get("fc.weight")
    return {
        "layout": layout,
        "planes": [state[k].shape[0] for k in keys[1:]],
        "stem_mid": state["stem.0.weight"].shape[0],
        "num_classes": None if fc is None else fc.shape[0],
    }


def video_model_for(
    path_or_state: CheckpointLike, *, include_fc: bool = False, bn_eps: float = 1e-5, **builder: Any
) -> VideoResNet:
    """Build the R(2+1)D-18 matching a checkpoint (layout, widths, classes) and load it.

    For the official XDC weights pass bn_eps=1e-3 (their Caffe2 origin); see `r2plus1d_18`.
    """
    source, state = _resolve(path_or_state)
    config = video_config(state, source=source)
    if include_fc and config["num_classes"] is None:
        raise DataError(f"{source}: include_fc=True but the checkpoint has no fc.weight")
    if not include_fc:
        config["num_classes"] = builder.pop("num_classes", None)
    model = r2plus1d_18(bn_eps=bn_eps, **config, **builder)
    _load(model, state, source=source, include_fc=include_fc)
    return model


def audio_model_for(
    state: StateDict, *, source: str, maxpool: bool = False, bn_eps: float = 1e-5
) -> nn.Module:
    """The audio ResNet-18 matching a state dict (channels read from it), loaded strictly (all but fc)."""
    keys = ["conv1.weight"] + [f"layer{i}.0.conv1.weight" for i in range(1, 5)]
    absent = [k for k in keys if k not in state or state[k].ndim != 4]
    if absent:
        hint = " (it holds a video encoder)" if "stem.0.weight" in state else ""
        raise DataError(f"{source}: not an audio ResNet state dict (no 4-D {', '.join(absent)}){hint}")
    planes = [int(state[k].shape[0]) for k in keys[1:]]
    model = AudioResNet(planes=planes, maxpool=maxpool, norm_layer=partial(nn.BatchNorm2d, eps=bn_eps))
    model.width = planes[0] / 64
    return _load_strict(model, state, source=source, what="audio ResNet-18")


def _load_strict(model: nn.Module, state: StateDict, *, source: str, what: str) -> nn.Module:
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    diff = state_dict_diff(state, {k: v for k, v in model.state_dict().items() if not k.startswith("fc.")})
    if diff:
        raise DataError(f"{source}: checkpoint does not fit the {what}: {diff}")
    model.load_state_dict(state, strict=False)
    return model
