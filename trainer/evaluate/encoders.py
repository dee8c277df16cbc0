"""The encoder a downstream run transfers: from a checkpoint (ours, official XDC, torchvision) or random.

The video R(2+1)D-18 for UCF101/HMDB51, the audio ResNet-18 for ESC-50 (recipe `data.modality`), from
a pretrained checkpoint or random (Scratch), with a fresh linear head (`LinearHead`) over its pooled
features. Modes (paper Table 4): `full` trains every parameter; `fc` freezes the encoder and keeps it
in eval mode, BatchNorm running statistics included, so only the linear classifier learns.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from trainer.models import Classifier, LinearHead, r2plus1d_18, resnet18_audio, video_model_for
from trainer.models.weights import StateDict, audio_model_for, detect_layout, read_payload, unwrap_state_dict
from xdctools.errors import DataError
from xdctools.eval_recipe import EvalRecipe

OFFICIAL_XDC_BN_EPS = 1e-3  # the released weights were converted from Caffe2, which used eps 1e-3


@dataclass(frozen=True)
class EncoderSource:
    """Where an encoder's weights came from, for the results and the digest."""

    # "scratch", "xdctools" (our training checkpoint), "state dict" (official XDC, torchvision, ...)
    kind: str
    path: str | None = None
    layout: str | None = None  # video layout of the weights
    bytes: int = 0


def encoder_state(payload: Any, modality: str, *, source: str) -> tuple[str, StateDict, dict[str, Any]]:
    """(kind, state dict of the `modality` encoder, its build config) from a loaded checkpoint.

    Our training checkpoints and `encoders.pt` (`trainer.checkpoint` format: {"format", "digest",
    "state": {"config", "model"}}, written by trainer.state and trainer.outcome) hold both encoders of a
    `Learner` under `encoders.video.` / `encoders.audio.`; a bare state dict (official XDC, torchvision,
    or saved by hand) holds one, possibly under "state_dict"/"model" containers and DDP prefixes, or a
    whole model's keys under `encoders.<modality>.` / `<modality>.`, which are then taken.
    """
    kind, config = "state dict", {}
    if isinstance(payload, Mapping) and "format" in payload and isinstance(payload.get("state"), Mapping):
        kind = "xdctools"
        inner = payload["state"]
        if not isinstance(inner.get("model"), Mapping):
            keys = ", ".join(sorted(map(str, inner)))
            raise DataError(
                f"{source}: training checkpoint without a 'model' state dict (state keys: {keys})"
            )
        config = dict(inner.get("config") or {})
        payload = inner["model"]
    state = unwrap_state_dict(payload, source=source)
    for prefix in (f"encoders.{modality}.", f"{modality}."):
        taken = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        if taken:
            return kind, taken, config
    if kind == "xdctools":
        raise DataError(
            f"{source}: training checkpoint holds no {modality} encoder (no encoders.{modality}.*)"
        )
    return kind, state, config


def build_encoder(recipe: EvalRecipe) -> tuple[nn.Module, EncoderSource]:
    """The encoder of `data.modality`, from `model.checkpoint` or random (Scratch), without any fc."""
    cfg, modality = recipe.model, recipe.data.modality
    if cfg.checkpoint is None:
        eps = cfg.bn_eps or 1e-5
        if modality == "video":
            model = r2plus1d_18(width=cfg.width, layout=cfg.video_layout, bn_eps=eps)
        else:
            model = resnet18_audio(width=cfg.width, maxpool=cfg.audio_maxpool, bn_eps=eps)
        return model, EncoderSource("scratch")
    path = Path(cfg.checkpoint)
    kind, state, config = encoder_state(read_payload(path), modality, source=str(path))
    size = path.stat().st_size
    if modality == "audio":
        eps = cfg.bn_eps or float(config.get("bn_eps", 1e-5))
        model = audio_model_for(state, source=str(path), maxpool=cfg.audio_maxpool, bn_eps=eps)
        return model, EncoderSource(kind, str(path), None, size)
    if "conv1.weight" in state and "stem.0.weight" not in state:
        raise DataError(f"{path}: holds an audio encoder (conv1.*), but data.modality is video")
    layout = detect_layout(state, source=str(path))
    official = kind == "state dict" and layout == "xdc"  # the released XDC weights: Caffe2's eps
    eps = cfg.bn_eps or float(config.get("bn_eps", OFFICIAL_XDC_BN_EPS if official else 1e-5))
    try:
        model = video_model_for(state, bn_eps=eps)
    except DataError as e:  # it names the source "state dict": name the file instead
        raise DataError(f"{path}: {e.message.removeprefix('state dict: ')}") from None
    model.fc = None  # a torchvision checkpoint's classifier is not transferred
    return model, EncoderSource(kind, str(path), layout, size)


def make_classifier(encoder: nn.Module, num_classes: int, mode: str, head_norm: bool = False) -> Classifier:
    """The encoder and a fresh linear head over its pooled features; with mode fc the encoder is frozen.

    `head_norm` puts a BatchNorm without affine parameters before the linear layer (MAE-style linear
    probing): features whose spread is tiny next to their mean (the digits XDC audio encoder: std 0.007
    around 0.23 on random inputs) are otherwise out of reach of a short SGD schedule. Not the paper's
    protocol. With fc the features are stationary, so the norm keeps the exact running average
    (momentum None): the default exponential one starts from variance 1 and after 48 steps still holds
    0.9**48 = 0.006 of it, 60x the true variance of such features, so test logits were all bias.
    """
    head: nn.Module = LinearHead(encoder.feature_dim, num_classes)
    if head_norm:
        exact = {"momentum": None} if mode == "fc" else {}
        head = nn.Sequential(nn.BatchNorm1d(encoder.feature_dim, affine=False, **exact), head)
    model = Classifier(encoder, head)
    if mode == "fc":
        freeze_encoder(model)
    return model


def freeze_encoder(model: Classifier) -> None:
    """fc-only transfer: no encoder parameter learns (and `set_mode` keeps its BatchNorm in eval)."""
    for p in model.encoder.parameters():
        p.requires_grad_(False)


def set_mode(model: Classifier, mode: str, *, training: bool) -> None:
    """train()/eval() for the mode: with `fc` the encoder stays in eval mode, so BN statistics stay."""
    model.train(training)
    if mode == "fc":
        model.encoder.eval()
