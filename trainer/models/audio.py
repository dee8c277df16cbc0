"""Audio encoder: a 2-D ResNet-18 over B×1×40×100 log-mel spectrograms (40 mel bands × 100 frames)."""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import torch
from torch import nn

from trainer.models.blocks import BasicBlock2d, NormLayer, init_weights, scaled
from xdctools.errors import ConfigError

PLANES = (64, 128, 256, 512)


class AudioResNet(nn.Module):
    """torchvision's ResNet layout (conv1/bn1/layer1-4/fc names) on 1-channel spectrograms.

    The stem is ImageNet's 7×7 stride-2 conv; the 3×3 max-pool after it is off by default. A 40×100
    spectrogram is ~1/12 of a 224×224 image, and with the max-pool layer4 would see 2×4 cells
    (2 frequency rows for 40 mel bands); without it layer1 runs at 20×50 and layer4 at 3×7, keeping
    more frequency and time resolution for ~3× the compute (0.59 vs 0.19 GMACs per spectrogram,
    against 20 GMACs for the video encoder on 8×112×112). `maxpool=True` gives the ImageNet stem.
    """

    width: float = 1.0  # set by the builder; channel counts are 64·width … 512·width

    def __init__(
        self,
        *,
        planes: Sequence[int] = PLANES,
        layers: Sequence[int] = (2, 2, 2, 2),
        in_channels: int = 1,
        maxpool: bool = False,
        num_classes: int | None = None,
        norm_layer: NormLayer = nn.BatchNorm2d,
        zero_init_residual: bool = False,
    ) -> None:
        super().__init__()
        self.inplanes = planes[0]
        self.conv1 = nn.Conv2d(in_channels, planes[0], kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = norm_layer(planes[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1) if maxpool else nn.Identity()
        self.layer1 = self._make_layer(planes[0], layers[0], 1, norm_layer)
        self.layer2 = self._make_layer(planes[1], layers[1], 2, norm_layer)
        self.layer3 = self._make_layer(planes[2], layers[2], 2, norm_layer)
        self.layer4 = self._make_layer(planes[3], layers[3], 2, norm_layer)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.feature_dim = planes[3]
        self.fc = None if num_classes is None else nn.Linear(self.feature_dim, num_classes)
        init_weights(self, zero_init_residual=zero_init_residual)

    def _make_layer(self, planes: int, blocks: int, stride: int, norm_layer: NormLayer) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes, kernel_size=1, stride=stride, bias=False), norm_layer(planes)
            )
        layers = [BasicBlock2d(self.inplanes, planes, stride, downsample, norm_layer=norm_layer)]
        self.inplanes = planes
        layers += [BasicBlock2d(planes, planes, norm_layer=norm_layer) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = self.layer4(x)
        return self.avgpool(x).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_features(x)
        return x if self.fc is None else self.fc(x)


def resnet18_audio(
    *,
    width: float = 1.0,
    maxpool: bool = False,
    num_classes: int | None = None,
    bn_eps: float = 1e-5,
    bn_momentum: float = 0.1,
    norm_layer: NormLayer | None = None,
    zero_init_residual: bool = False,
) -> AudioResNet:
    """ResNet-18 for B×1×Q×P log-mel input (the paper's Q=40, P=100); 512·width features."""
    if width <= 0:
        raise ConfigError(f"resnet18_audio: width must be positive, got {width}")
    if norm_layer is None:
        norm_layer = partial(nn.BatchNorm2d, eps=bn_eps, momentum=bn_momentum)
    model = AudioResNet(
        planes=[scaled(p, width) for p in PLANES],
        maxpool=maxpool,
        num_classes=num_classes,
        norm_layer=norm_layer,
        zero_init_residual=zero_init_residual,
    )
    model.width = width
    return model
