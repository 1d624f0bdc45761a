"""arc_peft: ARC and AdaptMLP adapters for any timm or torchvision vision transformer.

The public API is a handful of verbs on a whole model::

    import timm, arc_peft
    model = timm.create_model("vit_base_patch16_224", pretrained=True, num_classes=100)
    arc_peft.inject_arc(model, arc_peft.ARCConfig(rank=50))
    arc_peft.freeze_backbone(model)
    print(arc_peft.count_parameters(model))
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # for type checkers and the docs; at run time names load on first use
    from .config import AdapterConfig, AdaptMLPConfig, ARCConfig, config_from_dict
    from .discover import LeftOut, Site, SitePlan
    from .errors import AdapterFileError, MergeError, UnsupportedModelError
    from .heads import add_head, task_modules
    from .hub import create_model, push_adapter_to_hub, save_adapter_folder
    from .info import AdapterInfo, read_adapter_info
    from .inject import adapter_configs, delete_adapter, inject_arc, remove_arc, site_plan
    from .loading import load_adapter
    from .merge import merge_adapter, unmerge_adapter
    from .modules import ARC, Adapter, AdaptMLP
    from .multitask import (
        active_adapter,
        disable_adapter,
        mixed_batch,
        set_active_adapter,
        split_logits,
    )
    from .params import (
        ParameterCounts,
        adapter_parameters,
        count_parameters,
        freeze_backbone,
        get_head,
    )
    from .saving import save_adapter
    from .targets import Target, register_target, registered_targets

# Where each public name lives. ``import arc_peft`` imports none of these modules (nor torch):
# the ``arc-peft inspect`` command line reads file headers in a fraction of a second, and the
# first use of a name (``arc_peft.inject_arc``) imports its module.
_LOCATIONS = {
    "config": ("AdapterConfig", "AdaptMLPConfig", "ARCConfig", "config_from_dict"),
    "discover": ("LeftOut", "Site", "SitePlan"),
    "errors": ("AdapterFileError", "MergeError", "UnsupportedModelError"),
    "heads": ("add_head", "task_modules"),
    "hub": ("create_model", "push_adapter_to_hub", "save_adapter_folder"),
    "info": ("AdapterInfo", "read_adapter_info"),
    "inject": ("adapter_configs", "delete_adapter", "inject_arc", "remove_arc", "site_plan"),
    "loading": ("load_adapter",),
    "merge": ("merge_adapter", "unmerge_adapter"),
    "modules": ("ARC", "Adapter", "AdaptMLP"),
    "multitask": (
        "active_adapter", "disable_adapter", "mixed_batch", "set_active_adapter", "split_logits"
    ),
    "params": (
        "ParameterCounts", "adapter_parameters", "count_parameters", "freeze_backbone", "get_head"
    ),
    "saving": ("save_adapter",),
    "targets": ("Target", "register_target", "registered_targets"),
}  # fmt: skip
_MODULE_OF = {name: module for module, names in _LOCATIONS.items() for name in names}


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'arc_peft' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


__version__ = "0.1.0"

__all__ = [
    "ARC",
    "ARCConfig",
    "AdaptMLP",
    "AdaptMLPConfig",
    "Adapter",
    "AdapterConfig",
    "AdapterFileError",
    "AdapterInfo",
    "LeftOut",
    "MergeError",
    "ParameterCounts",
    "Site",
    "SitePlan",
    "Target",
    "UnsupportedModelError",
    "__version__",
    "active_adapter",
    "adapter_configs",
    "adapter_parameters",
    "add_head",
    "config_from_dict",
    "count_parameters",
    "create_model",
    "delete_adapter",
    "disable_adapter",
    "freeze_backbone",
    "get_head",
    "inject_arc",
    "load_adapter",
    "merge_adapter",
    "mixed_batch",
    "push_adapter_to_hub",
    "read_adapter_info",
    "register_target",
    "registered_targets",
    "remove_arc",
    "save_adapter",
    "save_adapter_folder",
    "set_active_adapter",
    "site_plan",
    "split_logits",
    "task_modules",
    "unmerge_adapter",
]
