"""Where adapters attach: a registry of attention / MLP module types and how to read their input.

A *site* is a module of a registered type. A *block* is a module that directly holds exactly one
attention site and one MLP site (``blocks.3`` holding ``attn`` and ``mlp``); only sites inside
blocks are adapted, so an ``Mlp`` used elsewhere (an attention-pooling head, say) is left alone.
Block ``i`` is the ``i``-th such block in ``model.named_modules()`` order.

To support a new architecture, register its attention and MLP classes once::

    arc_peft.register_target(MyAttention, position="attn")
    arc_peft.register_target(MyMlp, position="mlp", width=lambda m: m.fc_in.in_features)

Exact-merge support (:func:`arc_peft.merge_adapter`) needs a ``merge`` function as well; see
:class:`Target`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = ["Block", "Target", "find_blocks", "get_target", "register_target", "registered_targets"]

# A merge function receives the adapted module and the ARC adapter's affine map ``x -> x @ M + b``
# and returns ``{parameter or buffer name (relative to the module): new tensor}`` without changing
# anything, or raises ``arc_peft.MergeError`` naming why an exact merge is impossible.
MergeFn = Callable[[nn.Module, Tensor, Tensor], "dict[str, Tensor]"]


@dataclass(frozen=True)
class Target:
    """How arc_peft adapts one module type.

    Attributes:
        module_type: The attention or MLP class (matched exactly, not by ``isinstance``: a subclass
            may compute differently and must be registered on its own).
        position: ``"attn"`` or ``"mlp"``.
        width: Returns the module's input width ``D``.
        input_name: Name of the forward argument holding the input, used when it is passed by
            keyword (the first positional argument otherwise).
        qkv_inputs: ``True`` for ``nn.MultiheadAttention``-style modules called as
            ``(query, key, value)``: all three must be the same tensor (self-attention) and all
            three receive the adapted input.
        merge: Folds an ARC adapter into the module's input linear layers (``None``: no exact
            merge is known for this type).
        source: Where the type comes from, for the supported-models table.
    """

    module_type: type
    position: str
    width: Callable[[nn.Module], int]
    input_name: str = "x"
    qkv_inputs: bool = False
    merge: MergeFn | None = None
    source: str = "user"


_REGISTRY: dict[type, Target] = {}


def _first_linear_width(module: nn.Module) -> int:
    for sub in module.modules():
        if isinstance(sub, nn.Linear):
            return sub.in_features
    raise ValueError(
        f"cannot infer the input width of {type(module).__qualname__}: it holds no nn.Linear. "
        "Pass width=... to arc_peft.register_target."
    )


def register_target(
    module_type: type,
    position: str,
    width: Callable[[nn.Module], int] | None = None,
    *,
    qkv_inputs: bool = False,
    merge: MergeFn | None = None,
    source: str = "user",
    replace: bool = False,
) -> Target:
    """Teach arc_peft a new attention or MLP module type.

    Args:
        module_type: The class to adapt (an ``nn.Module`` subclass).
        position: ``"attn"`` or ``"mlp"``.
        width: Returns the input width; default: ``in_features`` of the first ``nn.Linear`` inside.
        qkv_inputs: The module is called as ``(query, key, value, ...)`` like
            ``nn.MultiheadAttention``.
        merge: Optional exact-merge function (see :data:`MergeFn`).
        source: A label for the supported-models table.
        replace: Allow overriding an existing registration.

    Returns:
        The registered :class:`Target`.
    """
    if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise TypeError(f"register_target expects an nn.Module subclass, got {module_type!r}")
    if position not in ("attn", "mlp"):
        raise ValueError(
            f"register_target position={position!r} is invalid: expected 'attn' or 'mlp'"
        )
    if module_type in _REGISTRY and not replace:
        raise ValueError(
            f"{module_type.__qualname__} is already registered (position "
            f"{_REGISTRY[module_type].position!r}); pass replace=True to override it"
        )
    params = list(inspect.signature(module_type.forward).parameters)
    input_name = params[1] if len(params) > 1 else "x"
    target = Target(
        module_type=module_type,
        position=position,
        width=width or _first_linear_width,
        input_name=input_name,
        qkv_inputs=qkv_inputs,
        merge=merge,
        source=source,
    )
    _REGISTRY[module_type] = target
    return target


def get_target(module: nn.Module) -> Target | None:
    """The registered :class:`Target` for ``module``'s exact type, or ``None``."""
    return _REGISTRY.get(type(module))


def registered_targets() -> list[Target]:
    """Every registered target, in registration order."""
    return list(_REGISTRY.values())


@dataclass(frozen=True)
class Block:
    """A transformer block: ``module`` (at ``path``) holds the sites ``sites[position]``."""

    path: str
    module: nn.Module
    sites: dict[str, str]  # position -> attribute name of the site module in the block

    def site(self, position: str) -> nn.Module:
        return self.module._modules[self.sites[position]]


def find_blocks(model: nn.Module) -> list[Block]:
    """The transformer blocks of ``model``, in module order."""
    blocks = []
    for path, module in model.named_modules():
        if isinstance(module, nn.Sequential):
            continue  # a Sequential runs every child it holds: no room for adapter state there
        found: dict[str, list[str]] = {"attn": [], "mlp": []}
        for name, child in module.named_children():
            target = get_target(child)
            if target is not None:
                found[target.position].append(name)
        if len(found["attn"]) == 1 and len(found["mlp"]) == 1:
            blocks.append(Block(path, module, {p: names[0] for p, names in found.items()}))
    return blocks


def describe_candidates(model: nn.Module, limit: int = 8) -> str:
    """Module types that look like attention or MLP layers, for the unsupported-model error."""
    names: dict[str, None] = {}
    for module in model.modules():
        name = type(module).__name__
        lowered = name.lower()
        if any(key in lowered for key in ("attn", "attention", "mlp", "ffn", "feedforward", "glu")):
            names[f"{type(module).__module__}.{type(module).__qualname__}"] = None
    listed = list(names)[:limit]
    return ", ".join(listed) if listed else "none"


def _register_builtins() -> None:
    from timm.layers import Attention, GluMlp, Mlp, SwiGLU
    from timm.models.beit import Attention as BeitAttention
    from timm.models.eva import EvaAttention
    from timm.models.swin_transformer import WindowAttention
    from timm.models.swin_transformer_v2 import WindowAttention as WindowAttentionV2

    def qkv_width(m: nn.Module) -> int:
        return m.qkv.in_features

    def eva_width(m: nn.Module) -> int:  # fused qkv, or separate q/k/v projections (EVA-02 base)
        return (m.qkv if m.qkv is not None else m.q_proj).in_features

    def fc1_width(m: nn.Module) -> int:
        return m.fc1.in_features

    def first_width(m: nn.Module) -> int:  # torchvision MLPs are nn.Sequential(Linear, ...)
        return m[0].in_features

    for cls in (Attention, BeitAttention, WindowAttention, WindowAttentionV2):
        register_target(cls, "attn", qkv_width, source="timm")
    register_target(EvaAttention, "attn", eva_width, source="timm")
    for cls in (Mlp, GluMlp):
        register_target(cls, "mlp", fc1_width, source="timm")
    register_target(SwiGLU, "mlp", lambda m: m.fc1_g.in_features, source="timm")

    register_target(
        torch.nn.MultiheadAttention, "attn", lambda m: m.embed_dim, qkv_inputs=True, source="torch"
    )
    try:  # torchvision is optional for users (timm depends on it, but keep the core importable).
        from torchvision.models.swin_transformer import (
            ShiftedWindowAttention,
            ShiftedWindowAttentionV2,
        )
        from torchvision.models.vision_transformer import MLPBlock
        from torchvision.ops import MLP
    except ImportError:  # pragma: no cover - exercised only without torchvision
        return
    for cls in (ShiftedWindowAttention, ShiftedWindowAttentionV2):
        register_target(cls, "attn", qkv_width, source="torchvision")
    for cls in (MLPBlock, MLP):
        register_target(cls, "mlp", first_width, source="torchvision")


_register_builtins()
