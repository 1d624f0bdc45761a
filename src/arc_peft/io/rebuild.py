"""What a file records so that ``create_model`` rebuilds the exact backbone it was trained on.

timm keeps no record of the keyword arguments ``timm.create_model`` was given (an adapter
trained at ``img_size=32, patch_size=8`` was rebuilt at 224 px, patch 16, and then refused), nor
of whether pretrained weights were loaded (its ``pretrained_cfg`` names the default tag either
way). So both are read off the built model:

- **Builder arguments**: the values of the arguments in ``TIMM_ARGS`` (a small declarative table:
  argument name → where a built timm model keeps it) that differ from the entrypoint's defaults,
  found by building the default model on the meta device (nothing allocated). The record is then
  checked the same way: the entrypoint with those arguments must give every backbone tensor the
  model's shape; if it does not (an argument outside the table changed the model), the file
  says so (``args_complete: false``) and ``create_model`` warns.
- **Pretrained or not**: a randomly initialised network has every normalisation layer at its
  initial values (weight 1, bias 0: the same in every library); a trained one never has.
"""

from __future__ import annotations

import functools
import re
import warnings
from typing import Any

import torch
from torch import nn

from ..runtime.wrappers import is_sharded
from ..state import TRAINED_ATTR
from .format import FileProblem

__all__ = ["TIMM_ARGS", "build_arguments", "checked_arguments", "pretrained_weights"]

# Argument of timm's model constructors -> where the built model keeps its value: a dotted
# attribute path (``len:`` counts a sequence of blocks; ``stages:A:B`` reads B on each stage of
# the sequence A, for per-stage arguments), or alternatives tried in order; each is tried on the
# model and on the network a features_only model wraps at ``.model``.
TIMM_ARGS: dict[str, tuple[str, ...]] = {
    "img_size": ("patch_embed.img_size",),
    "patch_size": ("patch_embed.patch_size",),
    "in_chans": ("in_chans",),
    "embed_dim": ("embed_dim",),
    "depth": ("len:blocks",),
    "depths": ("stages:layers:len:blocks",),
    "num_heads": ("blocks.0.attn.num_heads", "stages:layers:blocks.0.attn.num_heads"),
    "window_size": ("layers.0.blocks.0.window_size",),
    "global_pool": ("global_pool",),
    "class_token": ("has_class_token",),
    "reg_tokens": ("num_reg_tokens",),
}
_NAME = re.compile(r"[A-Za-z0-9_]{0,40}")
_MAX_INT = 1 << 16


def _read(model: nn.Module, where: str) -> Any:
    if where.startswith("stages:"):
        _, stages, inner = where.split(":", 2)
        seq = _read(model, stages)
        if not isinstance(seq, (nn.ModuleList, nn.Sequential)) or not len(seq):
            return None
        values = [_read(stage, inner) for stage in seq]
        return values if all(isinstance(v, int) for v in values) and _valid(values) else None
    count = where.startswith("len:")
    value: Any = model
    for part in where.removeprefix("len:").split("."):
        if isinstance(value, (nn.ModuleList, nn.Sequential)) and part.isdigit():
            value = value[int(part)] if int(part) < len(value) else None
        else:
            value = getattr(value, part, None)
        if value is None:
            return None
    if count:
        return len(value) if isinstance(value, (nn.ModuleList, nn.Sequential)) else None
    if isinstance(value, nn.Module):
        return value  # a stage sequence, for "stages:"
    if isinstance(value, tuple):
        value = list(value)
    return value if _valid(value) else None


def _valid(value: Any) -> bool:
    """A value a file may carry back into ``timm.create_model``: a small int, a bool, a short
    name, or a list of up to eight small ints."""
    if isinstance(value, bool):
        return True
    if isinstance(value, int):
        return 0 <= value <= _MAX_INT
    if isinstance(value, str):
        return bool(_NAME.fullmatch(value))
    if isinstance(value, list):
        return 0 < len(value) <= 8 and all(
            isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= _MAX_INT for v in value
        )
    return False


def _readings(model: nn.Module) -> dict[str, Any]:
    found = {}
    inner = getattr(model, "model", None)  # timm features_only wraps the network
    roots = [model] + ([inner] if isinstance(inner, nn.Module) else [])
    for name, alternatives in TIMM_ARGS.items():
        for root in roots:
            value = next((v for w in alternatives if (v := _read(root, w)) is not None), None)
            if value is not None and not isinstance(value, nn.Module):
                found[name] = value
                break
    return found


def _on_meta(architecture: str, **kwargs: Any) -> nn.Module:
    import timm

    with torch.random.fork_rng(devices=[]), torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return timm.create_model(architecture, pretrained=False, **kwargs)


@functools.lru_cache(maxsize=32)
def _defaults(architecture: str) -> tuple[tuple[str, Any], ...]:
    readings = _readings(_on_meta(architecture))
    return tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in readings.items())


def _shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """The backbone's tensor shapes: the adapters' and task heads' (under ``arc_peft``-named
    modules) are not the builder's to make."""
    return {
        k: tuple(v.shape)
        for k, v in model.state_dict(keep_vars=True).items()
        if not any(part.startswith("arc_peft") for part in k.split("."))
    }


def build_arguments(model: nn.Module, architecture: str) -> tuple[dict[str, Any], bool] | None:
    """``(arguments, complete)`` for a timm model built from ``architecture``: the table's
    arguments whose values differ from the entrypoint's defaults (``num_classes`` excluded:
    files carry the head), and whether the entrypoint given them rebuilds every backbone tensor
    at the model's shape. ``None`` when the entrypoint cannot be built on the meta device."""
    try:
        defaults = dict(_defaults(architecture))
    except Exception:  # a constructor that computes on its tensors, a removed entrypoint
        return None
    found = _readings(model)
    args = {
        k: v
        for k, v in found.items()
        if k in defaults and (tuple(v) if isinstance(v, list) else v) != defaults[k]
    }
    head = getattr(model, "num_classes", None)
    extra = {"num_classes": head} if isinstance(head, int) and not isinstance(head, bool) else {}
    try:
        rebuilt = _on_meta(architecture, **args, **extra)
    except Exception:
        return args, False
    return args, _shapes(model) == _shapes(rebuilt)


def pretrained_weights(model: nn.Module) -> bool | None:
    """Whether the backbone was loaded with trained weights: ``False`` when every normalisation
    layer outside the modules trained with it (``freeze_backbone(also=...)``) still has its
    initial weight 1 and bias 0, ``True`` when one has not, ``None`` without such layers."""
    trained = [model.get_submodule(p) for p in model.__dict__.get(TRAINED_ATTR, ())]
    skip = {id(m) for module in trained for m in module.modules()}
    norms = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase)
    seen = False
    with torch.no_grad():
        for module in model.modules():
            if not isinstance(module, norms) or id(module) in skip:
                continue
            weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
            if not isinstance(weight, torch.Tensor) or weight.is_meta:
                continue
            if is_sharded(weight):  # FSDP2: reading a shard's values would be a collective
                return None
            seen = True
            if not bool((weight == 1).all()):
                return True
            if isinstance(bias, torch.Tensor) and not bool((bias == 0).all()):
                return True
    return False if seen else None


def checked_arguments(model_id: dict[str, Any]) -> dict[str, Any]:
    """The builder arguments a file records, each known and of a plain value (``FileProblem``
    otherwise: a file must not pass arbitrary arguments to timm)."""
    args = model_id.get("args", {})
    if not isinstance(args, dict):
        raise FileProblem("corrupt metadata: model.args must be a JSON object")
    for key, value in args.items():
        if key not in TIMM_ARGS or not _valid(value):
            raise FileProblem(
                f"it records the builder argument {str(key)[:40]!r}={str(value)[:40]!r}, which "
                f"create_model does not pass on (known: {sorted(TIMM_ARGS)}, plain values)"
            )
    return dict(args)
