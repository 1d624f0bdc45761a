"""The supported-models table of the README and ``docs/models.md``, rendered from the target
registry (``python tests/test_docs.py`` regenerates both)."""

from __future__ import annotations

import importlib

from .targets import registered_targets

__all__ = ["supported_models_markdown"]

# Which model families use each built-in module type (documentation only: the registry itself is
# what decides where adapters go).
# Where an exact merge holds only under a condition (see docs/merging.md); W_k·b is the offset the
# adapter bias b adds to the keys.
_MERGE_NOTES = {
    "timm.layers.attention.Attention": "yes (with `qk_norm`: only if W_k·b = 0)",
    "timm.models.swin_transformer_v2.WindowAttention": "only if W_k·b = 0 (cosine attention)",
    "timm.models.eva.EvaAttention": "only if W_k·b = 0 (RoPE)",
    "torchvision.models.swin_transformer.ShiftedWindowAttention": (
        "yes if no window padding (or b = 0)"
    ),
    "torchvision.models.swin_transformer.ShiftedWindowAttentionV2": (
        "only if W_k·b = 0 (cosine attention) and no window padding (or b = 0)"
    ),
}

_FAMILIES = {
    "timm.layers.attention.Attention": "ViT, DeiT, DeiT III, DINOv2, CLIP, SigLIP, FlexiViT",
    "timm.layers.mlp.Mlp": "ViT, DeiT (III), DINOv2, CLIP, SigLIP, FlexiViT, BEiT, Swin (V2)",
    "timm.layers.mlp.GluMlp": "EVA-02 (tiny, small)",
    "timm.layers.mlp.SwiGLU": "EVA-02 (base, large)",
    "timm.models.beit.Attention": "BEiT",
    "timm.models.eva.EvaAttention": "EVA-02",
    "timm.models.swin_transformer.WindowAttention": "Swin",
    "timm.models.swin_transformer_v2.WindowAttention": "Swin V2",
    "torch.nn.modules.activation.MultiheadAttention": "torchvision ViT (vit_b_16, vit_l_16, ...)",
    "torchvision.models.vision_transformer.MLPBlock": "torchvision ViT",
    "torchvision.ops.misc.MLP": "torchvision Swin, Swin V2",
    "torchvision.models.swin_transformer.ShiftedWindowAttention": "torchvision Swin (swin_t, ...)",
    "torchvision.models.swin_transformer.ShiftedWindowAttentionV2": "torchvision Swin V2",
}


def supported_models_markdown(builtin_only: bool = True) -> str:
    """The supported-models table of ``docs/models.md``, rendered from the registry.

    Args:
        builtin_only: Leave out targets registered by the user (``source="user"``).

    Returns:
        A Markdown table: one row per registered module type, in registration order.
    """
    # Importing the package runs every registration (the built-ins here, merges in merge.py), so
    # the table is the same whichever arc_peft module the caller imported first.
    importlib.import_module(__name__.split(".")[0])
    lines = [
        "| Module type | Position | Library | Used by | Exact ARC merge |",
        "|---|---|---|---|---|",
    ]
    for target in registered_targets():
        if builtin_only and target.source == "user":
            continue
        cls = target.module_type
        qualified = f"{cls.__module__}.{cls.__qualname__}"
        position = "attention" if target.position == "attn" else "MLP"
        merge = _MERGE_NOTES.get(qualified, "yes") if target.merge is not None else "no"
        family = _FAMILIES.get(qualified, "")
        lines.append(f"| `{qualified}` | {position} | {target.source} | {family} | {merge} |")
    return "\n".join(lines) + "\n"
