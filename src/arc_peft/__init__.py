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

from .state import __version__

if TYPE_CHECKING:  # for type checkers and the docs; at run time names load on first use
    from .discovery.sites import LeftOut, Site, SitePlan
    from .discovery.targets import Target, register_target, registered_targets
    from .errors import AdapterFileError, ConfigError, MergeError, UnsupportedModelError
    from .inject import delete_adapter, inject_arc, remove_arc, site_plan
    from .io.hub import create_model, push_adapter_to_hub, save_adapter_folder
    from .io.info import AdapterInfo, read_adapter_info
    from .io.loading import load_adapter
    from .io.saving import save_adapter
    from .merge import merge_adapter, unmerge_adapter
    from .methods import AdapterConfig, config_from_dict, register_method, registered_methods
    from .methods.adaptmlp import AdaptMLPConfig
    from .methods.adaptmlp.layers import AdaptMLP
    from .methods.arc import ARCConfig
    from .methods.arc.layers import ARC
    from .methods.layers import Adapter
    from .runtime.heads import add_head, get_head, task_modules
    from .runtime.multitask import (
        active_adapter,
        disable_adapter,
        mixed_batch,
        set_active_adapter,
        split_logits,
    )
    from .runtime.slots import adapter_configs
    from .training import ParameterCounts, adapter_parameters, count_parameters, freeze_backbone

# Where each public name lives. ``import arc_peft`` imports none of these modules (nor torch):
# the ``arc-peft inspect`` command line reads file headers in a fraction of a second, and the
# first use of a name (``arc_peft.inject_arc``) imports its module.
_LOCATIONS = {
    "discovery.sites": ("LeftOut", "Site", "SitePlan"),
    "discovery.targets": ("Target", "register_target", "registered_targets"),
    "errors": ("AdapterFileError", "ConfigError", "MergeError", "UnsupportedModelError"),
    "inject": ("delete_adapter", "inject_arc", "remove_arc", "site_plan"),
    "io.hub": ("create_model", "push_adapter_to_hub", "save_adapter_folder"),
    "io.info": ("AdapterInfo", "read_adapter_info"),
    "io.loading": ("load_adapter",),
    "io.saving": ("save_adapter",),
    "merge": ("merge_adapter", "unmerge_adapter"),
    "methods": ("AdapterConfig", "config_from_dict", "register_method", "registered_methods"),
    "methods.adaptmlp": ("AdaptMLPConfig",),
    "methods.adaptmlp.layers": ("AdaptMLP",),
    "methods.arc": ("ARCConfig",),
    "methods.arc.layers": ("ARC",),
    "methods.layers": ("Adapter",),
    "training": ("ParameterCounts", "adapter_parameters", "count_parameters", "freeze_backbone"),
    "runtime.heads": ("add_head", "get_head", "task_modules"),
    "runtime.multitask": (
        "active_adapter", "disable_adapter", "mixed_batch", "set_active_adapter", "split_logits"
    ),
    "runtime.slots": ("adapter_configs",),
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


__all__ = [
    "ARC",
    "ARCConfig",
    "AdaptMLP",
    "AdaptMLPConfig",
    "Adapter",
    "AdapterConfig",
    "AdapterFileError",
    "AdapterInfo",
    "ConfigError",
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
    "register_method",
    "register_target",
    "registered_methods",
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
