"""What an adapter file holds, read off a model: the adapter's tensors under their file keys, the
backbone fingerprint, the modules trained with it; and how a file's keys and shapes are matched
against them. Shared by ``io/saving.py`` and ``io/loading.py``, so that a file is written and read
with one definition of its layout (specified in ``docs/file-format.md``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..inject import build_adapters, select_sites, site_plan
from ..methods import AdapterConfig
from ..methods.layers import Adapter
from ..runtime.shared import iter_shared
from ..runtime.slots import AdapterSlot, holder_of, iter_slots
from ..runtime.wrappers import original_class
from ..state import SLOT_ATTR, TRAINED_ATTR
from . import identity
from .format import FileProblem, runs

__all__ = [
    "adapter_state",
    "adapter_tensor_ids",
    "backbone_fingerprint",
    "dtype_name",
    "file_state",
    "fingerprint_differences",
    "first_non_finite",
    "match_keys",
    "planned_state",
    "renamed",
    "trained_state",
    "trained_targets",
]


def backbone_fingerprint(model: nn.Module) -> dict[str, Any]:
    """What an adapter file must agree with: architecture, block count and every site's width.

    Computed from the model's sites (see ``arc_peft.site_plan``), so it is the same before
    and after injection and for any model built the same way (pretrained or not).
    """
    plan = site_plan(model)
    widths = {p: [s.width for s in plan.sites if s.position == p] for p in ("attn", "mlp")}
    cls = original_class(model)  # not FSDP's generated subclass
    found = {
        "architecture": identity.qualified(cls),
        "num_blocks": plan.num_blocks,
        "widths": widths,
    }
    inner = _enclosing(model, [s.path for s in plan.sites])
    if inner:
        found["contains"] = inner
    return found


def _enclosing(model: nn.Module, paths: list[str]) -> list[str]:
    """The classes of the modules between the model and its sites (the model's own submodules
    that hold every site: a classifier's base model, ``.vit``): a file saved from a classifier
    then also fits the bare base model, and says so."""
    if not paths:
        return []
    parts = [p.split(".") for p in paths]
    common: list[str] = []
    for names in zip(*parts, strict=False):
        if len(set(names)) != 1:
            break
        common.append(names[0])
    found, module = [], model
    for name in common[: max(len(p) for p in parts) - 1]:
        module = getattr(module, name, None)
        if not isinstance(module, nn.Module) or isinstance(module, (nn.ModuleList, nn.Sequential)):
            break
        found.append(identity.qualified(type(module)))
    return found


def fingerprint_differences(stored: dict[str, Any], actual: dict[str, Any]) -> list[str]:
    diffs = []
    if stored.get("architecture") != actual["architecture"]:
        diffs.append(f"architecture {stored.get('architecture')} vs {actual['architecture']}")
    if stored.get("num_blocks") != actual["num_blocks"]:
        diffs.append(f"{stored.get('num_blocks')} blocks vs {actual['num_blocks']}")
    stored_widths = stored.get("widths") or {}
    for position in ("attn", "mlp"):
        want = stored_widths.get(position)
        have = actual["widths"][position]
        if want != have:
            shown = runs(want) if isinstance(want, list) else repr(want)
            diffs.append(f"{position} widths per block [{shown}] vs [{runs(have)}]")
    return diffs


def file_state(layers: list[tuple[str, str, Adapter]]) -> dict[str, Tensor]:
    """``{file key: tensor}`` of one adapter from its ``(slot path, site path, layer)`` per site:
    each layer's state under its slot, with the adapter-name component dropped
    (``blocks.0.arc_peft.attn.scale``), so a file loads under any name; shared state (ARC's
    ``projection``) once, under the slot of its group's first site (its ``anchor``), wherever
    the model holds it."""
    state: dict[str, Tensor] = {}
    for slot_path, site_path, layer in layers:
        for key, value in layer.state_dict(keep_vars=True).items():
            state[f"{slot_path}.{key}"] = value
        shared = layer.shared
        if shared is not None and shared.anchor == site_path:
            for key, value in shared.state_dict(keep_vars=True).items():
                state[f"{slot_path}.{key}"] = value
    return state


def adapter_state(model: nn.Module, name: str) -> dict[str, Tensor]:
    """``{file key: parameter or buffer}`` of adapter ``name`` (see ``file_state``)."""
    return file_state(
        [(path, slot.site.path, slot[name]) for path, _, slot in iter_slots(model) if name in slot]
    )


def planned_state(model: nn.Module, config: AdapterConfig) -> dict[str, Tensor]:
    """``{file key: tensor}`` that injecting ``config`` would create, built on the meta device:
    nothing is allocated, so a file claiming ``rank=10**9`` costs nothing to refuse."""
    try:
        chosen = select_sites(site_plan(model), config)
        built = build_adapters(model, chosen, config, device="meta")
    except ValueError as exc:  # UnsupportedModelError included
        raise FileProblem(f"its config {config} does not fit this model: {exc}") from None
    layers = []
    for site, adapter in built:
        holder_path, _ = holder_of(model, site.path)
        prefix = f"{holder_path}.{SLOT_ATTR}" if holder_path else SLOT_ATTR
        key = AdapterSlot(site, holder_path).key  # named as iter_slots will name it
        layers.append((f"{prefix}.{key}", site.path, adapter))
    return file_state(layers)


def adapter_tensor_ids(model: nn.Module) -> set[int]:
    """Every parameter and buffer of every adapter (whichever is active)."""
    found = {
        id(t) for _, _, slot in iter_slots(model) for t in slot.state_dict(keep_vars=True).values()
    }
    return found | {id(p) for entry in iter_shared(model) for p in entry[3].parameters()}


def trained_state(model: nn.Module, exclude: set[str]) -> tuple[list[str], dict[str, Tensor]]:
    """``(module paths, {model key: tensor})`` of the backbone modules that
    ``freeze_backbone(also=...)`` made trainable, without adapter tensors or keys in ``exclude``."""
    paths = list(model.__dict__.get(TRAINED_ATTR, ()))
    adapters = adapter_tensor_ids(model)
    state: dict[str, Tensor] = {}
    for path in paths:
        try:
            module = model.get_submodule(path)
        except AttributeError:
            raise ValueError(
                f"save_adapter: freeze_backbone(also=...) made {path!r} trainable, but the model "
                "no longer has such a module; call freeze_backbone again"
            ) from None
        prefix = f"{path}." if path else ""
        for key, value in module.state_dict(keep_vars=True).items():
            if id(value) not in adapters and f"{prefix}{key}" not in exclude:
                state[f"{prefix}{key}"] = value
    return paths, state


def trained_targets(model: nn.Module, trained: dict[str, Any]) -> dict[str, Tensor]:
    """The model tensors the file's trained-module tensors go to (those the model has)."""
    state: dict[str, Tensor] = {}
    for module_path in trained["modules"]:
        try:
            module = model.get_submodule(module_path)
        except AttributeError:
            raise FileProblem(
                f"it stores the trained module {module_path!r} (freeze_backbone(also=...)), "
                f"which {type(model).__name__} does not have",
            ) from None
        prefix = f"{module_path}." if module_path else ""
        state.update({f"{prefix}{k}": v for k, v in module.state_dict(keep_vars=True).items()})
    return {k: state[k] for k in trained["shapes"] if k in state}


def _isfinite(flat: Tensor) -> Tensor:
    try:
        return torch.isfinite(flat)
    except (NotImplementedError, RuntimeError):  # float8 has no isfinite kernel; upcasting is exact
        return torch.isfinite(flat.float())


def first_non_finite(tensors: dict[str, Tensor]) -> str | None:
    """The first key holding a NaN or infinity, or ``None``.

    One check per dtype over all tensors concatenated: per-tensor checks cost a kernel launch
    each, which dominated save/load time for the ~50 small tensors of a ViT-B adapter.
    """
    by_dtype: dict[tuple[torch.dtype, torch.device], list[str]] = {}
    for key, value in tensors.items():
        if value.is_floating_point():
            by_dtype.setdefault((value.dtype, value.device), []).append(key)
    for keys in by_dtype.values():
        flat = torch.cat([tensors[k].detach().reshape(-1) for k in keys])
        if not bool(_isfinite(flat).all()):
            return next(k for k in keys if not bool(_isfinite(tensors[k].detach()).all()))
    return None


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _describe_keys(keys: set[str], limit: int = 5) -> str:
    listed = sorted(keys)
    more = f" and {len(listed) - limit} more" if len(listed) > limit else ""
    return ", ".join(listed[:limit]) + more


def match_keys(
    what: str, expected: dict[str, Tensor], found: dict[str, Any], versus: str = "model"
) -> list[tuple[str, Tensor]]:
    """Pair every expected tensor with the file's key, or raise naming what does not fit.

    ``found`` maps file keys to tensors or to header entries (``{"shape": [...]}``)."""
    missing, unexpected = set(expected) - set(found), set(found) - set(expected)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {what} key(s): {_describe_keys(missing)}")
        if unexpected:
            parts.append(f"unexpected {what} key(s): {_describe_keys(unexpected)}")
        raise FileProblem(
            "; ".join(parts) + ". The file was made for a differently structured model or "
            "adapter (or edited).",
        )
    pairs = []
    for key, target in expected.items():
        source = found[key]
        shape = list(source["shape"] if isinstance(source, dict) else source.shape)
        if shape != list(target.shape):
            raise FileProblem(
                f"shape mismatch for {key}: file {shape[:8]}, {versus} {list(target.shape)}",
            )
        pairs.append((key, target))
    return pairs


def renamed(found: dict[str, Any], expected: dict[str, Any]) -> dict[str, Any]:
    """``found`` under the model's key names when the model holds the same blocks under other
    names (timm ``features_only=True`` wraps or flattens them); unchanged otherwise."""
    mapping = identity.remap_keys(set(found), set(expected))
    return {mapping.get(k, k): v for k, v in found.items()}
