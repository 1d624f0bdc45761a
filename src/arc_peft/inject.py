"""Putting adapters into a model and taking them out again: the whole-model verbs."""

from __future__ import annotations

import dataclasses
import fnmatch
import warnings
from typing import Any

from torch import nn

from .discovery import inputs, probe
from .discovery.sites import LeftOut, Site, SitePlan, discover
from .discovery.targets import registry_generation
from .errors import ConfigError, UnsupportedModelError
from .methods import AdapterConfig, get_method
from .methods.layers import Adapter, SharedState
from .methods.lean import know_norms
from .runtime import foreign, heads, pretrained, shared
from .runtime.slots import AdapterSlot, adapter_configs, check_name, holder_of, iter_slots
from .runtime.wrappers import check_injectable
from .state import DEFAULT_ADAPTER, EXAMPLE_ATTR, PLAN_ATTR

__all__ = [
    "build_adapters",
    "delete_adapter",
    "inject_arc",
    "remove_arc",
    "select_sites",
    "site_plan",
]


def _factory(module: nn.Module) -> dict:
    for tensor in module.parameters():
        if tensor.is_floating_point():
            return {"device": tensor.device, "dtype": tensor.dtype}
    return {}


def site_plan(model: nn.Module, example_input: Any = None, refresh: bool = False) -> SitePlan:
    """Every adapter site of ``model`` (see ``discovery/sites.py``), found by one probe forward
    and kept on the model; adapters already injected are bypassed while probing.

    Args:
        model: The backbone, adapted or not.
        example_input: What to probe with (default: an image of the size the model declares).
        refresh: Probe again even if a plan is kept.
    """
    kept = model.__dict__.get(PLAN_ATTR)
    generation = registry_generation()
    if kept is not None and kept[0] == generation and not refresh and example_input is None:
        return kept[1]
    slots = [slot for _, _, slot in iter_slots(model)]
    previous = [slot.disabled for slot in slots]
    for slot in slots:
        slot.disabled = True
    # probing again (refresh, or a target registered since) with the input the user gave before
    example = example_input if example_input is not None else model.__dict__.get(EXAMPLE_ATTR)
    if example is None:
        example = inputs.example_input(model)
    try:
        plan = _reached(model, discover(model, example), example)
    finally:
        for slot, was in zip(slots, previous, strict=True):
            slot.disabled = was
    model.__dict__[PLAN_ATTR] = (generation, plan)  # stale once another target is registered
    if example_input is not None:
        model.__dict__[EXAMPLE_ATTR] = example_input
    return plan


def _reached(model: nn.Module, plan: SitePlan, example: Any) -> SitePlan:
    """``plan`` checked against a forward on ``example`` through the hooks adapters run from:
    discovery reads sites off one forward, but an adapter runs only if its slot's hook is
    called (an adapter adding to the output, at the far end of a two-ended MLP, only after the
    input end). Every site gets a slot that records which of its ends ran and changes nothing.
    A site whose input end never runs is left out; one whose output end never runs keeps
    adapters of its input (ARC) and says why none adding to its output (AdaptMLP) would run."""
    present = {slot.site.path: slot for _, _, slot in iter_slots(model)}
    watched: dict[str, AdapterSlot] = {}
    added: list[tuple[nn.Module, AdapterSlot]] = []
    left = list(plan.left_out)
    try:
        for site in plan.sites:
            slot = present.get(site.path)
            if slot is None:
                try:
                    holder_path, holder = holder_of(model, site.path)
                except UnsupportedModelError as exc:
                    left.append(LeftOut(site.path, site.kind, str(exc), False, site.position))
                    continue
                slot = AdapterSlot(site, holder_path)
                slot.attach(holder)
                added.append((holder, slot))
            slot.reached = set()
            watched[site.path] = slot
        try:
            probe.run(model, example)
        except Exception as exc:
            raise UnsupportedModelError(
                f"arc_peft found adapter sites in {type(model).__name__}, but a forward with a "
                f"hook at each of them failed ({type(exc).__name__}: {exc}): "
                + plan.summary().replace("\n", "; ")
            ) from exc
        reached = {path: set(slot.reached or ()) for path, slot in watched.items()}
    finally:
        for slot in watched.values():
            slot.reached = None
        for holder, slot in added:
            slot.detach(holder)
    sites = []
    for site in plan.sites:
        if site.path not in reached:
            continue  # no holder for its slot: left out above
        if "input" not in reached[site.path]:
            left.append(
                LeftOut(
                    site.path, site.kind, "a forward on the probe input never reaches its hook, "
                    "so no adapter placed there would run", False, site.position,
                )
            )  # fmt: skip
            continue
        if site.output_path and "output" not in reached[site.path]:
            site = dataclasses.replace(
                site,
                no_output=f"a forward on the probe input never reaches the hook at "
                f"{site.output_path} after this input with a single tensor to add to, so no "
                "adapter adding to the output would run",
            )
        sites.append(site)
    return SitePlan(sites, left, plan.num_blocks)


def select_sites(plan: SitePlan, config: AdapterConfig) -> list[Site]:
    """The sites ``config`` asks for; raises when attention is left out without being asked."""
    cls = type(config).__name__
    blocks = sorted({s.block for s in plan.sites})
    n_blocks = len(blocks)
    if config.blocks is None:
        chosen_blocks = set(blocks)
    else:
        bad = [i for i in config.blocks if not -n_blocks <= i < n_blocks]
        if bad:
            raise ConfigError(
                f"{cls}.blocks={config.blocks!r} is out of range for a model with {n_blocks} "
                f"blocks: expected indices in [{-n_blocks}, {n_blocks - 1}]"
            )
        chosen_blocks = {blocks[i] for i in config.blocks}

    def wanted(site: Site) -> bool:
        if config.target_modules is not None and not any(
            fnmatch.fnmatchcase(site.path, p) for p in config.target_modules
        ):
            return False
        return not any(fnmatch.fnmatchcase(site.path, p) for p in config.exclude_modules)

    chosen = [
        s
        for s in plan.sites
        if s.block in chosen_blocks and s.position in config.positions and wanted(s)
    ]
    patterns = (config.target_modules or ()) + config.exclude_modules
    if patterns and not any(wanted(s) for s in plan.sites):
        paths = [s.path for s in plan.sites]
        more = f" and {len(paths) - 8} more" if len(paths) > 8 else ""
        raise ConfigError(
            f"{cls}: target_modules={config.target_modules!r} / exclude_modules="
            f"{config.exclude_modules!r} match no site; the {len(paths)} sites are "
            f"{paths[:8]}{more} (arc_peft.site_plan(model).summary() lists them all)"
        )
    if not chosen:
        raise UnsupportedModelError(
            f"no site to adapt for positions {config.positions}: the model has "
            + plan.summary().replace("\n", "; ")
        )
    for width in sorted({s.width for s in chosen}):
        problem = config.width_problem(width)
        if problem is not None:
            at = [s.path for s in chosen if s.width == width]
            raise ConfigError(f"{problem} (sites {at[:3]}{' ...' if len(at) > 3 else ''})")
    return chosen


def _check_output_ends(planned: list[tuple[Site, Adapter]], config: AdapterConfig) -> None:
    """An adapter adding to a site's output needs the module returning that output."""
    no_end = [
        site.path for site, layer in planned if layer.placement != "input" and not site.output_path
    ]
    if no_end:
        raise UnsupportedModelError(
            f"{type(config).__name__} adds its output at the module returning the site's output, "
            f"but at {no_end[:4]} no module returns it with the input's shape. Use a method that "
            "only needs the input (ARCConfig), or exclude these sites with exclude_modules"
        )


def _unreached_outputs(planned: list[tuple[Site, Adapter]]) -> list[LeftOut]:
    """The planned adapters adding to an output that a forward never reaches (see ``_reached``),
    as sites left out for this config."""
    return [
        LeftOut(site.path, site.kind, site.no_output, False, site.position, "output")
        for site, layer in planned
        if layer.placement != "input" and site.no_output
    ]


def _check_partial(
    plan: SitePlan, config: AdapterConfig, problems: list[LeftOut] = (), stacklevel: int = 3
) -> None:
    """Raise (or, with ``allow_partial``, warn) when anything ``config`` would adapt is left out:
    ``plan``'s left-out modules at its positions, and ``problems`` found for it."""
    problems = [
        item for item in plan.left_out if not item.on_purpose and item.position in config.positions
    ] + list(problems)
    if not problems:
        return
    listed = "; ".join(f"{i.describe()}: {i.reason}" for i in problems[:6])
    more = f" (and {len(problems) - 6} more)" if len(problems) > 6 else ""
    message = (
        f"{len(problems)} attention or MLP site(s) cannot be adapted: {listed}{more}. The model "
        "would be only partly adapted. Register the module type (arc_peft.register_target), pass "
        "example_input=... if the probe did not reach it, or set allow_partial=True in the "
        "config to adapt the rest"
    )
    if not config.allow_partial:
        raise UnsupportedModelError(message)
    warnings.warn(message, stacklevel=stacklevel)


def build_adapters(
    model: nn.Module, chosen: list[Site], config: AdapterConfig, device: str | None = None
) -> list[tuple[Site, Adapter]]:
    """A new adapter for every chosen site, built by ``config``'s method and not yet attached
    (``device="meta"``: shapes only, nothing allocated, which is how a file's claims are checked
    before anything is built)."""

    def factory(site: Site) -> dict:
        module = model.get_submodule(site.path)
        kwargs = _factory(module) or _factory(model)
        if device is not None:
            kwargs["device"] = device
        return kwargs

    layers = get_method(config).build(chosen, config, factory)
    if len(layers) != len(chosen) or not all(isinstance(x, Adapter) for x in layers):
        raise TypeError(
            f"the {config.method!r} method's build returned {len(layers)} layers for "
            f"{len(chosen)} sites: expected one Adapter per site"
        )
    planned = list(zip(chosen, layers, strict=True))
    _check_output_ends(planned, config)
    unreached = _unreached_outputs(planned)
    if unreached:  # known only now: which layers add to the output is the method's to say
        dead = {item.path for item in unreached}
        kept = [site for site in chosen if site.path not in dead]
        _check_partial(SitePlan([]), config, unreached, stacklevel=5)
        if not kept:
            raise UnsupportedModelError(
                f"no site to adapt: {type(config).__name__} would never run at any site chosen "
                f"({', '.join(sorted(dead)[:4])}...): {unreached[0].reason}"
            )
        return build_adapters(model, kept, config, device)
    for site, layer in planned:
        layer.config = config
        layer.train(model.get_submodule(site.path).training)  # follows the model's mode
    return planned


def _shared_entries(
    model: nn.Module, planned: list[tuple[Site, Adapter]], name: str
) -> list[shared.Entry]:
    """Where each shared projection of ``planned`` goes (see ``arc_peft.runtime.shared``)."""
    groups: dict[int, tuple[str, SharedState, list[str]]] = {}
    for site, adapter in planned:
        state = adapter.shared
        if state is not None:
            key = shared.group_key(site.position, site.width)
            groups.setdefault(id(state), (key, state, []))[2].append(site.path)
    return [
        (shared.place(model, paths), name, key, projection)
        for key, projection, paths in groups.values()
    ]


def inject_arc(
    model: nn.Module,
    config: AdapterConfig,
    name: str = DEFAULT_ADAPTER,
    *,
    example_input: Any = None,
) -> nn.Module:
    """Add an adapter (ARC, AdaptMLP or a registered method) to every attention / MLP site of
    ``model``, in place.

    Sites are found by one probe forward (see ``site_plan``): every self-attention module
    (any timm, torchvision, Hugging Face transformers or open_clip vision model) and the MLP
    after it in its block. Attention pooling and cross-attention are left out on purpose; any
    other attention module that cannot be adapted is an error (or, with
    ``config.allow_partial``, a warning). Parameter names of the backbone do not change. The first
    adapter injected into a model becomes the active one.

    Args:
        model: The backbone (e.g. from ``timm.create_model``).
        config: ``ARCConfig``, ``AdaptMLPConfig`` or a registered method's config.
        name: Name of this adapter; several named adapters can live on one backbone. Letters,
            digits, ``_`` and ``-`` (``"cifar-100"``), not an attribute of a module
            (``"training"``).
        example_input: Input for the probe forward (a tensor, a tuple of arguments or a dict of
            keyword arguments); default: a random image of the size the model declares.

    Returns:
        ``model`` itself.

    Raises:
        TypeError: ``config`` is not an adapter config.
        ValueError: ``name`` is invalid or already exists, ``config.blocks`` /
            ``target_modules`` select nothing that exists, or ``model`` is a
            ``torch.compile`` / DDP / ``DataParallel`` wrapper or FSDP-sharded (inject first,
            then wrap: the wrapper would not see the new adapter).
        UnsupportedModelError: the model has no self-attention, or some attention module cannot
            be adapted (the message names each and why). The model is unchanged.
    """
    try:
        get_method(config)
    except TypeError as exc:
        raise TypeError(f"inject_arc: {exc}") from None
    if not isinstance(model, nn.Module):
        raise TypeError(f"inject_arc expects an nn.Module, got {type(model).__name__}")
    check_name(name)
    check_injectable(model, "inject_arc")
    peft_layers = foreign.foreign_layers(model)
    if peft_layers:
        raise UnsupportedModelError(
            f"{type(model).__name__} already has {foreign.describe(peft_layers)}: arc_peft would "
            "adapt the layers inside them (LoRA's own matrices), not the model's. Inject "
            "arc_peft first, then call peft.get_peft_model (docs/recipes.md), or merge peft's "
            "layers first (peft_model.merge_and_unload())"
        )
    existing = adapter_configs(model)
    if name in existing:
        raise ValueError(
            f"model already has an adapter named {name!r} ({type(existing[name]).__name__}): "
            "remove it first (arc_peft.delete_adapter / remove_arc) or inject under another name"
        )
    plan = site_plan(model, example_input)
    if not any(s.position == "attn" for s in plan.sites):
        raise UnsupportedModelError(
            f"no self-attention found in {type(model).__name__}: arc_peft adapts the attention "
            "modules of vision transformers (and the MLPs after them). Probe result: "
            + plan.summary().replace("\n", "; ")
        )
    _check_partial(plan, config)
    chosen = select_sites(plan, config)

    # Build every adapter before touching the model, so a failure leaves it unchanged.
    planned = build_adapters(model, chosen, config)
    holders = {site.path: holder_of(model, site.path) for site, _ in planned}
    projections = _shared_entries(model, planned, name)

    make_active = not existing or all(slot.active is None for _, _, slot in iter_slots(model))
    present = {slot.site.path: slot for _, _, slot in iter_slots(model)}
    for site, adapter in planned:
        slot = present.get(site.path)
        if slot is None:
            holder_path, holder = holders[site.path]
            slot = AdapterSlot(site, holder_path)
            slot.attach(holder)
            present[site.path] = slot
        slot[name] = adapter
    shared.attach(model, projections)
    if make_active:
        for _, _, slot in iter_slots(model):
            slot.active = name
    pretrained.guard(model)  # save_pretrained keeps the adapters; reentrant checkpointing trains
    know_norms(model)  # the norms' eps: the lean backward pass recomputes their outputs in one op
    return model


def delete_adapter(model: nn.Module, name: str) -> nn.Module:
    """Remove the adapter ``name`` from every site; sites left empty are restored to plain modules.

    If ``name`` was active, no adapter is active afterwards.
    """
    slots = iter_slots(model)
    if not any(name in slot for _, _, slot in slots):
        raise KeyError(
            f"model has no adapter named {name!r}; it has {sorted(adapter_configs(model))}"
        )
    heads.forget(model, name)  # its own head (and other task modules) goes with it
    shared.detach(model, name)
    for _, block, slot in slots:
        if name in slot:
            del slot[name]
        if slot.active == name:
            slot.active = None
        if len(slot) == 0:
            slot.detach(block)
    pretrained.unguard(model)
    return model


def remove_arc(model: nn.Module) -> nn.Module:
    """Remove every adapter and hook, restoring the original modules, keys and values.

    Returns:
        ``model`` itself, now the plain backbone (its state dict has exactly the original keys).
    """
    heads.restore_all(model)
    shared.detach(model)
    for _, block, slot in iter_slots(model):
        slot.detach(block)
    pretrained.unguard(model)
    return model
