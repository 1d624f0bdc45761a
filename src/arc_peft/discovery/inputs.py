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
    if (
        isinstance(value, (tuple, list))
        and len(value) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)
    ):
        return int(value[0]), int(value[1])
    return None


def _hf_configs(model: nn.Module) -> list[Any]:
    """Hugging Face ``transformers``: the model's ``config`` and, for a composite model (CLIP,
    SigLIP, a vision-language model), its ``vision_config`` first: that is the image tower's."""
    config = getattr(model, "config", None)
    if config is None or isinstance(config, (dict, str, int, float)):
        return []
    vision = getattr(config, "vision_config", None)
    return [c for c in (vision, config) if c is not None and not isinstance(c, (str, int, float))]


def _config_value(config: Any, key: str) -> Any:
    if isinstance(config, dict):  # a sub-config left as a plain dict
        return config.get(key)
    return getattr(config, key, None)


def _size_candidates(model: nn.Module) -> list[Any]:
    """Image sizes ``model`` itself declares, most specific first."""
    found: list[Any] = []
    patch_embed = getattr(model, "patch_embed", None)  # timm: the size the model was built with
    if patch_embed is not None:
        found.append(getattr(patch_embed, "img_size", None))
    # torchvision ViT (``image_size``); open_clip towers (``image_size``, on the tower or on a
    # whole CLIP / CoCa model's ``visual``).
    for owner in (model, getattr(model, "visual", None)):
        if isinstance(owner, nn.Module):
            found.append(getattr(owner, "image_size", None))
            found.append(getattr(owner, "img_size", None))
    for config in _hf_configs(model):  # Hugging Face ``config.image_size`` (int or (H, W))
        found.append(_config_value(config, "image_size"))
    return found


def _pretrained_cfgs(model: nn.Module) -> list[tuple]:
    """timm's ``pretrained_cfg`` / ``default_cfg`` ``input_size``, ``(C, H, W)``."""
    found = []
    for attr in ("pretrained_cfg", "default_cfg"):
        cfg = getattr(model, attr, None)
        if isinstance(cfg, dict) and isinstance(cfg.get("input_size"), (tuple, list)):
            found.append(tuple(cfg["input_size"]))
    return found


def _cfg_size(model: nn.Module) -> list[Any]:
    """The ``(H, W)`` of timm's ``pretrained_cfg``: the weights' size, which a model built with
    another ``img_size`` does not take, so only a fallback."""
    return [size[-2:] for size in _pretrained_cfgs(model)]


def _declared_size(model: nn.Module) -> tuple[int, int] | None:
    """The size the model was built for, from itself or its first declaring submodule (CoaT's
    ``patch_embed1``, a user's wrapper around a timm / transformers / open_clip backbone);
    failing that, the size its pretrained configuration names."""
    for candidates in (_size_candidates, _cfg_size):
        for _, module in model.named_modules():
            for candidate in candidates(module):
                size = _pair(candidate)
                if size is not None:
                    return size
    return None


def _count(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _channel_candidates(module: nn.Module) -> list[Any]:
    """Channels ``module`` itself declares: Hugging Face ``config.num_channels``, timm's
    ``in_chans`` (what the model was built with: ``in_chans=1`` overrides the weights' 3)."""
    found = [_config_value(config, "num_channels") for config in _hf_configs(module)]
    found.append(getattr(module, "in_chans", None))
    return found


def _cfg_channels(module: nn.Module) -> list[Any]:
    return [size[0] for size in _pretrained_cfgs(module) if len(size) == 3]


def _channels(model: nn.Module) -> int:
    # What the model declares comes first: the first layer is only a guess (CSATv2's stem
    # convolutions read 64 DCT channels computed from a 3-channel image).
    for candidates in (_channel_candidates, _cfg_channels):
        for _, module in model.named_modules():
            for candidate in candidates(module):
                if _count(candidate) is not None:
                    return candidate
    for module in model.modules():  # torchvision, open_clip: the stem's convolution
        if isinstance(module, (nn.Conv2d, nn.Conv1d)):
            return int(module.in_channels)
    return _DEFAULT[0]


def image_layout(model: nn.Module) -> tuple[int, int, int]:
    """``(channels, height, width)`` of the images ``model`` takes (``(3, 224, 224)`` when it
    does not say)."""
    size = _declared_size(model)
    return (_channels(model), *(size or _DEFAULT[1:]))


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
