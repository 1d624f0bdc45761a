"""What trains and what it costs: ``freeze_backbone``, ``adapter_parameters`` and
``count_parameters``. What is an adapter is decided structurally: a parameter is adapter state if
it belongs to an ``Adapter`` module, never by its name."""

from __future__ import annotations

import functools
from collections.abc import Iterable
from dataclasses import dataclass, field

from torch import nn

from .methods.layers import Adapter
from .methods.lean import know_norms
from .runtime import foreign, heads, shared
from .runtime.heads import get_head
from .runtime.slots import adapter_configs, iter_slots
from .runtime.wrappers import unwrap
from .state import TRAINED_ATTR

__all__ = [
    "ParameterCounts",
    "adapter_parameters",
    "count_parameters",
    "freeze_backbone",
]


def _adapter_modules(model: nn.Module, name: str | None = None) -> list[tuple[str, Adapter]]:
    """``(path, adapter)`` for the adapters named ``name`` (all adapters if ``None``): every
    site's layer, then the shared ARC projections."""
    found: list[tuple[str, Adapter]] = []
    for path, _, slot in iter_slots(model):
        for adapter_name, adapter in slot.items():
            if name is None or adapter_name == name:
                found.append((f"{path}.{adapter_name}", adapter))
    found.extend((shared.entry_path(e), e[3]) for e in shared.iter_shared(model, name))
    return found


def adapter_parameters(model: nn.Module, name: str | None = None) -> dict[str, nn.Parameter]:
    """``{parameter name: parameter}`` of the adapters named ``name`` (all adapters if ``None``).

    Names are the model's own (``blocks.0.arc_peft.attn.default.scale``); a shared ARC projection
    appears once, where it is held (``arc_peft_shared.default.attn-768.projection``).
    """
    return {
        f"{path}.{pname}": param
        for path, adapter in _adapter_modules(model, name)
        for pname, param in adapter.named_parameters()
    }


def freeze_backbone(
    model: nn.Module,
    train_head: bool = True,
    also: Iterable[str | nn.Module] = (),
    adapters: str = "all",
) -> nn.Module:
    """Freeze everything except the adapters and, by default, the classifier head.

    Every injected adapter stays trainable, with the heads and modules it owns
    (``arc_peft.add_head``): a ``mixed_batch`` forward runs each task's adapter and head on its
    own samples, so one backward pass trains every task. With one task active, the others do not
    run and get no gradient (optimizers skip them: the step costs what it did with one adapter).
    DDP, though, requires every trainable parameter to get a gradient unless it is built with
    ``find_unused_parameters=True``: to train one task at a time under DDP, pass
    ``adapters="active"``, which leaves only the active adapter (and its head) trainable.

    Frozen normalisation layers with running statistics (BatchNorm, and InstanceNorm with
    ``track_running_stats``) are put in eval mode and stay there when ``model.train()`` is
    called: in training mode they would keep updating their running mean and variance, so the
    frozen backbone would drift and the saved adapter would not reproduce the trained model.
    Calling ``freeze_backbone`` again recomputes which layers are pinned this way.

    With peft's layers added after arc_peft (``peft.get_peft_model``, which froze the arc_peft
    adapters), this makes the adapters trainable again and leaves peft's layers as peft set them.

    Modules named in ``also`` are recorded on the model; ``arc_peft.save_adapter`` stores
    them with the adapter (and, after this call, refuses to save if some other parameter was
    made trainable, which the file would lose).

    Args:
        model: The adapted model (a plain model gives a linear probe).
        train_head: Keep the classifier head trainable (see ``get_head``).
        also: Extra submodules to keep trainable, by name (``"norm"``, ``"blocks.11"``) or object.
        adapters: ``"all"`` (every adapter, and the task modules each owns) or ``"active"``
            (only the active adapter and its task modules).

    Returns:
        ``model`` itself.
    """
    if adapters not in ("all", "active"):
        raise ValueError(
            f"freeze_backbone(adapters={adapters!r}) is invalid: expected 'all' (every adapter "
            "trains, as a mixed batch needs) or 'active' (only the active one, e.g. under DDP)"
        )
    wrapper, model = model, unwrap(model)  # names in ``also`` are the plain model's
    paths = {id(module): path for path, module in model.named_modules()}
    extra: list[tuple[str, nn.Module]] = []
    for item in also:
        if isinstance(item, nn.Module):
            if id(item) not in paths:
                raise ValueError(
                    f"freeze_backbone(also=...): the {type(item).__name__} given is not a "
                    f"submodule of {type(model).__name__}"
                )
            extra.append((paths[id(item)], item))
            continue
        try:
            extra.append((item, model.get_submodule(item)))
        except AttributeError:
            children = [n for n, _ in model.named_children()]
            raise ValueError(
                f"freeze_backbone(also=...): {item!r} is not a submodule of "
                f"{type(model).__name__}; top-level modules are {children}"
            ) from None
    head = get_head(model) if train_head else None
    if train_head and head is None and _headless_by_design(model):
        train_head = False  # nothing to train: a feature extractor or a base model
    if train_head and head is None:
        raise ValueError(
            f"freeze_backbone could not find the classifier head of {type(model).__name__} "
            "(no get_classifier(), heads, head, fc or classifier): pass train_head=False and "
            "name the head in also=(...)"
        )
    # peft's layers (LoRA added after arc_peft) are peft's to train: they keep the state peft
    # gave them (its LoRA weights trainable, the layers it wraps frozen).
    peft_state = {
        id(p): (p, p.requires_grad)
        for layer in foreign.foreign_layers(model).values()
        for p in layer.parameters()
    }
    for param in model.parameters():
        param.requires_grad_(False)
    if adapters == "all":
        names = set(adapter_configs(model))
    else:
        names = {slot.active for _, _, slot in iter_slots(model)} - {None}
    own_head = heads.find_head(model)
    head_path = next((p for p, m in model.named_modules() if m is own_head), None)
    trained = [head] if head is not None else []
    for name in names:
        for param in adapter_parameters(model, name).values():
            param.requires_grad_(True)
        # The adapter's own modules (freeze_backbone(also=...) copies loaded onto a shared
        # backbone) and, with the head, the head that runs for it: its own or the model's.
        trained += [m for p, m in heads.owned(model, name).items() if p != head_path]
        if train_head:
            trained.append(get_head(model, name))
    trained += [module for _, module in extra]
    trained = list({id(m): m for m in trained if m is not None}.values())
    for module in trained:
        for param in module.parameters():
            param.requires_grad_(True)
    for param, was in peft_state.values():
        param.requires_grad_(was)
    model.__dict__[TRAINED_ATTR] = tuple(dict.fromkeys(path for path, _ in extra))
    _pin_frozen_norms(model, trained)
    know_norms(model)  # as inject_arc: also for a copy made after injecting (copy.deepcopy)
    return wrapper


def _headless_by_design(model: nn.Module) -> bool:
    """A model built without a classifier: timm's ``features_only=True`` forms (they describe
    their outputs in ``feature_info``) and a transformers base model (its own ``base_model``)."""
    if getattr(model, "feature_info", None) is not None and not callable(
        getattr(model, "get_classifier", None)
    ):
        return True
    return type(model).__module__.startswith("transformers.") and (
        getattr(model, "base_model", None) is model
    )


def _stay_in_eval(module: nn.Module, mode: bool = True) -> nn.Module:
    """``train()`` of a pinned norm layer: a module-level function (in a ``partial``) so that
    the model still pickles and deep-copies."""
    if not isinstance(mode, bool):
        raise ValueError("training mode is expected to be boolean")
    module.training = False
    return module


def _pin_frozen_norms(model: nn.Module, trained: list[nn.Module]) -> None:
    """Put frozen running-statistics norms in eval mode for good (see freeze_backbone)."""
    inside_trained = {id(m) for module in trained for m in module.modules()}
    for module in model.modules():
        pinned = getattr(module.__dict__.get("train"), "func", None) is _stay_in_eval
        if pinned:
            del module.__dict__["train"]
        stats = getattr(module, "running_mean", None) is not None or (
            getattr(module, "running_var", None) is not None
        )
        frozen = id(module) not in inside_trained and not any(
            p.requires_grad for p in module.parameters()
        )
        if stats and frozen:
            module.train = functools.partial(_stay_in_eval, module)  # instance attribute
            module.training = False
        elif pinned:
            module.training = model.training


@dataclass(frozen=True)
class ParameterCounts:
    """Parameter counts of a model. ``str()`` gives a one-line summary in the papers' style.

    Attributes:
        total: Every parameter (shared ones once), adapters included.
        trainable: Parameters with ``requires_grad``.
        adapter: Parameters of adapter modules (all named adapters).
        head: Parameters of the classifier heads that run: the model's, and each adapter's
            own (``arc_peft.add_head``), each once.
        breakdown: Adapter parameters per adapter module path (a shared ARC projection is
            counted once, where it is held).
        sites: Adapted sites per position (``{"attn": 12, "mlp": 12}``), any adapter.
    """

    total: int
    trainable: int
    adapter: int
    head: int
    breakdown: dict[str, int] = field(default_factory=dict, repr=False)
    sites: dict[str, int] = field(default_factory=dict)

    def __str__(self) -> str:
        pct = 100.0 * self.trainable / self.total if self.total else 0.0
        where = ", ".join(f"{p} {n}" for p, n in self.sites.items())
        return (
            f"trainable {_human(self.trainable)} of {_human(self.total)} ({pct:.2f}%) | "
            f"adapters {self.adapter:,} | head {self.head:,}"
            + (f" | sites adapted: {where}" if where else "")
        )


def _human(count: int) -> str:
    """``5,530,000 -> "5.53M"``, ``32,487 -> "32.5K"``: three significant digits, any size."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= scale:
            return f"{count / scale:.3g}{unit}"
    return str(count)


def count_parameters(model: nn.Module) -> ParameterCounts:
    """Count total, trainable, adapter and head parameters (each shared tensor once)."""
    params = dict(model.named_parameters())
    total = sum(p.numel() for p in params.values())
    trainable = sum(p.numel() for p in params.values() if p.requires_grad)
    breakdown = {
        path: sum(p.numel() for p in adapter.parameters())
        for path, adapter in _adapter_modules(model)
    }
    # Every head some task runs, each once: the active one, and each adapter's own or the model's.
    running = [get_head(model)] + [get_head(model, name) for name in adapter_configs(model)]
    distinct = {id(h): h for h in running if h is not None}.values()
    head_count = sum(p.numel() for h in distinct for p in h.parameters())
    sites: dict[str, int] = {}
    for _, _, slot in iter_slots(model):
        sites[slot.position] = sites.get(slot.position, 0) + 1
    return ParameterCounts(
        total=total,
        trainable=trainable,
        adapter=sum(breakdown.values()),
        head=head_count,
        breakdown=breakdown,
        sites=sites,
    )
