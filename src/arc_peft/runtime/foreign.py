"""Other libraries' adapter layers in the same model (peft's LoRA, its ``modules_to_save``
copies): what arc_peft must neither adapt, save, nor fold into.

peft replaces a layer by its own module holding the original (``base_layer``) next to its
adapter weights. Injecting arc_peft *after* peft would find those inner layers instead of the
model's (ARC on ``qkv.lora_B``, LoRA's rank as the width), so it is refused, naming peft; the
supported order is arc_peft first, then ``peft.get_peft_model`` (docs/recipes.md). With peft's
layers present, ``save_adapter`` stores arc_peft's adapters only (peft saves its own) and
``merge_adapter`` refuses, naming the layer.

Nothing here imports peft: its layers can only exist if it has been imported.
"""

from __future__ import annotations

import sys

from torch import nn

__all__ = ["describe", "foreign_layers", "running_copy"]


def _peft_containers() -> tuple[type, ...]:
    """peft's model-level wrappers (``PeftModel``, ``LoraModel``...): they hold the user's
    model, they are not layers of it."""
    found: list[type] = []
    for module, name in (
        ("peft.peft_model", "PeftModel"),
        ("peft.tuners.tuners_utils", "BaseTuner"),
    ):
        cls = getattr(sys.modules.get(module), name, None)
        if isinstance(cls, type):
            found.append(cls)
    return tuple(found)


def foreign_layers(model: nn.Module) -> dict[str, nn.Module]:
    """``{path: module}`` of peft's layers in ``model``, outermost only (empty if peft was never
    imported)."""
    if "peft" not in sys.modules:
        return {}
    containers = _peft_containers()
    found: dict[str, nn.Module] = {}
    for path, module in model.named_modules():
        if not type(module).__module__.startswith("peft.") or isinstance(module, containers):
            continue
        if any(path.startswith(f"{p}.") for p in found):
            continue
        found[path] = module
    return found


def describe(layers: dict[str, nn.Module], limit: int = 3) -> str:
    """``"peft Linear at blocks.0.attn.qkv, ... (and 10 more)"``."""
    shown = [f"{type(m).__name__} at {p or '<root>'}" for p, m in list(layers.items())[:limit]]
    more = f" (and {len(layers) - limit} more)" if len(layers) > limit else ""
    return "peft " + ", ".join(shown) + more


def running_copy(module: nn.Module) -> nn.Module:
    """The module that runs in place of ``module``: for peft's ``modules_to_save`` wrapper (a
    head in ``modules_to_save``), the trained copy of the active peft adapter (the original when
    peft's adapters are disabled), so that a saved head has the plain layer's keys; any other
    module itself."""
    copies = getattr(module, "modules_to_save", None)
    if not type(module).__module__.startswith("peft.") or not isinstance(copies, nn.ModuleDict):
        return module
    active = getattr(module, "active_adapters", None) or []
    if getattr(module, "disable_adapters", False) or not active or active[0] not in copies:
        return getattr(module, "original_module", module)
    return copies[active[0]]
