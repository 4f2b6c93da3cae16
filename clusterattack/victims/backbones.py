"""Convolutional backbones and heads shared by every victim, sized for 28x28, 32x32 and 96x96."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

ARCHS = ("convnet", "resnet18")


@dataclass(frozen=True)
class BackboneConfig:
    """Which feature extractor a victim uses and how its input is normalised.

    ``convnet`` is a 4-layer conv net (about 0.39M parameters at width 32) that trains in
    minutes on a CPU; ``resnet18`` is the CIFAR-style ResNet-18 of the papers (width 64).
    Inputs larger than 48 pixels (STL-10's 96x96) get a strided stem so that the feature
    maps stay the size they have at 32x32. ``mean``/``std`` hold one value per channel, or
    one value for all channels.
    """

    arch: str = "convnet"
    in_channels: int = 1
    image_size: int = 28
    width: int = 32
    mean: tuple[float, ...] = (0.5,)
    std: tuple[float, ...] = (0.25,)

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ValueError(f"backbone arch must be one of {ARCHS}, got {self.arch!r}")
        if self.in_channels < 1:
            raise ValueError(f"in_channels must be >= 1, got {self.in_channels}")
        if self.image_size < 8:
            raise ValueError(f"image_size must be >= 8 pixels, got {self.image_size}")
        if self.width < 4:
            raise ValueError(f"width must be >= 4 channels, got {self.width}")
        for key in ("mean", "std"):
            values = tuple(float(v) for v in getattr(self, key))
            object.__setattr__(self, key, values)
            if len(values) not in (1, self.in_channels):
                raise ValueError(
                    f"{key} needs 1 or {self.in_channels} values (one per channel), got {values}"
                )
        if min(self.std) <= 0:
            raise ValueError(f"std must be positive, got {self.std}")

    @property
    def feature_dim(self) -> int:
        """Size of the pooled embedding the backbone returns."""
        return 8 * self.width


def _conv_bn_relu(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class _BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False),
            nn.BatchNorm2d(c_out),
            nn.ReLU(inplace=True),
            nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False),
            nn.BatchNorm2d(c_out),
        )
        self.shortcut = (
            nn.Identity()
            if stride == 1 and c_in == c_out
            else nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.shortcut(x))


def _convnet(cfg: BackboneConfig) -> nn.Sequential:
    w = cfg.width
    # Every layer strides by 2 (28 -> 14 -> 7 -> 4 -> 2): on a 2-core CPU this is three
    # times cheaper than keeping 14x14 maps for a second layer, and the demo budget buys
    # more epochs with it than resolution would add. 96-pixel inputs are pooled once more
    # so that every size reaches the last layer at 2-3 pixels.
    stem: list[nn.Module] = [_conv_bn_relu(cfg.in_channels, w, 2)]
    if cfg.image_size > 48:
        stem.append(nn.MaxPool2d(3, 2, 1))
    return nn.Sequential(
        *stem,
        _conv_bn_relu(w, 2 * w, 2),
        _conv_bn_relu(2 * w, 4 * w, 2),
        _conv_bn_relu(4 * w, 8 * w, 2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    )


def _resnet18(cfg: BackboneConfig) -> nn.Sequential:
    w = cfg.width
    layers: list[nn.Module] = [_conv_bn_relu(cfg.in_channels, w, 1)]
    if cfg.image_size > 48:
        # STL-10 style: downsample 96 -> 24 early so that the stages see CIFAR-sized maps.
        layers = [_conv_bn_relu(cfg.in_channels, w, 2), nn.MaxPool2d(3, 2, 1)]
    c_in = w
    for i, c_out in enumerate((w, 2 * w, 4 * w, 8 * w)):
        stride = 1 if i == 0 else 2
        layers += [_BasicBlock(c_in, c_out, stride), _BasicBlock(c_out, c_out, 1)]
        c_in = c_out
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    return nn.Sequential(*layers)


class Backbone(nn.Module):
    """Images in [0, 1] (N x C x H x W) -> pooled features N x ``config.feature_dim``."""

    def __init__(self, config: BackboneConfig) -> None:
        super().__init__()
        self.config = config
        self.out_dim = config.feature_dim
        shape = (1, -1, 1, 1)
        self.register_buffer("mean", torch.tensor(config.mean).view(shape), persistent=False)
        self.register_buffer("std", torch.tensor(config.std).view(shape), persistent=False)
        self.body = _convnet(config) if config.arch == "convnet" else _resnet18(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body((x - self.mean) / self.std)


def mlp(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    """The two-layer projection head of SimCLR, CC and MiCE."""
    return nn.Sequential(
        nn.Linear(in_dim, hidden_dim), nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim)
    )


def backbone_for(preset: str, input_shape: tuple[int, int, int]) -> BackboneConfig:
    """The backbone a preset uses for images of ``input_shape``: demo is CPU-sized, full is ResNet-18."""
    c, h, w = input_shape
    if h != w:
        raise ValueError(f"backbones expect square images, got {h}x{w}")
    mean, std = ((0.5,), (0.25,)) if c == 1 else ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    if c not in (1, 3):
        mean, std = (0.5,), (0.25,)
    if preset == "demo":
        return BackboneConfig("convnet", c, h, 32, mean, std)
    if preset == "full":
        return BackboneConfig("resnet18", c, h, 64, mean, std)
    raise ValueError(f"unknown preset {preset!r}, expected 'demo' or 'full'")


def check_model_config(
    name: str, num_clusters: int, input_shape: tuple, backbone: BackboneConfig
) -> None:
    """Validate the fields every victim config shares; raise ValueError naming the bad one."""
    if int(num_clusters) < 2:
        raise ValueError(f"{name}: num_clusters must be >= 2, got {num_clusters}")
    shape = tuple(input_shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"{name}: input_shape must be (C, H, W), got {input_shape}")
    if (
        shape[0] != backbone.in_channels
        or shape[1] != backbone.image_size
        or shape[2] != backbone.image_size
    ):
        raise ValueError(
            f"{name}: input_shape {shape} does not match the backbone's "
            f"({backbone.in_channels}, {backbone.image_size}, {backbone.image_size})"
        )
