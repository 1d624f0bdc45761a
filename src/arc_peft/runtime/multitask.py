"""Many adapters on one backbone: choose the active one, bypass them all, or route a mixed batch."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from . import heads
from .slots import adapter_configs, iter_slots

__all__ = ["active_adapter", "disable_adapter", "mixed_batch", "set_active_adapter", "split_logits"]


def _require_adapters(model: nn.Module, verb: str) -> list:
    slots = iter_slots(model)
    if not slots:
        raise ValueError(f"{verb}: the model has no adapters; inject or load one first")
    return slots


def active_adapter(model: nn.Module) -> str | None:
    """Name of the adapter every sample currently goes through, or ``None``."""
    for _, _, slot in iter_slots(model):
        return slot.active
    return None


def set_active_adapter(model: nn.Module, name: str | None) -> None:
    """Make ``name`` the adapter that runs (``None``: none runs, the bare backbone computes).

    Switching only flips a flag on each adapted site: no weights are copied, nothing is
    re-injected.
    """
    slots = _require_adapters(model, "set_active_adapter")
    known = {adapter_name for _, _, slot in slots for adapter_name in slot}
    if name is not None and name not in known:
        raise KeyError(f"model has no adapter named {name!r}; it has {sorted(known)}")
    for _, _, slot in slots:
        slot.active = name
    heads.sync(model)  # the new active adapter's own head (if any) now runs


@contextmanager
def disable_adapter(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, the model computes exactly as the bare backbone.

    Example::

        with arc_peft.disable_adapter(model):
            features = model(images)
    """
    slots = _require_adapters(model, "disable_adapter")
    previous = [slot.disabled for _, _, slot in slots]
    for _, _, slot in slots:
        slot.disabled = True
    try:
        with _bypassed_tasks(model):
            yield model
    finally:
        for (_, _, slot), was in zip(slots, previous, strict=False):
            slot.disabled = was


@contextmanager
def mixed_batch(model: nn.Module, tasks: Sequence[str | None]) -> Iterator[nn.Module]:
    """Run one batch whose samples belong to different tasks, each through its own adapter.

    Args:
        model: A model holding the named adapters.
        tasks: One adapter name per sample of the next forward passes' batch (``None``: that
            sample goes through the bare backbone).

    The result equals running each sample alone with its adapter active (in eval mode; in
    training mode dropout draws differ). Example::

        with arc_peft.mixed_batch(model, ["cifar", "svhn", "cifar", None]):
            logits = model(images)          # images.shape[0] == 4

    Adapters that own a head (``arc_peft.add_head``, or loaded from a file that holds one)
    classify their own samples: row ``i`` of the logits comes from task ``tasks[i]``'s head.
    Heads of different sizes are padded on the right with ``-inf``, so
    ``F.cross_entropy(logits, labels)`` is exactly every task's own loss, and
    ``arc_peft.split_logits`` cuts the rows back to ``{task: logits}``::

        with arc_peft.mixed_batch(model, ["cifar", "pets", "cifar"]):
            logits = model(images)                   # (3, 100): pets' rows padded after 37
        per_task = arc_peft.split_logits(logits, ["cifar", "pets", "cifar"], model)
        per_task["pets"].shape                       # (1, 37)
    """
    slots = _require_adapters(model, "mixed_batch")
    tasks = list(tasks)
    if not tasks:
        raise ValueError("mixed_batch needs at least one task name (one per sample)")
    known = adapter_configs(model)
    unknown = sorted({t for t in tasks if t is not None and t not in known})
    if unknown:
        raise KeyError(
            f"mixed_batch: unknown adapter name(s) {unknown}; the model has {sorted(known)}"
        )
    groups = []
    for name in dict.fromkeys(t for t in tasks if t is not None):
        samples = torch.tensor([i for i, t in enumerate(tasks) if t == name], dtype=torch.long)
        groups.append((name, samples))
    previous = [slot.routing for _, _, slot in slots]
    for _, _, slot in slots:
        slot.routing = (len(tasks), groups)

    def check_batch(module: nn.Module, args: tuple, kwargs: dict) -> None:
        # The sites only see rows, and a windowed attention legitimately gets batch * windows of
        # them: a batch of 4 with 2 names would pass there as "2 windows per sample".
        x = args[0] if args else None
        if isinstance(x, torch.Tensor) and x.dim() > 0 and x.shape[0] != len(tasks):
            raise ValueError(
                f"mixed_batch got {len(tasks)} task names but the model was called with a batch "
                f"of {x.shape[0]}: pass exactly one name (or None) per sample"
            )

    handle = model.register_forward_pre_hook(check_batch, with_kwargs=True)
    try:
        with _routed_tasks(model, tasks):
            yield model
    finally:
        handle.remove()
        for (_, _, slot), was in zip(slots, previous, strict=False):
            slot.routing = was


# -- task modules in a mixed batch (see arc_peft.runtime.heads) ------------------------------------


@contextmanager
def _bypassed_tasks(model: nn.Module) -> Iterator[None]:
    """Within the block the model's own modules run (the bare backbone, head included)."""
    tasks_of = heads.container(model)
    if tasks_of is None:
        yield
        return
    previous = tasks_of.active
    tasks_of.active = None
    try:
        yield
    finally:
        tasks_of.active = previous


@contextmanager
def _routed_tasks(model: nn.Module, tasks: Sequence[str | None]) -> Iterator[None]:
    """Within the block, every owned path runs each sample through its own task's module."""
    tasks_of = heads.container(model)
    if tasks_of is None:
        yield
        return
    parts: dict[str, list[tuple[nn.Module, Tensor]]] = {}
    for path in tasks_of.paths:
        groups: dict[int, tuple[nn.Module, list[int]]] = {}
        for i, task in enumerate(tasks):
            module = heads.running(model, task, path)
            groups.setdefault(id(module), (module, []))[1].append(i)
        parts[path] = [(m, torch.tensor(ix, dtype=torch.long)) for m, ix in groups.values()]
    previous = tasks_of.routing
    tasks_of.routing = (len(tasks), parts)
    try:
        yield
    finally:
        tasks_of.routing = previous


def split_logits(
    logits: Tensor, tasks: Sequence[str | None], model: nn.Module | None = None
) -> dict[str | None, Tensor]:
    """``{task: its samples' logits, in batch order}`` from a mixed batch's padded logits.

    Each task's columns are cut to its own head's width: taken from ``model`` when given (the
    head's last linear layer), otherwise the columns that are not ``-inf`` padding.
    """
    if logits.shape[0] != len(tasks):
        raise ValueError(
            f"split_logits got {logits.shape[0]} rows of logits for {len(tasks)} task names"
        )
    result: dict[str | None, Tensor] = {}
    for task in dict.fromkeys(tasks):
        rows = logits[[i for i, t in enumerate(tasks) if t == task]]
        width = None
        if model is not None:
            last = heads.last_linear(heads.running(model, task, heads.head_path(model)))
            width = last[1].out_features if last is not None else None
        if width is None:
            finite = ~torch.isneginf(rows).all(dim=0)
            width = int(finite.nonzero().max()) + 1 if bool(finite.any()) else 0
        result[task] = rows[..., :width]
    return result
