"""The per-site runtime: an :class:`AdapterSlot` holds the named adapters of one attention or MLP
module (a *site*) and applies them through forward hooks on that module.

Why hooks rather than a wrapper module: the adapted module keeps its place and its parameter
names (``blocks.0.attn.qkv.weight`` stays ``blocks.0.attn.qkv.weight``), so a plain backbone
checkpoint loads into an adapted model and a merged model is exactly the plain backbone.

The slots live on the *block* that holds the site, under ``<block>.arc_peft.<position>``, so an
adapter parameter is named e.g. ``blocks.0.arc_peft.attn.default.scale``. (Not on the site
itself: torchvision's MLPs are ``nn.Sequential``, which would run any child it is given.)
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .modules import Adapter
from .targets import Target

__all__ = ["SLOT_ATTR", "AdapterSlot", "BlockSlots", "iter_slots"]

# The attribute under which a block holds its slots (part of every adapter parameter's name).
SLOT_ATTR = "arc_peft"


class BlockSlots(nn.ModuleDict):
    """A block's slots by position (``"attn"``, ``"mlp"``); it never runs, it only holds state."""


class AdapterSlot(nn.ModuleDict):
    """The adapters of one site, by name, plus which of them runs.

    Exactly one of three modes applies at a time: *disabled* (the bare module runs), *routed*
    (each sample of a mixed-task batch goes through its own adapter, see
    :func:`arc_peft.mixed_batch`) or *active* (every sample goes through ``active``, or through
    no adapter when ``active`` is ``None`` or has no adapter at this site).
    """

    # Every piece of slot state is declared here, at class level, so that an adapter name that
    # would collide with it (adapters are entries of this ModuleDict) is caught by
    # ``hasattr(AdapterSlot, name)`` before anything is attached.
    target: Target
    site_name: str = ""
    position: str = ""
    block: int = -1
    active: str | None = None
    disabled: bool = False
    routing: tuple[int, list[tuple[str, Tensor]]] | None = None

    def __init__(self, target: Target, block: int, site_name: str) -> None:
        super().__init__()
        self.target = target
        # The site is found through its block by this attribute name rather than held here: a
        # reference would register it twice (or, hidden, go stale after copying or re-assigning).
        self.site_name = site_name
        self.position = target.position
        self.block = block
        self.active: str | None = None
        self.disabled = False
        # (batch size, [(adapter name, sample indices)]) while a mixed batch is being run.
        self.routing: tuple[int, list[tuple[str, Tensor]]] | None = None

    # -- attaching -----------------------------------------------------------------------------

    def attach(self, block: nn.Module) -> None:
        """Register this slot on ``block`` and install its hooks on the site module."""
        slots = block._modules.get(SLOT_ATTR)
        if not isinstance(slots, BlockSlots):
            slots = BlockSlots().train(block.training)
            setattr(block, SLOT_ATTR, slots)
        slots[self.position] = self.train(block.training)
        module = block._modules[self.site_name]
        module.register_forward_pre_hook(self._pre_hook, with_kwargs=True)
        module.register_forward_hook(self._post_hook, with_kwargs=True)

    def detach(self, block: nn.Module) -> None:
        """Remove this slot and its hooks, leaving the block and site module as they were."""
        module = block._modules[self.site_name]
        # Hooks are found by identity, not by stored handles: a deep-copied model holds copies of
        # the handles that would point at the original model's hook dictionaries.
        for hooks_attr, extra_attrs in (
            ("_forward_pre_hooks", ("_forward_pre_hooks_with_kwargs",)),
            ("_forward_hooks", ("_forward_hooks_with_kwargs", "_forward_hooks_always_called")),
        ):
            hooks = getattr(module, hooks_attr)
            for key in [k for k, fn in hooks.items() if getattr(fn, "__self__", None) is self]:
                del hooks[key]
                for extra in extra_attrs:
                    getattr(module, extra, {}).pop(key, None)
        slots = block._modules[SLOT_ATTR]
        del slots[self.position]
        if len(slots) == 0:
            delattr(block, SLOT_ATTR)

    # -- running -------------------------------------------------------------------------------

    def _run(self, x: Tensor, want_input: bool, out: Any = None) -> Tensor | None:
        """Adapted ``x`` (input adapters) or the term to add to the output (output adapters).

        Returns ``None`` when nothing applies, so the hook leaves the call untouched.
        """
        if self.disabled:
            return None
        if self.routing is None:
            adapter = self._get(self.active, want_input)
            if adapter is None:
                return None
            if want_input:
                return adapter(x)
            return adapter(x if adapter.placement == "parallel" else out)
        batch, groups = self.routing
        rows = x.shape[0]
        if rows % batch:
            raise ValueError(
                f"mixed batch of {batch} task names, but the module at block {self.block} "
                f"({self.position}) received {rows} rows: the leading dimension must be a "
                "multiple of the batch size"
            )
        per_sample = rows // batch
        result: Tensor | None = None
        for name, samples in groups:
            adapter = self._get(name, want_input)
            if adapter is None:
                continue
            idx = samples.to(x.device)
            if per_sample > 1:
                # Row r of a (batch * k)-row input belongs to sample r // k (windows, sample-major).
                offsets = torch.arange(per_sample, device=x.device)
                idx = (idx[:, None] * per_sample + offsets).reshape(-1)
            if want_input:
                base = x if result is None else result
                result = base.index_copy(0, idx, adapter(x.index_select(0, idx)))
            else:
                src = x if adapter.placement == "parallel" else out
                base = torch.zeros_like(out) if result is None else result
                result = base.index_copy(0, idx, adapter(src.index_select(0, idx)))
        return result

    def _get(self, name: str | None, want_input: bool) -> Adapter | None:
        if name is None or name not in self:
            return None
        adapter = self[name]
        return adapter if adapter.transforms_input == want_input else None

    def _pre_hook(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> Any:
        x = args[0] if args else kwargs.get(self.target.input_name)
        if self.target.qkv_inputs:
            key = args[1] if len(args) > 1 else kwargs.get("key")
            value = args[2] if len(args) > 2 else kwargs.get("value")
            if key is not x or value is not x:
                raise ValueError(
                    f"arc_peft adapts self-attention only: {type(module).__name__} at block "
                    f"{self.block} was called with distinct query/key/value tensors"
                )
        if not isinstance(x, Tensor):
            raise TypeError(
                f"{type(module).__name__} at block {self.block} was called without its input "
                f"tensor (expected it first or as {self.target.input_name}=)"
            )
        new = self._run(x, want_input=True)
        if new is None:
            return None
        args, kwargs = list(args), dict(kwargs)
        names = ("query", "key", "value") if self.target.qkv_inputs else (self.target.input_name,)
        for i, name in enumerate(names):
            if i < len(args):
                args[i] = new
            else:
                kwargs[name] = new
        return tuple(args), kwargs

    def _post_hook(
        self, module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any
    ) -> Any:
        if not isinstance(output, Tensor):
            return None  # tuple-returning modules are attention sites: only input adapters there
        x = args[0] if args else kwargs[self.target.input_name]
        delta = self._run(x, want_input=False, out=output)
        return None if delta is None else output + delta


def iter_slots(model: nn.Module) -> list[tuple[str, nn.Module, AdapterSlot]]:
    """Every ``(slot path, block, slot)`` of ``model`` in module order; the slot path is the
    prefix of its adapters' parameter names (``blocks.0.arc_peft.attn``)."""
    found = []
    for path, block in model.named_modules():
        slots = block._modules.get(SLOT_ATTR)
        if isinstance(slots, BlockSlots):
            prefix = f"{path}.{SLOT_ATTR}" if path else SLOT_ATTR
            for position, slot in slots.items():
                found.append((f"{prefix}.{position}", block, slot))
    return found
