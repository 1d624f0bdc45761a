"""What an adapter file carries besides the adapter: the classifier head that runs with it and
the modules trained with it (``freeze_backbone(also=...)``, task modules it owns), and, when a
file is loaded, which of them go into the model's own modules and which the adapter owns (see
``arc_peft.runtime.heads``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..runtime import foreign
from ..runtime.heads import (
    check_head_shapes,
    check_path,
    features_into,
    find_head,
    head_like,
    head_path,
    owned,
    running,
)
from ..runtime.slots import adapter_configs
from ..state import BASE_ATTR
from .format import group_by_module, key_prefix

__all__ = ["build_owned", "check_owned", "head_state", "load_plan", "module_like", "with_owned"]


def prefixed(path: str, module: nn.Module) -> dict[str, Tensor]:
    prefix = f"{path}." if path else ""
    return {f"{prefix}{k}": v for k, v in module.state_dict(keep_vars=True).items()}


def head_state(model: nn.Module, name: str | None = None) -> tuple[str, dict[str, Tensor]]:
    """``(head path, {model key: tensor})`` of the head that runs while ``name`` is active (its
    own or the model's; ``None``: the model's); ``("", {})`` if the model has no head."""
    if find_head(model) is None:
        return "", {}
    path = head_path(model)
    # A head in peft's modules_to_save is stored as the copy that trains, under the plain keys.
    return path, prefixed(path, foreign.running_copy(running(model, name, path)))


def with_owned(
    model: nn.Module,
    name: str,
    paths: list[str],
    state: dict[str, Tensor],
    exclude: set[str],
) -> tuple[list[str], dict[str, Tensor]]:
    """The trained modules a file of adapter ``name`` stores (``freeze_backbone(also=...)``'s
    ``paths`` and ``state``), with the modules ``name`` owns added or taking their place."""
    own = {
        p: m
        for p, m in owned(model, name).items()
        if not any(k.startswith(f"{p}.") for k in exclude)
    }
    for path in model.__dict__.get(BASE_ATTR, {}).get(name, ()):
        # Loaded as the only adapter, its trained modules went into the model's own.
        own.setdefault(path, model.get_submodule(path))
    if not own:
        return paths, state
    state = {k: v for k, v in state.items() if not any(k.startswith(f"{p}.") for p in own)}
    for path, module in own.items():
        state.update(prefixed(path, module))
    return sorted({*paths, *own}), state


def load_plan(
    model: nn.Module,
    name: str,
    head: dict[str, Any] | None,
    trained: dict[str, Any] | None,
) -> tuple[dict[str, Any] | None, dict[str, Any] | None, dict[str, tuple[str, dict[str, Any]]]]:
    """Split a file's ``head`` and ``trained`` groups (``{"module"/"modules", "shapes"}``) into
    what is copied into the model's own modules and what adapter ``name`` will own.

    Returns ``(head to copy, trained to copy, {model path: (file path, {key: shape})} to own)``.
    As the only adapter, a head that fits the model's and the trained modules are copied in, as
    in a one-task model; with other adapters on the model, or a head of another shape, they
    become ``name``'s own. A model without a classifier (a ``features_only`` backbone) takes no
    head.
    """
    alone = not set(adapter_configs(model)) - {name}
    own: dict[str, tuple[str, dict[str, Any]]] = {}
    if head is not None and find_head(model) is not None:
        path = head_path(model)
        head_module = foreign.running_copy(model.get_submodule(path))  # peft's trained copy
        base = {k: list(v.shape) for k, v in prefixed(path, head_module).items()}
        prefix = f"{head['module']}." if head["module"] else ""
        relabel = {f"{path}.{k[len(prefix):]}" if path else k[len(prefix) :]: s
                   for k, s in head["shapes"].items()}  # fmt: skip
        if not alone or relabel != base:
            own[path] = (head["module"], head["shapes"])
            head = None
    elif head is not None:
        head = None
    if trained is not None and not alone:
        groups = group_by_module(trained["modules"], trained["shapes"]) or {}  # checked on read
        for path, keys in groups.items():
            own[path] = (path, {k: trained["shapes"][k] for k in keys})
        trained = None
    return head, trained, own


def check_owned(model: nn.Module, plan: dict[str, tuple[str, dict[str, Any]]]) -> None:
    """Check that every module of a ``load_plan`` can be built with exactly the file's shapes,
    before the file's data is read or anything is allocated; ``ValueError`` names what does
    not fit. The model is not changed."""
    for path, (file_path, shapes) in plan.items():
        prefix = key_prefix(file_path)
        try:
            check_path(model, path)
            base = running(model, None, path)
            relative = {k[len(prefix) :]: s for k, s in shapes.items()}
            check_head_shapes(base, relative, _features(model, path))
        except ValueError as exc:
            raise ValueError(f"the stored {path} does not fit: {exc}") from None


def build_owned(
    model: nn.Module, plan: dict[str, tuple[str, dict[str, Any]]], tensors: dict[str, Tensor]
) -> dict[str, nn.Module]:
    """The modules of a ``load_plan``, filled from the file's ``tensors``; ``ValueError``
    names what does not fit. The model is not changed."""
    built = {}
    for path, (file_path, shapes) in plan.items():
        prefix = key_prefix(file_path)
        try:
            built[path] = module_like(model, path, {k[len(prefix) :]: tensors[k] for k in shapes})
        except ValueError as exc:
            raise ValueError(f"the stored {path} does not fit: {exc}") from None
    return built


def _features(model: nn.Module, path: str) -> int | None:
    """What a parameter-free module at ``path`` receives, known for the classifier head only."""
    head = find_head(model)
    return features_into(model) if head is not None and path == head_path(model) else None


def module_like(model: nn.Module, path: str, state: dict[str, Tensor]) -> nn.Module:
    """A copy of the model's own module at ``path`` holding exactly ``state`` (keys relative to
    it); raises ``ValueError`` when it does not fit. The model is not changed."""
    check_path(model, path)
    base = running(model, None, path)
    module = head_like(base, {k: list(v.shape) for k, v in state.items()}, _features(model, path))
    ref = dict(module.state_dict(keep_vars=True))
    with torch.no_grad():
        for key, value in state.items():
            ref[key].copy_(value.to(device=ref[key].device, dtype=ref[key].dtype))
    return module
