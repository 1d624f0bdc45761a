"""Tiny, seeded, randomly initialised vision models from Hugging Face ``transformers`` and
``open_clip`` (no weights are downloaded), for ``test_ecosystems.py``.

Every entry of :data:`ECOSYSTEMS` says how to build the model, how to run it on an image batch
(returning one tensor to compare), how to count its self-attention modules and transformer layers
independently of arc_peft's discovery, which modules discovery must leave out on purpose
(attention pooling), and what :func:`arc_peft.merge_adapter` should do with it.

``transformers`` and ``open_clip`` are imported inside the builders only, so importing this
module needs neither.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

# The common tiny size: hidden 32, 2 layers, 2 heads, 32x32 images, 8x8 patches.
_TINY = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=64,
    image_size=32,
    patch_size=8,
    num_channels=3,
)


@dataclass(frozen=True)
class Eco:
    """One model of the ecosystem matrix.

    Attributes:
        name: Test id.
        library: ``"transformers"`` or ``"open_clip"`` (for ``pytest.importorskip``).
        make: ``make()`` builds the model (seeded, eval mode).
        attention: Regex on class names of self-attention modules; the innermost matches (one
            per layer) are counted, so both `XAttention(XSelfAttention)` and flat layouts fit.
        layer: Regex on class names: the transformer layers (one attention + one MLP each).
        pooling: Regex on class names: attention-pooling modules that must be left out on
            purpose (and never adapted).
        image: ``(channels, height, width)`` the model takes.
        merge_needs_zero_attn_bias: The attention adapter's bias must be zero for an exact
            merge (cosine attention: the key offset ``W_k b`` survives the normalisation and
            the key projection has no bias to absorb it); with a non-zero bias the merge must
            be refused with ``MergeError``.
        has_head: The model has a classifier head worth saving with the adapter.
        call: ``call(model, images)`` -> the tensor to compare.
    """

    name: str
    library: str
    make: Callable[[], nn.Module]
    attention: str
    layer: str
    pooling: str | None = None
    image: tuple[int, int, int] = (3, 32, 32)
    merge_needs_zero_attn_bias: bool = False
    has_head: bool = False
    call: Callable[[nn.Module, torch.Tensor], torch.Tensor] = field(
        default=lambda model, x: _hf_call(model, x)
    )

    def build(self, seed: int = 0) -> nn.Module:
        torch.manual_seed(seed)
        model = self.make()
        return model.eval()

    def inputs(self, batch: int = 2, seed: int = 1) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        return torch.randn(batch, *self.image, generator=g)

    def modules_matching(self, model: nn.Module, pattern: str | None) -> list[str]:
        if pattern is None:
            return []
        rx = re.compile(pattern)
        return [path for path, m in model.named_modules() if rx.fullmatch(type(m).__name__)]


def _hf_call(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(pixel_values=x).last_hidden_state


def _mae_call(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    # ViTMAE shuffles the patches by argsort(noise) even with mask_ratio=0; fixed, increasing
    # noise keeps every patch in its place, so the forward is deterministic.
    n = model.embeddings.patch_embeddings.num_patches
    noise = torch.arange(n, dtype=x.dtype).expand(x.shape[0], n)
    return model(pixel_values=x, noise=noise).last_hidden_state


def _tensor_call(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(x)
    return out[0] if isinstance(out, tuple) else out


# -- Hugging Face transformers ---------------------------------------------------------------


def _hf(model_cls: str, config_cls: str, **overrides) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        import transformers

        kwargs = {**_TINY, **overrides}
        if "num_heads" in kwargs:  # Swin: per-stage heads; num_attention_heads aliases it
            kwargs.pop("num_attention_heads")
        config = getattr(transformers, config_cls)(**kwargs)
        return getattr(transformers, model_cls)(config)

    return make


def _swin(model_cls: str, config_cls: str) -> Callable[[], nn.Module]:
    # Hierarchical: stage 1 is 8x8 tokens (patch 4) in 4x4 windows, plain then shifted; stage 2
    # (after patch merging) is 4x4 tokens, one window.
    return _hf(
        model_cls,
        config_cls,
        embed_dim=16,
        depths=[2, 1],  # two layers in stage 1: the second has shifted windows
        num_heads=[2, 2],
        window_size=4,
        patch_size=4,
        mlp_ratio=2.0,
        hidden_size=32,  # embed_dim * 2 ** (stages - 1)
    )


HF: list[Eco] = [
    Eco(
        "hf_vit",
        "transformers",
        _hf("ViTModel", "ViTConfig"),
        r"ViT(Sdpa)?(Self)?Attention",
        r"ViTLayer",
    ),
    Eco(
        "hf_vit_eager",
        "transformers",
        _hf("ViTModel", "ViTConfig", attn_implementation="eager"),
        r"ViT(Sdpa)?(Self)?Attention",
        r"ViTLayer",
    ),
    Eco(
        "hf_deit",
        "transformers",
        _hf("DeiTModel", "DeiTConfig"),
        r"DeiT(Sdpa)?(Self)?Attention",
        r"DeiTLayer",
    ),
    Eco(
        "hf_beit",
        "transformers",
        _hf("BeitModel", "BeitConfig", use_relative_position_bias=True, layer_scale_init_value=0.1),
        r"Beit(Sdpa)?(Self)?Attention",
        r"BeitLayer",
    ),
    Eco(
        "hf_dinov2",
        "transformers",
        _hf("Dinov2Model", "Dinov2Config", mlp_ratio=2),
        r"Dinov2(Sdpa)?(Self)?Attention",
        r"Dinov2Layer",
    ),
    Eco(
        "hf_dinov2_swiglu",
        "transformers",
        _hf("Dinov2Model", "Dinov2Config", mlp_ratio=2, use_swiglu_ffn=True),
        r"Dinov2(Sdpa)?(Self)?Attention",
        r"Dinov2Layer",
    ),
    Eco(
        "hf_dinov2_registers",
        "transformers",
        _hf("Dinov2WithRegistersModel", "Dinov2WithRegistersConfig", mlp_ratio=2),
        r"Dinov2WithRegisters(Sdpa)?(Self)?Attention",
        r"Dinov2WithRegistersLayer",
    ),
    Eco(
        "hf_clip",
        "transformers",
        _hf("CLIPVisionModel", "CLIPVisionConfig"),
        r"CLIPAttention",
        r"CLIPEncoderLayer",
    ),
    Eco(
        "hf_siglip_head",
        "transformers",
        _hf("SiglipVisionModel", "SiglipVisionConfig", vision_use_head=True),
        r"SiglipAttention",
        r"SiglipEncoderLayer",
        pooling=r"SiglipMultiheadAttentionPoolingHead",
    ),
    Eco(
        "hf_swin",
        "transformers",
        _swin("SwinModel", "SwinConfig"),
        r"Swin(Sdpa)?(Self)?Attention",
        r"SwinLayer",
    ),
    Eco(
        "hf_swinv2",
        "transformers",
        _swin("Swinv2Model", "Swinv2Config"),
        r"Swinv2(Sdpa)?(Self)?Attention",
        r"Swinv2Layer",
        merge_needs_zero_attn_bias=True,
    ),
    Eco(
        "hf_vitmae",
        "transformers",
        _hf("ViTMAEModel", "ViTMAEConfig", mask_ratio=0.0),
        r"ViTMAE(Sdpa)?(Self)?Attention",
        r"ViTMAELayer",
        call=_mae_call,
    ),
    Eco(
        "hf_data2vec",
        "transformers",
        _hf(
            "Data2VecVisionModel",
            "Data2VecVisionConfig",
            use_relative_position_bias=True,
            layer_scale_init_value=0.1,
        ),
        r"Data2VecVision(Sdpa)?(Self)?Attention",
        r"Data2VecVisionLayer",
    ),
]


# -- open_clip --------------------------------------------------------------------------------


def _vision_cfg(**overrides):
    from open_clip.model import CLIPVisionCfg

    return CLIPVisionCfg(
        **{
            "layers": 2,
            "width": 32,
            "head_width": 16,
            "patch_size": 8,
            "image_size": 32,
            **overrides,
        }
    )


def _oc_tower(**overrides) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        from open_clip.model import _build_vision_tower

        return _build_vision_tower(16, _vision_cfg(**overrides))

    return make


def _oc_clip_visual() -> nn.Module:
    from open_clip.model import CLIP, CLIPTextCfg

    text = CLIPTextCfg(context_length=8, vocab_size=64, width=32, heads=2, layers=1)
    return CLIP(embed_dim=16, vision_cfg=_vision_cfg(), text_cfg=text).visual


_BLOCK = r"(Custom)?ResidualAttentionBlock"

OPEN_CLIP: list[Eco] = [
    Eco(
        "oc_tower",
        "open_clip",
        _oc_tower(),
        r"MultiheadAttention",
        _BLOCK,
        call=_tensor_call,
    ),
    Eco(
        "oc_tower_attnpool",
        "open_clip",
        _oc_tower(attentional_pool=True, attn_pooler_queries=4, attn_pooler_heads=2),
        r"MultiheadAttention",
        _BLOCK,
        pooling=r"AttentionalPooler",
        call=_tensor_call,
    ),
    Eco(
        "oc_tower_custom_block",
        "open_clip",
        _oc_tower(block_type="custom"),
        r"Attention",
        _BLOCK,
        call=_tensor_call,
    ),
    Eco(
        "oc_clip_visual",
        "open_clip",
        _oc_clip_visual,
        r"MultiheadAttention",
        _BLOCK,
        call=_tensor_call,
    ),
]

ECOSYSTEMS: dict[str, Eco] = {e.name: e for e in HF + OPEN_CLIP}
