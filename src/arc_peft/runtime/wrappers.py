"""Models inside wrappers: ``torch.compile``, DDP, DataParallel and FSDP2 (``fully_shard``).

The file verbs look through a wrapper to the model it holds (so a file saved from a wrapped model
has the plain model's keys and class), while injecting into a wrapped or already compiled model
is refused or flagged: the wrapper would not see the new adapter parameters (DDP would not
all-reduce their gradients, FSDP would not shard them) or hooks (a compiled graph does not
guard on them), and nothing else would say so.

Nothing here imports ``torch.distributed`` or ``torch._dynamo``: a wrapper can only exist if its
module has already been imported, so ``sys.modules`` is checked first.
"""

from __future__ import annotations

import gc
import sys
import warnings

from torch import Tensor, nn

from ..state import PLAN_ATTR
from .heads import find_head
from .slots import iter_slots

__all__ = [
    "adapted_model",
    "check_injectable",
    "full_tensor",
    "is_sharded",
    "original_class",
    "reshard",
    "unwrap",
]


def _wrapped(model: nn.Module) -> nn.Module | None:
    """The module a ``torch.compile`` / DDP / DataParallel wrapper holds, or ``None``."""
    if type(model).__name__ == "OptimizedModule" and isinstance(
        getattr(model, "_orig_mod", None), nn.Module
    ):
        return model._orig_mod
    if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        return model.module
    return None


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model inside any nesting of ``torch.compile`` / DDP / DataParallel wrappers."""
    inner = _wrapped(model)
    while inner is not None:
        model, inner = inner, _wrapped(inner)
    return model


def adapted_model(model: nn.Module) -> nn.Module:
    """The adapted model a file verb acts on: ``model`` (inside any framework wrapper), or,
    when ``model`` is a plain container around it (a LightningModule, a PeftModel, any module
    holding the adapted model as a submodule, with no classifier head of its own), the one
    adapted model inside: the module ``inject_arc`` / ``load_adapter`` was called on. Several
    are refused, naming them. A module with its own head around an adapted backbone (a
    transformers classifier adapted at ``.vit``) is the model itself: its head goes with it."""
    model = unwrap(model)
    if PLAN_ATTR in model.__dict__:
        return model
    found = [
        (path, module)
        for path, module in model.named_modules()
        if path and PLAN_ATTR in module.__dict__ and iter_slots(module)
    ]
    outermost = [
        (path, m) for path, m in found if not any(path.startswith(f"{p}.") for p, _ in found)
    ]
    head = find_head(model)
    if head is not None and not any(
        any(m is head for m in inner.modules()) for _, inner in outermost
    ):
        # A head of its own, outside the adapted part (not one peft's PeftModel merely
        # forwards from the model it holds): this is the model.
        return model
    if len(outermost) > 1:
        raise ValueError(
            f"{type(model).__name__} holds several adapted models "
            f"({', '.join(p for p, _ in outermost)}): pass the one you mean "
            f"(e.g. arc_peft.save_adapter(wrapper.{outermost[0][0]}, ...))"
        )
    return outermost[0][1] if outermost else model


def _fsdp_module_class() -> type | None:
    fsdp = sys.modules.get("torch.distributed.fsdp")
    return getattr(fsdp, "FSDPModule", None) if fsdp is not None else None


def original_class(model: nn.Module) -> type:
    """The model's own class: ``fully_shard`` swaps it for a generated ``FSDP<Name>`` subclass."""
    cls = type(model)
    fsdp_module = _fsdp_module_class()
    if fsdp_module is not None and issubclass(cls, fsdp_module):
        for base in cls.__mro__[1:]:
            if not issubclass(base, fsdp_module):
                return base
    return cls


def reshard(model: nn.Module) -> None:
    """Put every FSDP2 unit of ``model`` in its sharded state, so that its registered parameters
    are the sharded DTensors the unit keeps. Between a forward pass and the next reshard, a unit
    that did not reshard after forward (the root, by default) has its *unsharded* parameters
    registered instead, whose memory FSDP frees at the next reshard: a tensor read from them
    would then point at freed memory, and a value written into them would be lost."""
    fsdp_module = _fsdp_module_class()
    if fsdp_module is None:
        return
    for module in model.modules():
        if isinstance(module, fsdp_module):
            module.reshard()


def is_sharded(tensor: Tensor) -> bool:
    """Whether ``tensor`` is a DTensor (an FSDP2 / tensor-parallel shard)."""
    dtensor = sys.modules.get("torch.distributed.tensor")
    cls = getattr(dtensor, "DTensor", None) if dtensor is not None else None
    return cls is not None and isinstance(tensor, cls)


def full_tensor(tensor: Tensor) -> Tensor:
    """The whole tensor behind a DTensor (a collective: every rank must call it), else itself."""
    return tensor.full_tensor() if is_sharded(tensor) else tensor


def _compiled_code(model: nn.Module) -> bool:
    """Whether a compiled version of ``model`` has run: it was compiled in place
    (``model.compile()``), or a live ``torch.compile(model)`` wrapper holds it and Dynamo holds
    compiled code for its class's forward. (The compiled code alone does not say which model
    ran it: its guards match any instance of the class, so another model of the class that was
    never compiled must not be flagged.)"""
    if getattr(model, "_compiled_call_impl", None) is not None:
        return True
    if "torch._dynamo" not in sys.modules:
        return False
    try:
        from torch._C._dynamo.eval_frame import _debug_get_cache_entry_list
    except ImportError:  # a private helper: if it moves, say nothing rather than fail
        return False
    forward = getattr(type(model).forward, "__code__", None)
    if forward is None or not _debug_get_cache_entry_list(forward):
        return False
    return _held_by_compiled_wrapper(model)


def _held_by_compiled_wrapper(model: nn.Module) -> bool:
    """Whether a live ``torch.compile`` wrapper (``OptimizedModule``) holds ``model``. Found
    through the objects that refer to ``model``: the wrapper keeps it in its ``_modules`` dict,
    which the wrapper's attribute dict refers to. Two scans of the heap (a fraction of a second),
    only made once compiled code for the model's class exists: an ordinary injection never
    scans."""
    held_in = [r for r in gc.get_referrers(model) if isinstance(r, dict)]
    ids = {id(d) for d in held_in}
    for owner in gc.get_referrers(*held_in) if held_in else ():
        # The wrapper itself or its ``__dict__``, depending on how Python lays the instance out.
        attrs = vars(owner) if isinstance(owner, nn.Module) else owner
        if not isinstance(attrs, dict) or id(attrs.get("_modules")) not in ids:
            continue
        if "dynamo_ctx" in attrs and attrs["_modules"].get("_orig_mod") is model:
            return True
    return False


def check_injectable(model: nn.Module, verb: str, stacklevel: int = 3) -> None:
    """Refuse to add adapters to a wrapped or sharded model; warn if it was already compiled
    (the warning points ``stacklevel`` frames up: the user's call)."""
    inner = _wrapped(model)
    if inner is not None:
        kind = type(model).__name__
        raise ValueError(
            f"{verb}: the model is wrapped in {kind}, which would not see the new adapter "
            f"(DDP would not synchronise its gradients; a compiled graph ignores its hooks). Add "
            f"adapters to the plain model first ({verb}(model, ...)), then wrap or compile it"
        )
    fsdp_module = _fsdp_module_class()
    fsdp = fsdp_module is not None and any(isinstance(m, fsdp_module) for m in model.modules())
    if fsdp or any(is_sharded(p) for p in model.parameters()):
        raise ValueError(
            f"{verb}: {original_class(model).__name__} is already sharded (FSDP fully_shard), "
            "which would not manage the new adapter parameters. Add adapters (or load the file) "
            "before sharding"
        )
    if _compiled_code(model):
        warnings.warn(
            f"{verb}: torch.compile has already compiled {type(model).__name__}.forward; a "
            "compiled model does not see adapters added after it ran (its graph does not guard "
            "on hooks) and keeps computing without them. Add adapters before compiling, or "
            "compile again after torch._dynamo.reset()",
            stacklevel=stacklevel,
        )
