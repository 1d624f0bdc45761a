"""What each ecosystem says about its models' input, in one place: the probe forward of site
discovery needs an image of the size the model was built for.

Nothing here imports timm, torchvision, transformers or open_clip: it reads attributes that the
model objects carry (duck typing), so a model from any of them works without the others installed.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["example_input", "image_layout"]

_DEFAULT = (3, 224, 224)


def _pair(value: Any) -> tuple[int, int] | None:
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value, value
    if isinstance(value, (tuple, list)) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return int(value[0]), int(value[1])
    return None


def _size_candidates(model: nn.Module) -> list[Any]:
    """Image sizes the model declares, most specific first."""
    found: list[Any] = []
    patch_embed = getattr(model, "patch_embed", None)  # timm: the size the model was built with
    if patch_embed is not None:
        found.append(getattr(patch_embed, "img_size", None))
    for owner in (model, getattr(model, "visual", None)):  # torchvision ViT, open_clip towers
        if owner is not None:
            found.append(getattr(owner, "image_size", None))
            found.append(getattr(owner, "img_size", None))
    config = getattr(model, "config", None)  # Hugging Face transformers
    config = getattr(config, "vision_config", None) or config
    found.append(getattr(config, "image_size", None))
    for attr in ("pretrained_cfg", "default_cfg"):  # timm's (3, H, W)
        cfg = getattr(model, attr, None)
        if isinstance(cfg, dict) and isinstance(cfg.get("input_size"), (tuple, list)):
            found.append(tuple(cfg["input_size"])[-2:])
    return found


def _channels(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    config = getattr(config, "vision_config", None) or config
    channels = getattr(config, "num_channels", None)
    if isinstance(channels, int) and channels > 0:
        return channels
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Conv1d)):
            return int(module.in_channels)
    return _DEFAULT[0]


def image_layout(model: nn.Module) -> tuple[int, int, int]:
    """``(channels, height, width)`` of the images ``model`` takes (``(3, 224, 224)`` when it
    does not say)."""
    for candidate in _size_candidates(model):
        size = _pair(candidate)
        if size is not None:
            return (_channels(model), *size)
    return (_channels(model), *_DEFAULT[1:])


def example_input(model: nn.Module, batch: int = 1) -> torch.Tensor:
    """A seeded random image batch shaped for ``model``, on its device and in its dtype."""
    factory: dict[str, Any] = {}
    for tensor in model.parameters():
        if tensor.is_floating_point():
            factory = {"device": tensor.device, "dtype": tensor.dtype}
            break
    generator = torch.Generator().manual_seed(0)
    image = torch.randn(batch, *image_layout(model), generator=generator)
    return image.to(**factory)
