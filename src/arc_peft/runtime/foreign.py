"""Layers of another adapter library in the same model: peft's tuner layers (``lora.Linear``
wrapping a backbone ``nn.Linear`` as ``base_layer``, with its own ``lora_A`` / ``lora_B``) and
its ``modules_to_save`` copies.

They change what the probe sees (LoRA's bottleneck ``lora_B`` reads a tensor that queries, keys
and values are all computed from, so it would pass for the attention input), what a merge folds
into (the effective weight is no longer the ``nn.Linear``'s), and what is trainable (peft saves
its own parameters with ``save_pretrained``). Found by the class's package, never by parameter
names, and without importing peft.
"""

from __future__ import annotations

from torch import nn

__all__ = [
    "FOREIGN_PACKAGES",
    "describe",
    "foreign_layers",
    "foreign_parameter_ids",
    "is_foreign",
]

# Packages whose modules wrap backbone layers in place.
FOREIGN_PACKAGES = ("peft",)


def is_foreign(module: nn.Module) -> bool:
    """Whether ``module``'s class comes from a foreign adapter library."""
    return type(module).__module__.split(".")[0] in FOREIGN_PACKAGES


def _wrapped(module: nn.Module) -> nn.Module | None:
    """The backbone layer a foreign module wraps (peft's public ``get_base_layer()``, or a
    ``modules_to_save`` wrapper's ``original_module``), or ``None`` if it wraps none."""
    get = getattr(module, "get_base_layer", None)
    inner = get() if callable(get) else getattr(module, "original_module", None)
    return inner if isinstance(inner, nn.Module) and inner is not module else None


def foreign_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(path, module)`` of every outermost foreign module under ``model`` that wraps a
    backbone layer (so not a ``PeftModel`` / ``LoraModel`` holding the whole model)."""
    found: list[tuple[str, nn.Module]] = []
    for path, module in model.named_modules():
        inside = any(path.startswith(p + ".") for p, _ in found)
        if not inside and is_foreign(module) and _wrapped(module) is not None:
            found.append((path, module))
    return found


def foreign_parameter_ids(model: nn.Module) -> set[int]:
    """Ids of the parameters that foreign modules add (LoRA's ``lora_A`` / ``lora_B``, a
    ``modules_to_save`` copy), not those of the backbone layers they wrap."""
    ids: set[int] = set()
    for _, layer in foreign_layers(model):
        wrapped = _wrapped(layer)
        own = {id(p) for p in wrapped.parameters()} if wrapped is not None else set()
        ids |= {id(p) for p in layer.parameters()} - own
    return ids


def describe(layers: list[tuple[str, nn.Module]], limit: int = 3) -> str:
    """``"blocks.0.attn.qkv (peft.tuners.lora.layer.Linear), ..."`` for messages."""
    shown = ", ".join(
        f"{p} ({type(m).__module__}.{type(m).__qualname__})" for p, m in layers[:limit]
    )
    return shown + (f" and {len(layers) - limit} more" if len(layers) > limit else "")
