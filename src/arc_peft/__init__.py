"""arc_peft: ARC and AdaptMLP adapters for any timm or torchvision vision transformer.

The public API is a handful of verbs on a whole model::

    import timm, arc_peft
    model = timm.create_model("vit_base_patch16_224", pretrained=True, num_classes=100)
    arc_peft.inject_arc(model, arc_peft.ARCConfig(rank=50))
    arc_peft.freeze_backbone(model)
    print(arc_peft.count_parameters(model))
"""

from .config import AdapterConfig, AdaptMLPConfig, ARCConfig, config_from_dict
from .discover import LeftOut, Site, SitePlan
from .errors import AdapterFileError, MergeError, UnsupportedModelError
from .heads import add_head, split_logits, task_modules
from .hub import create_model, push_adapter_to_hub, save_adapter_folder
from .inject import adapter_configs, delete_adapter, inject_arc, remove_arc, site_plan
from .io import AdapterInfo, load_adapter, read_adapter_info, save_adapter
from .merge import merge_adapter, unmerge_adapter
from .modules import ARC, Adapter, AdaptMLP
from .multitask import active_adapter, disable_adapter, mixed_batch, set_active_adapter
from .params import ParameterCounts, adapter_parameters, count_parameters, freeze_backbone, get_head
from .targets import Target, register_target, registered_targets

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
