"""``save_pretrained`` of an adapted Hugging Face-style model (transformers, diffusers).

``save_pretrained`` writes the adapter tensors with the model's weights, but ``from_pretrained``
builds the plain class, which has no adapter to receive them: transformers reports them among
"unexpected keys" and the model comes back without adapters, nothing else said. So an adapted
model's ``save_pretrained`` is wrapped (an instance attribute, removed with the last adapter)
to warn, after saving, naming the route that keeps them: ``save_adapter`` into the same folder
and ``load_adapter(model, folder)`` after ``from_pretrained``, or, for ``Trainer`` checkpoints,
``arc_peft.integrations.transformers.ArcPeftCallback``.
"""

from __future__ import annotations

import functools
import os
import warnings
from typing import Any

from torch import nn

from ..errors import AdaptersNotSavedWarning
from .slots import adapter_configs

__all__ = ["install", "uninstall"]


def _save_pretrained(model: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """The wrapper: a module-level function (in a ``partial``) so the model pickles and copies."""
    result = type(model).save_pretrained(model, *args, **kwargs)
    names = sorted(adapter_configs(model))
    if names:
        folder = os.fspath(args[0] if args else kwargs.get("save_directory", "<folder>"))
        warnings.warn(
            f"{type(model).__name__}.save_pretrained({folder!r}) stored arc_peft adapter(s) "
            f"{names} under keys that from_pretrained drops (the plain class has no adapters): "
            "the model loaded back would run without them. Keep them with "
            f"arc_peft.save_adapter(model, os.path.join({folder!r}, 'adapter.safetensors')) and "
            "call arc_peft.load_adapter(model, folder) after from_pretrained; in a Trainer, "
            "add arc_peft.integrations.transformers.ArcPeftCallback(), which does both for each "
            "checkpoint; or merge first (arc_peft.merge_adapter): a merged model round-trips",
            AdaptersNotSavedWarning,
            stacklevel=2,
        )
    return result


def install(model: nn.Module) -> None:
    """Wrap ``model.save_pretrained`` if its class has one (once)."""
    if callable(getattr(type(model), "save_pretrained", None)):
        model.__dict__["save_pretrained"] = functools.partial(_save_pretrained, model)


def uninstall(model: nn.Module) -> None:
    """Give ``model`` its class's ``save_pretrained`` back."""
    wrapper = model.__dict__.get("save_pretrained")
    if getattr(wrapper, "func", None) is _save_pretrained:
        del model.__dict__["save_pretrained"]
