"""Adapters inside reentrant activation checkpointing.

Reentrant checkpointing (``torch.utils.checkpoint(..., use_reentrant=True)``, Hugging Face's
``gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})``, timm's
``set_grad_checkpointing`` on older torch) runs each checkpointed block under ``no_grad`` and
gives its output a gradient only if one of the block's *inputs* requires grad. With a frozen
backbone nothing before the first adapter does, so every block's output would be cut off from
the loss and every adapter inside would silently get no gradient.

The fix is peft's ``enable_input_require_grads``, done generically: a forward pre-hook on the
model that was adapted gives its floating-point inputs ``requires_grad`` (a detached alias of the
caller's tensor, which is left untouched) whenever a trainable adapter is about to run with
gradients enabled. Everything downstream, every checkpointed block's input included, then
requires grad. The only cost is the backward of the layers before the first adapter (the patch
embedding): well under 1 % of a ViT's step, and nothing when gradients are off.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .slots import iter_slots, remove_hooks

__all__ = ["install", "uninstall"]


def _needs_grad(value: Any) -> bool:
    return isinstance(value, Tensor) and value.is_floating_point() and not value.requires_grad


def _require_grad(value: Any) -> Any:
    return value.detach().requires_grad_(True) if _needs_grad(value) else value


def inputs_require_grad(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> Any:
    """The pre-hook: a module-level function, so the model still pickles and deep-copies."""
    # Under torch.compile the hook stays out of the graph (a requires_grad_() on a graph value is
    # unsupported there): with torch.compile, checkpoint non-reentrantly, which needs no hook.
    if not torch.is_grad_enabled() or torch.compiler.is_compiling():
        return None
    inputs = [*args, *kwargs.values()]
    if not any(_needs_grad(v) for v in inputs) or any(
        isinstance(v, Tensor) and v.requires_grad for v in inputs
    ):
        return None  # already differentiable (or nothing to make so)
    trainable = any(
        p.requires_grad
        for _, _, slot in iter_slots(module)
        for adapter in slot.values()
        for p in adapter.parameters()
    )
    if not trainable:
        return None
    return tuple(_require_grad(v) for v in args), {k: _require_grad(v) for k, v in kwargs.items()}


def install(model: nn.Module) -> None:
    """Give ``model`` the pre-hook (once)."""
    if not any(fn is inputs_require_grad for fn in model._forward_pre_hooks.values()):
        model.register_forward_pre_hook(inputs_require_grad, with_kwargs=True)


def uninstall(model: nn.Module) -> None:
    """Remove the pre-hook (when ``model`` no longer holds adapters)."""
    remove_hooks(model, lambda fn: fn is inputs_require_grad)
