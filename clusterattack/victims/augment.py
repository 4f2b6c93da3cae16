"""Batched image augmentations in plain torch (no torchvision), run on the training device.

Every view of a contrastive or self-labelling method is drawn here: one call augments a
whole batch with per-image random parameters, so the CPU cost is a single ``grid_sample``
plus a few elementwise ops instead of a Python loop over images.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class AugmentConfig:
    """Random resized crop, flip, colour jitter, grayscale, noise and erasing, SimCLR-style.

    ``crop_scale`` is the (min, max) fraction of the image area a crop covers;
    ``brightness``/``contrast``/``saturation`` are jitter strengths (0 disables); the
    ``*_prob`` fields are per-image probabilities.
    """

    crop_scale: tuple[float, float] = (0.2, 1.0)
    hflip: bool = True
    jitter_prob: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    grayscale_prob: float = 0.2
    noise_std: float = 0.0
    erase_prob: float = 0.0
    erase_scale: tuple[float, float] = (0.02, 0.2)

    def __post_init__(self) -> None:
        lo, hi = self.crop_scale
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"crop_scale must satisfy 0 < min <= max <= 1, got {self.crop_scale}")
        lo, hi = self.erase_scale
        if not 0 < lo <= hi < 1:
            raise ValueError(f"erase_scale must satisfy 0 < min <= max < 1, got {self.erase_scale}")
        for key in ("jitter_prob", "grayscale_prob", "erase_prob"):
            if not 0 <= getattr(self, key) <= 1:
                raise ValueError(f"{key} must be a probability in [0, 1], got {getattr(self, key)}")
        for key in ("brightness", "contrast", "saturation", "noise_std"):
            if getattr(self, key) < 0:
                raise ValueError(f"{key} must be >= 0, got {getattr(self, key)}")


# Weak: the "standard" view of SCAN/SPICE/FixMatch (small crop jitter and flip only).
WEAK = AugmentConfig(
    crop_scale=(0.7, 1.0),
    jitter_prob=0.0,
    grayscale_prob=0.0,
    brightness=0,
    contrast=0,
    saturation=0,
)
# Strong: the SimCLR view used by every contrastive objective here.
STRONG = AugmentConfig()
# Strong plus erasing: the view self-labelling and semi-supervised steps train on.
STRONGER = AugmentConfig(erase_prob=0.5, noise_std=0.02)


def crop_flip(x: torch.Tensor, cfg: AugmentConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random resized crop (``cfg.crop_scale``, aspect 3/4 to 4/3) and flip; differentiable in ``x``.

    Randomness from ``generator`` when given (drawn on its device), else from torch's global
    generator on ``x``'s device.
    """
    n = x.shape[0]
    dev = x.device
    draw = generator.device if generator is not None else dev
    lo, hi = cfg.crop_scale
    area = torch.empty(n, device=draw).uniform_(lo, hi, generator=generator)
    log_ratio = torch.empty(n, device=draw).uniform_(-0.2877, 0.2877, generator=generator)  # aspect in [3/4, 4/3]
    ratio = torch.exp(log_ratio)
    sw = torch.sqrt(area * ratio).clamp(max=1.0)
    sh = torch.sqrt(area / ratio).clamp(max=1.0)
    # Centre offsets keep the crop inside the image (normalised coords in [-1, 1]).
    tx = (torch.rand(n, device=draw, generator=generator) * 2 - 1) * (1 - sw)
    ty = (torch.rand(n, device=draw, generator=generator) * 2 - 1) * (1 - sh)
    flip = torch.ones(n, device=draw)
    if cfg.hflip:
        flip = torch.where(torch.rand(n, device=draw, generator=generator) < 0.5, -1.0, 1.0)
    theta = torch.zeros(n, 2, 3, device=draw, dtype=x.dtype)
    theta[:, 0, 0] = sw * flip
    theta[:, 0, 2] = tx
    theta[:, 1, 1] = sh
    theta[:, 1, 2] = ty
    grid = F.affine_grid(theta.to(dev), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _per_image(n: int, strength: float, device) -> torch.Tensor:
    return (1 + torch.empty(n, 1, 1, 1, device=device).uniform_(-strength, strength)).clamp(min=0)


def _jitter(x: torch.Tensor, cfg: AugmentConfig) -> torch.Tensor:
    n, c = x.shape[:2]
    dev = x.device
    apply = (torch.rand(n, 1, 1, 1, device=dev) < cfg.jitter_prob).to(x.dtype)
    y = x
    if cfg.brightness:
        y = y * _per_image(n, cfg.brightness, dev)
    if cfg.contrast:
        mean = y.mean(dim=(1, 2, 3), keepdim=True)
        y = (y - mean) * _per_image(n, cfg.contrast, dev) + mean
    if cfg.saturation and c == 3:
        gray = y.mean(dim=1, keepdim=True)
        y = (y - gray) * _per_image(n, cfg.saturation, dev) + gray
    y = y.clamp(0, 1)
    return apply * y + (1 - apply) * x


def augment(x: torch.Tensor, cfg: AugmentConfig = STRONG) -> torch.Tensor:
    """One random view of every image of ``x`` (float N x C x H x W in [0, 1]), same shape and range.

    Randomness comes from torch's global generator, which the trainers seed.
    """
    if x.ndim != 4 or not torch.is_floating_point(x):
        raise ValueError(
            f"augment expects a float N x C x H x W batch, got {x.dtype} {tuple(x.shape)}"
        )
    n, c, h, w = x.shape
    dev = x.device
    y = crop_flip(x, cfg)
    if cfg.jitter_prob and (cfg.brightness or cfg.contrast or cfg.saturation):
        y = _jitter(y, cfg)
    if cfg.grayscale_prob and c == 3:
        gray = (torch.rand(n, 1, 1, 1, device=dev) < cfg.grayscale_prob).to(y.dtype)
        y = gray * y.mean(dim=1, keepdim=True).expand_as(y) + (1 - gray) * y
    if cfg.noise_std:
        y = (y + cfg.noise_std * torch.randn_like(y)).clamp(0, 1)
    if cfg.erase_prob:
        y = _erase(y, cfg)
    return y


def _erase(x: torch.Tensor, cfg: AugmentConfig) -> torch.Tensor:
    """Random erasing (Cutout): a rectangle of each chosen image is set to uniform noise."""
    n, _, h, w = x.shape
    dev = x.device
    lo, hi = cfg.erase_scale
    area = torch.empty(n, device=dev).uniform_(lo, hi)
    ratio = torch.exp(torch.empty(n, device=dev).uniform_(-1.0, 1.0))
    eh = (torch.sqrt(area / ratio) * h).clamp(1, h - 1)
    ew = (torch.sqrt(area * ratio) * w).clamp(1, w - 1)
    top = torch.rand(n, device=dev) * (h - eh)
    left = torch.rand(n, device=dev) * (w - ew)
    rows = torch.arange(h, device=dev).view(1, h, 1)
    cols = torch.arange(w, device=dev).view(1, 1, w)
    inside = (
        (rows >= top.view(n, 1, 1))
        & (rows < (top + eh).view(n, 1, 1))
        & (cols >= left.view(n, 1, 1))
        & (cols < (left + ew).view(n, 1, 1))
    )
    chosen = (torch.rand(n, device=dev) < cfg.erase_prob).view(n, 1, 1)
    mask = (inside & chosen).unsqueeze(1).to(x.dtype)
    return mask * torch.rand_like(x) + (1 - mask) * x
