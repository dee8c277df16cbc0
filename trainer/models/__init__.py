"""The encoders of XDC (R(2+1)D-18 video, ResNet-18 audio), their heads, weight loading and speed options."""

from trainer.models.audio import AudioResNet, resnet18_audio
from trainer.models.blocks import autocast, memory_format_of, prepare_for_speed
from trainer.models.heads import Classifier, LinearHead, MultiHead
from trainer.models.video import VideoResNet, r2plus1d_18
from trainer.models.weights import detect_layout, load_video_weights, read_checkpoint, video_model_for

__all__ = [
    "AudioResNet",
    "Classifier",
    "LinearHead",
    "MultiHead",
    "VideoResNet",
    "autocast",
    "detect_layout",
    "load_video_weights",
    "memory_format_of",
    "prepare_for_speed",
    "r2plus1d_18",
    "read_checkpoint",
    "resnet18_audio",
    "video_model_for",
]
