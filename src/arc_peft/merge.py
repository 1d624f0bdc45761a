"""Zero-cost inference: fold an ARC adapter into the backbone's weights, and (optionally) undo it.

ARC is linear: in eval mode it maps its site's input ``x`` to ``x·M + b`` with
``M = I + U·diag(s)·Uᵀ``. The attention / MLP module that reads ``x`` does so only through linear
layers ``y = x·Wᵀ + c``, so the adapter disappears into them: ``W' = W·M`` and ``c' = c + W·b``.
After ``merge_adapter`` the model is the plain backbone (same modules, same parameter names)
with new values in those weights; its state dict loads with ``strict=True`` into a fresh backbone.

Each registered target says how to fold into its module type (``Target.merge``, see
``arc_peft.discovery.merge_rules.MergeFn``); when a fold is not exact the merge is refused with a
``MergeError`` naming the site and the reason. See ``docs/merging.md``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .discovery.fold import check_fold, generic_fold
from .discovery.inputs import example_input
from .discovery.merge_rules import PADS_INPUT, get_tensor
from .discovery.probe import Recording, record
from .discovery.targets import get_target
from .errors import MergeError
from .inject import delete_adapter
from .methods.layers import Adapter
from .runtime import foreign, heads, shared
from .runtime.multitask import active_adapter
from .runtime.slots import AdapterSlot, adapter_configs, iter_slots
from .runtime.wrappers import adapted_model
from .state import EXAMPLE_ATTR, MERGES_ATTR

__all__ = ["merge_adapter", "unmerge_adapter"]

# merge_adapter(keep_original=True) keeps what unmerge_adapter needs under MERGES_ATTR: a plain
# attribute of the model, so it is neither a module nor in the state dict (the merged model stays
# the plain backbone), yet it follows the model through copy.deepcopy and torch.save.


@dataclass
class _MergeRecord:
    """What one ``merge_adapter(..., keep_original=True)`` changed."""

    name: str
    was_active: bool
    originals: dict[str, Tensor]  # qualified tensor name -> value before the merge
    slots: list[tuple[str, AdapterSlot, Adapter]]  # (block path, detached slot, adapter)
    projections: list[shared.Entry]  # the adapter's shared ARC projections, where they were
    # Task modules the adapter owned (its head...), now the model's own: path -> module replaced
    replaced: dict[str, nn.Module] = dataclasses.field(default_factory=dict)


def _affine(adapter: Adapter, device: torch.device) -> tuple[Tensor, Tensor] | None:
    """The adapter's eval-mode map ``x -> x·M + b`` (``None``: it has none), in float64 so that
    the fold itself adds no rounding beyond the final cast to the weights' dtype."""
    affine = adapter.affine(dtype=torch.float64, device=device)
    if affine is None:
        return None
    return affine[0].detach(), affine[1].detach()


def _fold_device(module: nn.Module) -> torch.device:
    """Where to compute the fold: with the weights, unless that device lacks float64 (MPS)."""
    for tensor in module.parameters():
        return tensor.device if tensor.device.type != "mps" else torch.device("cpu")
    return torch.device("cpu")


def _record_sites(model: nn.Module, slots: list) -> Recording:
    """One probe forward with every adapter bypassed, keeping each site's arguments for the
    float64 check of its fold."""
    sites = [model.get_submodule(slot.site.path) for _, _, slot in slots]
    example = model.__dict__.get(EXAMPLE_ATTR)
    previous = [slot.disabled for _, _, slot in slots]
    for _, _, slot in slots:
        slot.disabled = True
    try:
        return record(model, example if example is not None else example_input(model), sites)
    finally:
        for (_, _, slot), was in zip(slots, previous, strict=True):
            slot.disabled = was


def _padded_at_probe_size(rec: Recording, path: str, site: nn.Module) -> str | None:
    """Why a window-padding site pads at the image size the probe ran at (the size the model
    declares, the injection's ``example_input``, else 224 px, torchvision Swin's own), or
    ``None`` if its feature map there is a whole number of windows (nothing pads)."""
    window = getattr(site, "window_size", None)
    call = next((c for c in rec.calls if c.path == path and c.main_input is not None), None)
    if call is None or not isinstance(window, (list, tuple)) or len(window) != 2:
        return "the feature map size is unknown"
    shape = rec.shapes[call.main_input]  # (batch, height, width, channels)
    if len(shape) != 4:
        return "the feature map size is unknown"
    height, width = shape[1], shape[2]
    if height % window[0] == 0 and width % window[1] == 0:
        return None
    return f"{height}×{width} tokens in windows of {window[0]}×{window[1]} at the probed size"


def merge_adapter(
    model: nn.Module,
    name: str | None = None,
    *,
    keep_original: bool = False,
    assume_no_window_padding: bool = False,
) -> nn.Module:
    """Fold the ARC adapter ``name`` into the backbone's weights, in place, and remove it.

    Afterwards the model is the plain backbone with new weight values: no hooks, no adapter
    modules, the backbone's own state-dict keys, and (in eval mode) the same outputs as the
    adapted model had with ``name`` active, to float32 rounding. The merge is all or nothing:
    every new tensor is computed and checked (shape, finite) before any is written.

    Only a model holding this one adapter can be merged: folding it changes the weights every
    other adapter was trained on top of. Save the others first (``arc_peft.save_adapter``)
    and delete them, or delete them from a ``copy.deepcopy`` of the model and merge that.

    Args:
        model: A model holding exactly one adapter, an ARC adapter.
        name: The adapter to merge; default: the active one.
        keep_original: Keep a copy of every weight the merge changes (and the adapter itself) so
            that ``unmerge_adapter`` can restore the adapted model bit for bit. Costs the
            memory of those weights (about 57% of a ViT-B's parameters with ARC at both
            positions); without it the merge is final.
        assume_no_window_padding: torchvision's Swin attention pads its input internally when
            the feature map is not a multiple of the window size; padded zeros stay zero without
            the adapter but become ``b`` after a merge. Such a site is refused when its adapter
            bias is non-zero and it pads at the model's configured image size (the size it
            declares, the ``example_input`` given at injection, else 224 px). Pass ``True`` if
            your inputs never need padding (every stage's feature map a multiple of its
            window) to merge anyway.

    Returns:
        ``model`` itself.

    Raises:
        KeyError: ``model`` has no adapter ``name``.
        MergeError: no adapter is active and no ``name`` was given; other adapters exist; the
            call is inside ``arc_peft.disable_adapter`` / ``arc_peft.mixed_batch``; or
            some site cannot absorb the adapter exactly (AdaptMLP, cosine attention whose key
            offset is non-zero, a layer without the bias the fold needs...). The message names
            the site; the model is unchanged.
    """
    wrapper, model = model, adapted_model(model)  # a LightningModule's .model, say
    slots = iter_slots(model)
    if not slots:
        raise MergeError("merge_adapter: the model has no adapters; inject or load one first")
    peft_layers = foreign.foreign_layers(model)
    if peft_layers:
        raise MergeError(
            f"merge_adapter: the model also has {foreign.describe(peft_layers)}, which hold the "
            "layers ARC would fold into. Merge peft's layers first "
            "(model = peft_model.merge_and_unload()), then merge_adapter"
        )
    configs = adapter_configs(model)
    if name is None:
        name = active_adapter(model)
        if name is None:
            raise MergeError(
                f"merge_adapter: no adapter is active; pass name= (one of {sorted(configs)})"
            )
    if name not in configs:
        raise KeyError(f"model has no adapter named {name!r}; it has {sorted(configs)}")
    others = sorted(n for n in configs if n != name)
    if others:
        raise MergeError(
            f"merge_adapter({name!r}): the model also holds adapter(s) {others}, which were "
            f"trained on the unmerged backbone and would silently change if {name!r} were folded "
            "into it. Save them (arc_peft.save_adapter) and delete them (arc_peft.delete_adapter) "
            "first; or, to keep this model as it is, merge a copy holding only this adapter: "
            f"copy = copy.deepcopy(model); for other in {others}: arc_peft.delete_adapter(copy, "
            f"other); then arc_peft.merge_adapter(copy, {name!r})"
        )
    if any(slot.disabled or slot.routing is not None for _, _, slot in slots):
        raise MergeError(
            "merge_adapter cannot run inside `with disable_adapter(...)` or "
            "`with mixed_batch(...)`: leave the block first"
        )

    module_paths = {id(module): path for path, module in model.named_modules()}
    rec = None  # the probe recording, made once the first ARC site needs it
    planned: list[tuple[str, Tensor, Tensor]] = []  # (qualified name, tensor, new value)
    claimed: dict[int, str] = {}
    for slot_path, _, slot in slots:
        adapter = slot[name]
        site_path = slot.site.path
        site = model.get_submodule(site_path)
        where = f"{slot_path} ({type(site).__module__}.{type(site).__qualname__} at {site_path})"
        affine = _affine(adapter, _fold_device(site)) if adapter.placement == "input" else None
        if affine is None:
            raise MergeError(
                f"cannot merge adapter {name!r} at {where}: {type(adapter).__name__} cannot be "
                f"folded into the backbone ({adapter.merge_refusal}); keep it as an adapter at "
                "inference"
            )
        M, b = affine
        target = get_target(site)
        fold = target.merge if target is not None else None
        if rec is None:
            rec = _record_sites(model, slots)
        pads = getattr(fold, PADS_INPUT, False) and bool(b.any()) and not assume_no_window_padding
        padded = _padded_at_probe_size(rec, site_path, site) if pads else None
        if padded is not None:
            raise MergeError(
                f"cannot merge adapter {name!r} at {where}: this module zero-pads its input "
                f"after the adapter when the feature map is not a multiple of the window size "
                f"({padded}); padded tokens are 0 unmerged but would become the adapter bias b "
                "(non-zero here) merged. If your inputs never need padding, pass "
                "assume_no_window_padding=True; ARCConfig(mergeable=True) trains without that "
                "bias"
            )
        try:
            with torch.no_grad():
                new_values = fold(site, M, b) if fold is not None else generic_fold(rec, site, M, b)
                check_fold(rec, site, M, b, new_values, slot.site.axis, slot.places)
        except MergeError as err:
            raise MergeError(f"cannot merge adapter {name!r} at {where}: {err}") from err
        for tensor_name, value in new_values.items():
            qualified = f"{site_path}.{tensor_name}"
            tensor = get_tensor(site, tensor_name)
            if tensor is None:
                raise MergeError(
                    f"merge function for {where} returned {tensor_name!r}, which is not a "
                    f"parameter or buffer of {type(site).__qualname__}"
                )
            if tuple(value.shape) != tuple(tensor.shape):
                raise MergeError(
                    f"merge function for {where} returned shape {tuple(value.shape)} for "
                    f"{tensor_name!r}, expected {tuple(tensor.shape)}"
                )
            value = value.detach().to(device=tensor.device, dtype=tensor.dtype)
            if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                raise MergeError(
                    f"cannot merge adapter {name!r} at {where}: the merged {tensor_name!r} has "
                    f"non-finite values (overflow in {tensor.dtype}?); nothing was changed"
                )
            if id(tensor) in claimed:
                raise MergeError(
                    f"cannot merge adapter {name!r}: {qualified} and {claimed[id(tensor)]} are "
                    "the same (tied) tensor, which two sites cannot both absorb"
                )
            claimed[id(tensor)] = qualified
            planned.append((qualified, tensor, value))

    # Commit: nothing above changed the model, and nothing below can fail half-way.
    record = None
    if keep_original:
        record = _MergeRecord(
            name=name,
            was_active=active_adapter(model) == name,
            originals={q: t.detach().clone() for q, t, _ in planned},
            slots=[(module_paths[id(block)], slot, slot[name]) for _, block, slot in slots],
            projections=shared.iter_shared(model, name),
        )
    with torch.no_grad():
        for _, tensor, value in planned:
            tensor.copy_(value)
    # The adapter's own head (and other task modules) becomes the model's: the merged model
    # computes what the adapted one did with ``name`` active, head included.
    replaced = heads.adopt(model, name)
    delete_adapter(model, name)
    if record is not None:
        record.replaced = replaced
        model.__dict__.setdefault(MERGES_ATTR, []).append(record)
    return wrapper


def unmerge_adapter(model: nn.Module) -> nn.Module:
    """Undo the last ``merge_adapter`` made with ``keep_original=True``, in place.

    Restores the changed weights bit for bit and puts the adapter back (active again if it was
    active when merged), so the model is exactly the adapted model it was before the merge.
    Any change made to those weights after the merge is discarded.

    Returns:
        ``model`` itself.

    Raises:
        MergeError: there is no kept merge to undo, or the model holds adapters (added after
            the merge, on top of the merged weights: delete them first).
    """
    records: list[_MergeRecord] = model.__dict__.get(MERGES_ATTR) or []
    if not records:
        raise MergeError(
            "unmerge_adapter: nothing to undo. Only merge_adapter(model, keep_original=True) "
            "keeps the original weights; otherwise reload the backbone checkpoint and the "
            "adapter file (arc_peft.load_adapter)"
        )
    present = sorted(adapter_configs(model))
    if present:
        raise MergeError(
            f"unmerge_adapter: the model holds adapter(s) {present}, added after the merge on "
            "top of the merged weights; delete them (arc_peft.delete_adapter) first"
        )
    record = records[-1]
    targets = []
    for qualified, original in record.originals.items():
        module_path, _, tensor_name = qualified.rpartition(".")
        module = model.get_submodule(module_path)
        tensor = get_tensor(module, tensor_name)
        if tensor is None or tuple(tensor.shape) != tuple(original.shape):
            raise MergeError(
                f"unmerge_adapter: {qualified} is missing or changed shape since the merge; "
                "cannot restore the original weights"
            )
        targets.append((tensor, original))
    with torch.no_grad():
        for tensor, original in targets:
            tensor.copy_(original.to(device=tensor.device, dtype=tensor.dtype))
    for block_path, slot, adapter in record.slots:
        block = model.get_submodule(block_path)
        site = model.get_submodule(slot.site.path)
        # Follow the model if it was moved or cast after the merge.
        for tensor in site.parameters():
            if tensor.is_floating_point():
                adapter.to(device=tensor.device, dtype=tensor.dtype)
                if adapter.shared is not None:  # its shared state (ARC's U) follows the layer
                    adapter.shared.to(device=tensor.device, dtype=tensor.dtype)
                break
        slot[record.name] = adapter
        slot.active = record.name if record.was_active else None
        slot.attach(block)
    shared.attach(model, record.projections)
    heads.unadopt(model, record.name, record.replaced)
    records.pop()
    if not records:
        del model.__dict__[MERGES_ATTR]
    return model
