"""Where state that several sites share lives (a ``SharedState``: ARC's ``U``, one per adapter
and (position, width) group), held by the nearest module above every site of the group, under
``<holder>.arc_peft_shared.<adapter name>.<position>-<width>`` (for a ViT:
``arc_peft_shared.default.attn-768.projection`` on the model itself).

Why above the sites and not on the group's first layer: FSDP2 gathers a sharded module's
parameters only while that module runs. With ``fully_shard(block)`` per block, a ``U`` held by
block 0 would still be sharded when block 1 reads it; held above the blocks, it belongs to the
unit that encloses them all (the root's, after ``fully_shard(model)``). Files are unaffected:
they store ``U`` under the slot of the group's first site (``SharedState.anchor``).
"""

from __future__ import annotations

from torch import nn

from ..errors import UnsupportedModelError
from ..methods.layers import SharedState
from ..state import SHARED_ATTR
from .slots import holder_of

__all__ = [
    "Entry",
    "SharedBank",
    "attach",
    "detach",
    "entry_path",
    "group_key",
    "iter_shared",
    "place",
]

# (holder path, adapter name, group key, projection)
Entry = tuple[str, str, str, SharedState]


class SharedBank(nn.ModuleDict):
    """A module's shared projections, ``{adapter name: {group key: SharedState}}``; it
    never runs, it only holds state."""


def group_key(position: str, width: int) -> str:
    return f"{position}-{width}"


def place(model: nn.Module, site_paths: list[str]) -> str:
    """Path of the module that holds the projection shared by the sites at ``site_paths``: the
    nearest module above all of them that can hold state (see ``slots.holder_of``). A model
    whose only common ancestors are containers (an ``nn.Sequential`` of blocks) keeps it with the
    first site's slot, as per-block sharding then has no unit enclosing the blocks anyway."""
    parts = [path.split(".") for path in site_paths]
    common = 0
    while all(len(p) > common and p[common] == parts[0][common] for p in parts):
        common += 1
    # holder_of looks strictly above the path it is given: one component below the common part
    # (or the site itself, for a group of one).
    below = ".".join(parts[0][: min(common + 1, len(parts[0]))])
    try:
        return holder_of(model, below)[0]
    except UnsupportedModelError:
        return holder_of(model, site_paths[0])[0]


def attach(model: nn.Module, entries: list[Entry]) -> None:
    """Register each projection at its holder."""
    for holder_path, name, key, projection in entries:
        holder = model.get_submodule(holder_path)
        bank = holder._modules.get(SHARED_ATTR)
        if not isinstance(bank, SharedBank):
            bank = SharedBank()
            setattr(holder, SHARED_ATTR, bank)
        if name not in bank:
            bank[name] = nn.ModuleDict()
        bank[name][key] = projection
        bank.train(holder.training)  # it follows the model's mode, like the slots


def iter_shared(model: nn.Module, name: str | None = None) -> list[Entry]:
    """Every shared projection of adapter ``name`` (all adapters if ``None``), in module order."""
    found = []
    for path, module in model.named_modules():
        bank = module._modules.get(SHARED_ATTR)
        if isinstance(bank, SharedBank):
            for adapter_name, group in bank.items():
                if name is None or adapter_name == name:
                    found.extend((path, adapter_name, key, p) for key, p in group.items())
    return found


def entry_path(entry: Entry) -> str:
    """The module path of an entry's projection (the prefix of its parameter's name)."""
    holder_path, name, key, _ = entry
    prefix = f"{holder_path}.{SHARED_ATTR}" if holder_path else SHARED_ATTR
    return f"{prefix}.{name}.{key}"


def detach(model: nn.Module, name: str | None = None) -> list[Entry]:
    """Remove the shared projections of adapter ``name`` (all if ``None``); returns them."""
    removed = iter_shared(model, name)
    for holder_path, adapter_name, _, _ in removed:
        holder = model.get_submodule(holder_path)
        bank = holder._modules.get(SHARED_ATTR)
        if bank is None:
            continue  # its adapter's entries were all removed already
        bank._modules.pop(adapter_name, None)
        if len(bank) == 0:
            delattr(holder, SHARED_ATTR)
    return removed
