"""Putting adapters into a model and taking them out again: the whole-model verbs."""

from __future__ import annotations

from torch import nn

from .config import AdapterConfig, AdaptMLPConfig, ARCConfig
from .errors import UnsupportedModelError
from .modules import ARC, Adapter, AdaptMLP
from .slots import SLOT_ATTR, AdapterSlot, iter_slots
from .targets import describe_candidates, find_blocks, get_target

__all__ = [
    "DEFAULT_ADAPTER",
    "adapter_configs",
    "delete_adapter",
    "inject_arc",
    "remove_arc",
]

DEFAULT_ADAPTER = "default"


def _check_name(name: str) -> None:
    reserved = not isinstance(name, str) or not name.isidentifier() or name.startswith("_")
    if reserved or hasattr(AdapterSlot, name) or name in AdapterSlot.__annotations__:
        raise ValueError(
            f"adapter name {name!r} is invalid: expected a Python identifier that does not start "
            "with '_' and is not an attribute of AdapterSlot (e.g. 'default', 'cifar100')"
        )


def _resolve_blocks(config: AdapterConfig, n_blocks: int) -> list[int]:
    if config.blocks is None:
        return list(range(n_blocks))
    bad = [i for i in config.blocks if not -n_blocks <= i < n_blocks]
    if bad:
        raise ValueError(
            f"{type(config).__name__}.blocks={config.blocks!r} is out of range for a model with "
            f"{n_blocks} blocks: expected indices in [{-n_blocks}, {n_blocks - 1}]"
        )
    return sorted({i % n_blocks for i in config.blocks})


def _factory(module: nn.Module) -> dict:
    for tensor in module.parameters():
        if tensor.is_floating_point():
            return {"device": tensor.device, "dtype": tensor.dtype}
    return {}


def adapter_configs(model: nn.Module) -> dict[str, AdapterConfig]:
    """The adapters injected into ``model``, as ``{name: config}`` in injection order."""
    configs: dict[str, AdapterConfig] = {}
    for _, _, slot in iter_slots(model):
        for name, adapter in slot.items():
            configs.setdefault(name, adapter.config)
    return configs


def inject_arc(
    model: nn.Module, config: ARCConfig | AdaptMLPConfig, name: str = DEFAULT_ADAPTER
) -> nn.Module:
    """Add an ARC or AdaptMLP adapter to every transformer block of ``model``, in place.

    Works on any model whose attention / MLP module types are registered (see
    :func:`arc_peft.register_target`): timm ViT/DeiT/DeiT-III/DINOv2/CLIP, Swin, Swin V2, EVA-02,
    BEiT and torchvision ViT/Swin/Swin V2 out of the box. Parameter names of the backbone do not
    change. The first adapter injected into a model becomes the active one.

    Args:
        model: The backbone (e.g. from ``timm.create_model``).
        config: :class:`ARCConfig` or :class:`AdaptMLPConfig`.
        name: Name of this adapter; several named adapters can live on one backbone.

    Returns:
        ``model`` itself.

    Raises:
        TypeError: ``config`` is not an adapter config.
        ValueError: an adapter with this ``name`` already exists, or ``config.blocks`` is out
            of range.
        UnsupportedModelError: no supported attention/MLP block was found.
    """
    if not isinstance(config, (ARCConfig, AdaptMLPConfig)):
        raise TypeError(
            f"inject_arc expects an ARCConfig or AdaptMLPConfig, got {type(config).__name__}"
        )
    if not isinstance(model, nn.Module):
        raise TypeError(f"inject_arc expects an nn.Module, got {type(model).__name__}")
    _check_name(name)
    existing = adapter_configs(model)
    if name in existing:
        raise ValueError(
            f"model already has an adapter named {name!r} ({type(existing[name]).__name__}): "
            "remove it first (arc_peft.delete_adapter / remove_arc) or inject under another name"
        )
    blocks = find_blocks(model)
    if not blocks:
        raise UnsupportedModelError(
            f"no supported transformer block found in {type(model).__name__}: arc_peft looks for "
            "a module holding one registered attention and one registered MLP module. "
            f"Attention/MLP-like types found: {describe_candidates(model)}. Register yours with "
            "arc_peft.register_target(YourAttention, position='attn') and "
            "arc_peft.register_target(YourMlp, position='mlp')."
        )
    chosen = _resolve_blocks(config, len(blocks))

    # Build every adapter before touching the model, so a failure leaves it unchanged.
    owners: dict[tuple[str, int], ARC] = {}
    planned: list[tuple[int, nn.Module, str, str, Adapter]] = []
    for index in chosen:
        block = blocks[index]
        for position in config.positions:
            module = block.site(position)
            width = int(get_target(module).width(module))
            factory = _factory(module)
            if isinstance(config, ARCConfig):
                paper_zero = position == "attn" or config.init == "identity"
                owner = owners.get((position, width))
                adapter: Adapter = ARC(
                    width,
                    config.rank,
                    dropout=config.dropout,
                    scale_init="zeros" if paper_zero else "xavier",
                    share_with=owner,
                    **factory,
                )
                owners.setdefault((position, width), adapter)
            else:
                adapter = AdaptMLP(
                    width,
                    config.bottleneck,
                    scale=config.scale,
                    dropout=config.dropout,
                    placement=config.placement,
                    layernorm=config.layernorm,
                    **factory,
                )
            adapter.config = config
            adapter.train(module.training)  # a new layer follows the model's train/eval mode
            planned.append((index, block.module, position, block.sites[position], adapter))

    make_active = not existing or all(slot.active is None for _, _, slot in iter_slots(model))
    for index, block, position, site_name, adapter in planned:
        slots = block._modules.get(SLOT_ATTR)
        slot = slots[position] if slots is not None and position in slots else None
        if slot is None:
            slot = AdapterSlot(get_target(block._modules[site_name]), index, site_name)
            slot.attach(block)
        slot[name] = adapter
    if make_active:
        for _, _, slot in iter_slots(model):
            slot.active = name
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
    for _, block, slot in slots:
        if name in slot:
            del slot[name]
        if slot.active == name:
            slot.active = None
        if len(slot) == 0:
            slot.detach(block)
    return model


def remove_arc(model: nn.Module) -> nn.Module:
    """Remove every adapter and hook, restoring the original modules, keys and values.

    Returns:
        ``model`` itself, now the plain backbone (its state dict has exactly the original keys).
    """
    for _, block, slot in iter_slots(model):
        slot.detach(block)
    return model
