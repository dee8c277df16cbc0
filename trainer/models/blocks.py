"""Building pieces of the encoders: channel scaling, (2+1)-D conv builders, residual blocks, speed options."""

from __future__ import annotations

import types
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Literal

import torch
from torch import nn

NormLayer = Callable[[int], nn.Module]
Layout = Literal["torchvision", "xdc"]
Precision = Literal["fp32", "bf16", "fp16"]


def scaled(channels: int, width: float) -> int:
    """Channel count for a width factor, rounded half up and at least 1 (so tiny CPU models still build)."""
    return max(1, int(channels * width + 0.5))


def midplanes(in_planes: int, out_planes: int) -> int:
    """Mid channels giving a (2+1)-D conv the parameter count of a full 3×3×3 conv (Tran et al. 2018)."""
    return (in_planes * out_planes * 27) // (in_planes * 9 + 3 * out_planes)


class Conv2Plus1D(nn.Sequential):
    """A 3×3×3 conv factored into a spatial 1×3×3 conv, norm, ReLU and a temporal 3×1×1 conv.

    Indices 0/1/3 are the spatial conv, its norm and the temporal conv, as in torchvision, so that
    `layerN.M.conv1.0.0.weight` names the spatial conv of a block.
    """

    def __init__(
        self,
        in_planes: int,
        out_planes: int,
        mid_planes: int,
        stride: int = 1,
        padding: int = 1,
        *,
        norm_layer: NormLayer = nn.BatchNorm3d,
    ) -> None:
        super().__init__(
            nn.Conv3d(
                in_planes,
                mid_planes,
                kernel_size=(1, 3, 3),
                stride=(1, stride, stride),
                padding=(0, padding, padding),
                bias=False,
            ),
            norm_layer(mid_planes),
            nn.ReLU(inplace=True),
            nn.Conv3d(
                mid_planes,
                out_planes,
                kernel_size=(3, 1, 1),
                stride=(stride, 1, 1),
                padding=(padding, 0, 0),
                bias=False,
            ),
        )

    @staticmethod
    def get_downsample_stride(stride: int) -> tuple[int, int, int]:
        """The 1×1×1 shortcut strides time as well, since the temporal conv does."""
        return (stride, stride, stride)


class BasicBlock3d(nn.Module):
    """Residual block of two (2+1)-D convs; `layout` sets how their mid channels are counted.

    "torchvision": both convs use `midplanes(inplanes, planes)` (torchvision's VideoResNet).
    "xdc": each conv uses `midplanes` of its own in/out channels (the released XDC checkpoints), which
    differs from torchvision only in the first block of layers 2-4 (conv2: 288/576/1152 vs 230/460/921).
    """

    expansion = 1

    def __init__(
        self,
        inplanes: int,
        planes: int,
        conv_builder: Callable[..., nn.Module],
        stride: int = 1,
        downsample: nn.Module | None = None,
        *,
        norm_layer: NormLayer = nn.BatchNorm3d,
        layout: Layout = "torchvision",
    ) -> None:
        super().__init__()
        mid1 = midplanes(inplanes, planes)
        mid2 = mid1 if layout == "torchvision" else midplanes(planes, planes)
        self.conv1 = nn.Sequential(
            conv_builder(inplanes, planes, mid1, stride, norm_layer=norm_layer),
            norm_layer(planes),
            nn.ReLU(inplace=True),
        )
        self.conv2 = nn.Sequential(
            conv_builder(planes, planes, mid2, norm_layer=norm_layer), norm_layer(planes)
        )
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x if self.downsample is None else self.downsample(x)
        out = self.conv2(self.conv1(x))
        return self.relu(out + residual)


class BasicBlock2d(nn.Module):
    """torchvision's 2-D ResNet BasicBlock (names conv1/bn1/conv2/bn2/downsample)."""

    expansion = 1

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        *,
        norm_layer: NormLayer = nn.BatchNorm2d,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = norm_layer(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = norm_layer(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + residual)


def init_weights(model: nn.Module, *, zero_init_residual: bool = False) -> None:
    """torchvision's ResNet init: He (fan-out) convs, unit norms, N(0, 0.01) linear layers.

    `zero_init_residual` zeroes the last norm of every residual branch, so each block starts as the
    identity (Goyal et al., the large-batch warm-up recipe the paper follows).
    """
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Conv3d)):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm3d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.01)
            nn.init.zeros_(m.bias)
    if zero_init_residual:
        for m in model.modules():
            if isinstance(m, BasicBlock3d):
                nn.init.zeros_(m.conv2[1].weight)
            elif isinstance(m, BasicBlock2d):
                nn.init.zeros_(m.bn2.weight)


def memory_format_of(model: nn.Module) -> torch.memory_format:
    """channels_last_3d for models with 3-D convs (5-D tensors), channels_last for 2-D ones."""
    is_3d = any(isinstance(m, nn.Conv3d) for m in model.modules())
    return torch.channels_last_3d if is_3d else torch.channels_last


def prepare_for_speed(
    model: nn.Module,
    *,
    channels_last: bool = False,
    compile: bool = False,
    compile_mode: str | None = None,
) -> nn.Module:
    """Apply the speed options that change the model, in place, and return it; autocast is a context.

    Both options work on CPU (oneDNN convolutions, inductor's C++ kernels) as on GPU; whether they pay
    is measured in docs/train.md ("Speed options"). channels_last converts conv weights (NDHWC for video,
    NHWC for audio); feed inputs in the same format (`x.contiguous(memory_format=memory_format_of(model))`,
    as `trainer.step.to_inputs` does) or each conv converts them per call.

    compile replaces `model.forward_features` by its `torch.compile`d version (an encoder; a model
    without one gets `nn.Module.compile`). The module itself is not wrapped, so every caller runs the
    compiled code (the training forward through `Learner`, `extract_features`, `model(x)`) and the
    state_dict keys stay as they are. A compiled encoder compiles once per mode (training; evaluation
    under `torch.inference_mode`), and once more with a dynamic batch size the first time the batch size
    changes (an extraction's last, shorter batch).
    """
    if channels_last:
        model.to(memory_format=memory_format_of(model))
    if compile:
        features = getattr(type(model), "forward_features", None)
        if features is None:
            model.compile(mode=compile_mode)
        else:
            # The class's function, compiled once and bound to this model: a deep copy of the module
            # binds the copy (`copy` deep-copies a bound method's instance), never this one.
            model.forward_features = types.MethodType(torch.compile(features, mode=compile_mode), model)
    return model


def autocast(device: str | torch.device, precision: Precision = "fp32") -> AbstractContextManager:
    """Mixed-precision context for forward passes, on CPU as on GPU (torch 2.13's CPU autocast runs
    convolutions and matmuls in bf16 or fp16); "fp16" needs a `torch.amp.GradScaler` in the step."""
    if precision == "fp32":
        return nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)
