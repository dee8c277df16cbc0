"""Video encoder: R(2+1)D-18 with torchvision's VideoResNet parameter names, in both weight layouts."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial

import torch
from torch import nn

from trainer.models.blocks import BasicBlock3d, Conv2Plus1D, Layout, NormLayer, init_weights, scaled
from xdctools.errors import ConfigError

PLANES = (64, 128, 256, 512)
STEM_MID = 45  # torchvision's R2Plus1dStem: 3 -> 45 (1×7×7) -> 64 (3×1×1)


class R2Plus1dStem(nn.Sequential):
    """Factored 7×7 stem: spatial 1×7×7 conv (stride 2 in space), then a temporal 3×1×1 conv."""

    def __init__(
        self, out_planes: int = 64, mid_planes: int = STEM_MID, *, norm_layer: NormLayer = nn.BatchNorm3d
    ) -> None:
        super().__init__(
            nn.Conv3d(3, mid_planes, kernel_size=(1, 7, 7), stride=(1, 2, 2), padding=(0, 3, 3), bias=False),
            norm_layer(mid_planes),
            nn.ReLU(inplace=True),
            nn.Conv3d(mid_planes, out_planes, kernel_size=(3, 1, 1), padding=(1, 0, 0), bias=False),
            norm_layer(out_planes),
            nn.ReLU(inplace=True),
        )


class VideoResNet(nn.Module):
    """Video ResNet on B×3×L×H×W clips; `forward_features` gives B×feature_dim pooled features.

    With `num_classes=None` there is no `fc` and `forward` returns the features (heads live apart,
    see `trainer.models.heads`); with a class count it is torchvision's classifier, so torchvision
    state dicts load strictly.
    """

    width: float = 1.0  # set by the builder; channel counts are 64·width … 512·width

    def __init__(
        self,
        *,
        stem: nn.Module,
        block: type[BasicBlock3d] = BasicBlock3d,
        conv_makers: Sequence[Callable[..., nn.Module]] = (Conv2Plus1D,) * 4,
        layers: Sequence[int] = (2, 2, 2, 2),
        planes: Sequence[int] = PLANES,
        num_classes: int | None = None,
        norm_layer: NormLayer = nn.BatchNorm3d,
        layout: Layout = "torchvision",
        zero_init_residual: bool = False,
    ) -> None:
        super().__init__()
        self.layout = layout
        self.inplanes = planes[0]
        self.stem = stem
        make = partial(self._make_layer, block, norm_layer=norm_layer, layout=layout)
        self.layer1 = make(conv_makers[0], planes[0], layers[0], stride=1)
        self.layer2 = make(conv_makers[1], planes[1], layers[1], stride=2)
        self.layer3 = make(conv_makers[2], planes[2], layers[2], stride=2)
        self.layer4 = make(conv_makers[3], planes[3], layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool3d((1, 1, 1))
        self.feature_dim = planes[3] * block.expansion
        self.fc = None if num_classes is None else nn.Linear(self.feature_dim, num_classes)
        init_weights(self, zero_init_residual=zero_init_residual)

    def _make_layer(
        self,
        block: type[BasicBlock3d],
        conv_builder: Callable[..., nn.Module],
        planes: int,
        blocks: int,
        stride: int,
        *,
        norm_layer: NormLayer,
        layout: Layout,
    ) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            ds_stride = conv_builder.get_downsample_stride(stride)
            downsample = nn.Sequential(
                nn.Conv3d(
                    self.inplanes, planes * block.expansion, kernel_size=1, stride=ds_stride, bias=False
                ),
                norm_layer(planes * block.expansion),
            )
        kw = {"norm_layer": norm_layer, "layout": layout}
        layers = [block(self.inplanes, planes, conv_builder, stride, downsample, **kw)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes, conv_builder, **kw) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = self.layer4(x)
        return self.avgpool(x).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_features(x)
        return x if self.fc is None else self.fc(x)


def r2plus1d_18(
    *,
    width: float = 1.0,
    layout: Layout = "torchvision",
    num_classes: int | None = None,
    bn_eps: float = 1e-5,
    bn_momentum: float = 0.1,
    planes: Sequence[int] | None = None,
    stem_mid: int | None = None,
    norm_layer: NormLayer | None = None,
    zero_init_residual: bool = False,
) -> VideoResNet:
    """R(2+1)D-18; 512·width features. At width 1 with layout "torchvision" it is torchvision's model.

    width scales every channel count (64/128/256/512 and the stem's 45 mid channels, or `stem_mid`);
    block mid channels follow from the scaled counts by the layout's rule (see `BasicBlock3d`).
    `planes` (four counts) and `stem_mid` override the scaled counts, to match a checkpoint exactly.
    bn_eps: 1e-5 is PyTorch's default; the official XDC weights were converted from Caffe2, which
    used 1e-3, so build with bn_eps=1e-3 to reproduce their activations. bn_momentum is PyTorch's
    convention (weight of the new batch), i.e. Caffe2's momentum 0.9 is 0.1 here.
    """
    if width <= 0:
        raise ConfigError(f"r2plus1d_18: width must be positive, got {width}")
    if layout not in ("torchvision", "xdc"):
        raise ConfigError(f"r2plus1d_18: layout must be 'torchvision' or 'xdc', got {layout!r}")
    if norm_layer is None:
        norm_layer = partial(nn.BatchNorm3d, eps=bn_eps, momentum=bn_momentum)
    if planes is None:
        planes = [scaled(p, width) for p in PLANES]
    elif len(planes) != 4:
        raise ConfigError(f"r2plus1d_18: planes needs four channel counts, got {list(planes)}")
    else:
        width = planes[0] / PLANES[0]
    mid = scaled(STEM_MID, width) if stem_mid is None else stem_mid
    model = VideoResNet(
        stem=R2Plus1dStem(planes[0], mid, norm_layer=norm_layer),
        planes=planes,
        num_classes=num_classes,
        norm_layer=norm_layer,
        layout=layout,
        zero_init_residual=zero_init_residual,
    )
    model.width = width
    return model
