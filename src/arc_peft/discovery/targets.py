"""The registry: per-module-type knowledge that the probe cannot infer. Two uses:

* **Exact merge rules** for layouts the generic fold cannot see through: the built-in entries,
  from ``merge_rules.py``. They never decide *where* adapters go.
* **Overrides** from users: ``arc_peft.register_target(MyAttention, position="attn")`` makes
  every module of that type a site of that position, whatever discovery concluded. Prefer the
  per-call ``target_modules`` / ``exclude_modules`` config fields to choose among sites.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from .merge_rules import BUILTIN_RULES, MergeFn

__all__ = ["Target", "get_target", "register_target", "registered_targets"]


@dataclass(frozen=True)
class Target:
    """What arc_peft knows about one module type.

    Attributes:
        module_type: The attention or MLP class (matched exactly, not by ``isinstance``: a subclass
            may compute differently and must be registered on its own).
        position: ``"attn"`` or ``"mlp"``.
        width: Returns the module's input width ``D``; ``None``: read it from the probe.
        merge: Folds an ARC adapter into the module's input layers (``None``: the generic fold).
        source: Where the type comes from (``"user"`` for user registrations).
        override: Every module of this type is a site of ``position`` (user registrations);
            ``False`` for built-in entries, which only carry a merge rule.
    """

    module_type: type
    position: str
    width: Callable[[nn.Module], int] | None = None
    merge: MergeFn | None = None
    source: str = "user"
    override: bool = True


_REGISTRY: dict[type, Target] = {}
_GENERATION = 0


def register_target(
    module_type: type,
    position: str,
    width: Callable[[nn.Module], int] | None = None,
    *,
    merge: MergeFn | None = None,
    source: str = "user",
    replace: bool = False,
) -> Target:
    """Make every module of ``module_type`` an adapter site of ``position`` (an override of
    discovery, for modules the probe does not recognise), optionally with an exact merge rule.

    Args:
        module_type: The class to adapt (an ``nn.Module`` subclass).
        position: ``"attn"`` or ``"mlp"``.
        width: Returns the input width; default: read from the probe forward.
        merge: Optional exact-merge function (see ``MergeFn``).
        source: A label for the supported-models table.
        replace: Allow overriding an existing registration (built-in merge rules included).
            Takes effect at the next ``arc_peft.inject_arc``, not on adapters already there.

    Returns:
        The registered ``Target``.
    """
    if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise TypeError(f"register_target expects an nn.Module subclass, got {module_type!r}")
    if position not in ("attn", "mlp"):
        raise ValueError(
            f"register_target position={position!r} is invalid: expected 'attn' or 'mlp'"
        )
    _ensure_builtins()
    if module_type in _REGISTRY and not replace:
        raise ValueError(
            f"{module_type.__qualname__} is already registered (position "
            f"{_REGISTRY[module_type].position!r}); pass replace=True to override it for the "
            "next inject_arc (adapters already injected stay where they are: remove_arc and "
            "inject again to move them)"
        )
    target = Target(module_type, position, width, merge, source, override=source == "user")
    _REGISTRY[module_type] = target
    global _GENERATION
    _GENERATION += 1  # site plans probed before this change are stale
    return target


def registry_generation() -> int:
    """A number that changes whenever a target is registered: a site plan kept on a model is
    reused only while it is the same."""
    _ensure_builtins()  # their (lazy) registration is no change a plan could miss
    return _GENERATION


def get_target(module: nn.Module) -> Target | None:
    """The registered ``Target`` for ``module``'s exact type, or ``None``."""
    _ensure_builtins()
    return _REGISTRY.get(type(module))


def registered_targets() -> list[Target]:
    """Every registered target, in registration order."""
    _ensure_builtins()
    return list(_REGISTRY.values())


_BUILTINS_DONE = False


def _ensure_builtins() -> None:
    """Register the built-in merge rules on first use, not at ``import arc_peft``: importing the
    timm and torchvision modules that define these classes costs seconds."""
    global _BUILTINS_DONE
    if _BUILTINS_DONE:
        return
    _BUILTINS_DONE = True
    for module_name, class_name, position, merge, source in BUILTIN_RULES:
        try:  # torchvision is optional for users (timm depends on it; keep the core importable)
            cls = getattr(importlib.import_module(module_name), class_name)
        except ImportError:  # pragma: no cover - exercised only without torchvision
            continue
        _REGISTRY[cls] = Target(cls, position, None, merge, source, override=False)
