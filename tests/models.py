"""The model matrix: tiny configurations of every supported architecture (fast on a 2-core CPU).

Each entry builds a fresh, seeded, randomly initialised model (no weights are downloaded) and says
which input it takes. Tests import ``MATRIX`` / ``build`` from here.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

import arc_peft

_VIT = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)

# name -> (library, constructor name, kwargs, image size)
SPECS: dict[str, tuple[str, str, dict, int]] = {
    "vit": ("timm", "vit_tiny_patch16_224", _VIT, 32),
    "deit": ("timm", "deit_tiny_patch16_224", _VIT, 32),
    "deit3": ("timm", "deit3_small_patch16_224", _VIT, 32),
    "dinov2": (
        "timm",
        "vit_small_patch14_dinov2",
        dict(_VIT, img_size=28, patch_size=7),
        28,
    ),
    "clip": ("timm", "vit_base_patch16_clip_224", _VIT, 32),
    "swin": (
        "timm",
        "swin_tiny_patch4_window7_224",
        dict(img_size=56, window_size=7, embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1)),
        56,
    ),
    "swinv2": (
        "timm",
        "swinv2_tiny_window8_256",
        dict(img_size=64, window_size=4, embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1)),
        64,
    ),
    "eva02": ("timm", "eva02_tiny_patch14_224", dict(_VIT, img_size=28, patch_size=7), 28),
    "eva02_swiglu": ("timm", "eva02_base_patch14_224", dict(_VIT, img_size=28, patch_size=7), 28),
    "beit": ("timm", "beit_base_patch16_224", _VIT, 32),
    "tv_vit": (
        "torchvision",
        "VisionTransformer",
        dict(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64),
        32,
    ),
    "tv_swin": (
        "torchvision",
        "SwinTransformer",
        dict(patch_size=[4, 4], embed_dim=16, depths=[1, 1], num_heads=[1, 1], window_size=[4, 4]),
        32,
    ),
    "tv_swinv2": ("torchvision", "swin_v2", {}, 32),
    # channels-first hybrid: conv stages, then attention and conv MLPs on N, C, H, W
    "fastvit": (
        "timm",
        "fastvit_sa12",
        dict(layers=(1, 1, 1, 2), embed_dims=(8, 16, 16, 32), mlp_ratios=(2, 2, 2, 2)),
        64,
    ),
    # several attention sites in one block (CoaT's parallel block: three scales, one MLP module)
    "coat": (
        "timm",
        "coat_tiny",
        dict(
            img_size=32,
            embed_dims=(16, 16, 16, 16),
            serial_depths=(1, 1, 1, 1),
            parallel_depth=1,
            num_heads=8,
            mlp_ratios=(2, 2, 2, 2),
        ),
        32,
    ),  # fmt: skip
    # two streams per block (TNT's inner pixel and outer patch attention, each with its MLP)
    "tnt": (
        "timm",
        "tnt_s_patch16_224",
        dict(
            img_size=32,
            embed_dim=32,
            inner_dim=8,
            depth=2,
            num_heads_inner=2,
            num_heads_outer=2,
        ),
        32,
    ),  # fmt: skip
}

MATRIX = list(SPECS)
NUM_CLASSES = 5


def build(name: str, seed: int = 0, num_classes: int = NUM_CLASSES) -> nn.Module:
    """A fresh tiny model of kind ``name`` with deterministic random weights, in eval mode."""
    library, ctor, kwargs, _ = SPECS[name]
    torch.manual_seed(seed)
    if library == "timm":
        import timm

        model = timm.create_model(ctor, pretrained=False, num_classes=num_classes, **kwargs)
    elif ctor == "VisionTransformer":
        from torchvision.models.vision_transformer import VisionTransformer

        model = VisionTransformer(num_classes=num_classes, **kwargs)
    else:
        from torchvision.models import swin_transformer as tvs

        v2 = ctor == "swin_v2"
        model = tvs.SwinTransformer(
            patch_size=[4, 4],
            embed_dim=16,
            depths=[1, 1],
            num_heads=[1, 1],
            window_size=[4, 4],
            num_classes=num_classes,
            **(
                dict(block=tvs.SwinTransformerBlockV2, downsample_layer=tvs.PatchMergingV2)
                if v2
                else {}
            ),
        )
    _randomise_scales(model)
    return model.eval()


def randomise_adapters(model: nn.Module, seed: int = 0, std: float = 0.3) -> None:
    """Give every adapter parameter seeded random values of size ``std`` (the identity init
    would hide a bypassed adapter; AdaptMLP starts by adding exactly zero)."""
    import arc_peft

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in arc_peft.adapter_parameters(model).values():
            param.copy_(torch.randn(param.shape, generator=g) * std)


def check_mixed_batch(model: nn.Module, tasks: list, x: torch.Tensor, differs_by: float) -> None:
    """A mixed batch gives every sample what its own task's adapter gives it alone, and every
    task visibly acts (its samples differ from the bare backbone's by more than ``differs_by``),
    so routing a sample through the wrong adapter would be caught. Leaves no adapter active."""
    import arc_peft

    with arc_peft.mixed_batch(model, tasks):
        mixed = model(x)
    alone = []
    for i, task in enumerate(tasks):
        arc_peft.set_active_adapter(model, task)
        alone.append(model(x[i : i + 1]))
    torch.testing.assert_close(mixed, torch.cat(alone), rtol=1e-5, atol=1e-5)
    arc_peft.set_active_adapter(model, None)
    bare = model(x)
    for i, task in enumerate(tasks):
        differs = (mixed[i] - bare[i]).abs().max() > differs_by
        assert differs == (task is not None), (i, task)


def _randomise_scales(model: nn.Module) -> None:
    """Give norms and layer scales O(1) random weights.

    Some architectures start their residual branches near zero (DeiT-III/DINOv2/BEiT layer scale
    1e-5, Swin V2's res-post-norm weight 0), which would hide what an adapter does to a block.
    """
    g = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        # torchvision's ViT zero-initialises its head, which would make every output equal.
        for param in _head(model).parameters():
            param.copy_(torch.randn(param.shape, generator=g) * 0.5)
        for module in model.modules():
            for pname, param in module.named_parameters(recurse=False):
                is_norm = isinstance(module, nn.LayerNorm) and pname == "weight"
                if is_norm or pname in ("gamma", "gamma_1", "gamma_2"):
                    param.copy_(torch.rand(param.shape, generator=g) + 0.5)


def _head(model: nn.Module) -> nn.Module:
    if hasattr(model, "get_classifier"):
        return model.get_classifier()
    return model.heads if hasattr(model, "heads") else model.head


def image_size(name: str) -> int:
    return SPECS[name][3]


def inputs(name: str, batch: int = 2, seed: int = 1) -> torch.Tensor:
    """A seeded random image batch of the right size for ``name``."""
    g = torch.Generator().manual_seed(seed)
    size = image_size(name)
    return torch.randn(batch, 3, size, size, generator=g)


def method_configs(**overrides) -> dict:
    """``{method name: small config}`` for every registered method (its registry example), with
    ``overrides`` applied where the config has such a field (e.g. ``dropout=0.0``): the tests'
    method table, so a method that joins the registry joins the tests."""
    configs = {}
    for method in arc_peft.registered_methods():
        config = method.example_config()
        fields = {f.name for f in dataclasses.fields(config)}
        configs[method.name] = dataclasses.replace(
            config, **{k: v for k, v in overrides.items() if k in fields}
        )
    return configs
