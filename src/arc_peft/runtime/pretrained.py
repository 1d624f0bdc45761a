"""Hugging Face transformers models: ``save_pretrained`` that keeps the adapters, and reentrant
activation checkpointing that still trains them.

``save_pretrained`` stores the adapter tensors as extra keys, and ``from_pretrained`` drops them
(they are unexpected keys of the plain architecture; transformers 5 also renames keys on save
and not back on load). So on a transformers model that holds adapters, ``save_pretrained`` also
writes the adapter file next to the weights (``adapter.safetensors``, the file
``arc_peft.load_adapter(model, folder)`` reads) and warns once how to get the adapters back.
The original method runs unchanged; the override is an instance attribute removed with the last
adapter, so a merged or cleaned model is the plain model again.

Reentrant activation checkpointing (``use_reentrant=True``) runs a checkpointed block without
autograd and recomputes it in the backward pass only if the block's *input* requires grad. With a
frozen embedding it does not, so no adapter inside would get a gradient. While a model's
gradient checkpointing is switched on (transformers ``gradient_checkpointing_enable``, timm
``set_grad_checkpointing``), a forward hook on its patch embedding makes that output require
grad, as peft's ``enable_input_require_grads`` does; off, it does nothing (no extra memory).
"""

from __future__ import annotations

import importlib
import os
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .slots import iter_slots, remove_hooks

__all__ = [
    "AdaptersNotRestoredWarning",
    "guard",
    "unguard",
]

_ATTR = "save_pretrained"
# The file layer sits above this one: named, as method builders are in the registry, and
# imported when a save happens.
_SAVER = "arc_peft.io.saving:save_adapter"
_FILE_NAME = "arc_peft.io.sources:ADAPTER_FILE"  # the name load_adapter(model, folder) reads


class AdaptersNotRestoredWarning(UserWarning):
    """``save_pretrained`` kept the adapters in a separate file that ``from_pretrained`` does
    not read: load it with ``arc_peft.load_adapter`` after ``from_pretrained``."""


def _named(reference: str) -> Any:
    module, _, name = reference.partition(":")
    return getattr(importlib.import_module(module), name)


class _SavePretrained:
    """``model.save_pretrained`` that also writes the adapter file into the folder. A plain
    object (not a closure) so that the model still pickles and deep-copies."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __call__(self, save_directory: str | os.PathLike[str], *args: Any, **kwargs: Any) -> Any:
        model = self.model
        result = type(model).save_pretrained(model, save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True) and iter_slots(model):
            path = os.path.join(os.fspath(save_directory), _named(_FILE_NAME))
            save: Callable[[nn.Module, str], None] = _named(_SAVER)
            save(model, path)
            warnings.warn(
                f"{type(model).__name__}.save_pretrained: from_pretrained does not restore "
                f"arc_peft adapters (it drops their keys); they are also saved to {path}. After "
                "from_pretrained, call arc_peft.load_adapter(model, folder); or merge_adapter "
                "before save_pretrained for a plain model",
                AdaptersNotRestoredWarning,
                stacklevel=2,
            )
        return result


class _InputRequiresGrad:
    """A forward hook on the patch embedding: its output requires grad while the model's
    gradient checkpointing is on (see the module docstring)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __call__(self, module: nn.Module, args: Any, output: Any) -> Any:
        model = self.model
        on = bool(getattr(model, "is_gradient_checkpointing", False)) or bool(
            getattr(model, "grad_checkpointing", False)
        )
        if (
            on
            and model.training
            and torch.is_grad_enabled()
            and isinstance(output, torch.Tensor)
            and not output.requires_grad
            and output.is_floating_point()
        ):
            output.requires_grad_(True)
        return output


def _embedding(model: nn.Module) -> nn.Module | None:
    """The module producing the tokens the blocks read: transformers' ``get_input_embeddings()``,
    else timm's ``patch_embed`` or torchvision's ``conv_proj``."""
    get = getattr(model, "get_input_embeddings", None)
    if callable(get):
        try:
            found = get()
        except (NotImplementedError, AttributeError):
            found = None
        if isinstance(found, nn.Module):
            return found
    for attr in ("patch_embed", "conv_proj"):
        found = getattr(model, attr, None)
        if isinstance(found, nn.Module):
            return found
    return None


def guard(model: nn.Module) -> None:
    """Install both on ``model`` (once; see the module docstring)."""
    is_transformers = type(model).__module__.startswith("transformers.")
    saves = is_transformers and callable(getattr(type(model), _ATTR, None))
    if saves and not isinstance(model.__dict__.get(_ATTR), _SavePretrained):
        model.__dict__[_ATTR] = _SavePretrained(model)
    embedding = _embedding(model)
    if embedding is not None and not any(
        isinstance(h, _InputRequiresGrad) and h.model is model
        for h in embedding._forward_hooks.values()
    ):
        embedding.register_forward_hook(_InputRequiresGrad(model))


def unguard(model: nn.Module) -> None:
    """Remove both once ``model`` holds no adapter."""
    if iter_slots(model):
        return
    if isinstance(model.__dict__.get(_ATTR), _SavePretrained):
        del model.__dict__[_ATTR]
    for module in model.modules():
        remove_hooks(module, lambda fn: isinstance(fn, _InputRequiresGrad) and fn.model is model)
