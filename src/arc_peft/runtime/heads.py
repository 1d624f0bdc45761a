"""Task modules: a classifier head (or any other module, e.g. a trained ``norm``) owned by one
named adapter, so that tasks with different numbers of classes share one backbone.

How it works: the model's own module stays where it is (``head``); a forward hook on it returns
the output of the *active* adapter's own module instead, when that adapter owns one. Nothing is
moved or copied when the active adapter changes, so the model's state-dict keys stay the same
whatever runs: the owned modules live in one container, ``arc_peft_tasks.<adapter>.<path with
dots as dashes>`` (``arc_peft_tasks.pets.head.weight``), which ``model.to()``,
``model.train()`` and optimizers see like any submodule. The model's own module still runs
(a single linear layer for a head) and its output is discarded.

In a mixed-task batch (``arc_peft.mixed_batch``) the hook runs each sample's own module on
its rows; heads of different widths are padded on the right with ``-inf``, which makes
``cross_entropy`` over the padded logits exactly each task's own loss (the routing is set up by
``arc_peft.runtime.multitask``). What a file carries of these modules: ``arc_peft.io.taskfiles``.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import UnsupportedModelError
from ..state import BASE_ATTR, PLAN_ATTR, SLOT_ATTR, TASKS_ATTR
from .slots import adapter_configs, iter_slots, remove_hooks

__all__ = ["add_head", "find_head", "get_head", "task_modules"]

# BASE_ATTR, ``{adapter: [module path]}``: trained modules a file loaded into the model's own
# modules (it was the only adapter then), so that saving that adapter later stores them again.


class TaskModules(nn.ModuleDict):
    """``{adapter: {path key: module}}``: the task modules of every adapter; it never runs.

    ``paths`` lists the owned paths (a hook sits on the model's module at each); ``active``
    mirrors the active adapter (kept here so the hooks need not search the model per call);
    ``routing`` is ``(batch size, {path: [(module, sample indices)]})`` in a mixed batch.
    """

    paths: tuple[str, ...]
    active: str | None
    routing: tuple[int, dict[str, list[tuple[nn.Module, Tensor]]]] | None

    def __init__(self) -> None:
        super().__init__()
        self.paths = ()
        self.active = None
        self.routing = None

    def module_for(self, name: str | None, path: str) -> nn.Module | None:
        """Adapter ``name``'s own module at ``path``, or ``None``."""
        group = self._modules.get(name) if name is not None else None
        return group._modules.get(_key(path)) if group is not None else None

    def _replace(self, path: str, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        if self.routing is not None:
            batch, parts = self.routing
            return _route(batch, parts[path], module, args, kwargs, output)
        own = self.module_for(self.active, path)
        return None if own is None else own(*args, **kwargs)


class _TaskHook:
    """The forward hook on the model's own module at ``path``: returns the active task's module
    output instead. A plain object, not a closure, so that ``copy.deepcopy`` and pickling give
    a copied model's hook the copied container (a closure would keep the original's)."""

    def __init__(self, tasks: TaskModules, path: str) -> None:
        self.tasks = tasks
        self.path = path

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        return self.tasks._replace(self.path, module, args, kwargs, output)


def _key(path: str) -> str:
    return path.replace(".", "-")


def container(model: nn.Module, create: bool = False) -> TaskModules | None:
    tasks = model._modules.get(TASKS_ATTR)
    if isinstance(tasks, TaskModules) or not create:
        return tasks if isinstance(tasks, TaskModules) else None
    if isinstance(model, (nn.Sequential, nn.ModuleList, nn.ModuleDict)):
        raise UnsupportedModelError(
            f"per-task modules need a model that is not an {type(model).__name__} (it would run "
            "the container as a layer): wrap the model in an nn.Module first"
        )
    tasks = TaskModules().train(model.training)
    setattr(model, TASKS_ATTR, tasks)
    return tasks


def _active(model: nn.Module) -> str | None:
    for _, _, slot in iter_slots(model):
        return slot.active
    return None


def active(model: nn.Module) -> str | None:
    """The adapter whose task modules run now (``None`` inside ``disable_adapter``)."""
    tasks = container(model)
    return tasks.active if tasks is not None else _active(model)


def sync(model: nn.Module) -> None:
    """Tell the task hooks which adapter is active (call after it changes)."""
    tasks = container(model)
    if tasks is not None:
        tasks.active = _active(model)


def _add_hook(model: nn.Module, tasks: TaskModules, path: str) -> None:
    model.get_submodule(path).register_forward_hook(_TaskHook(tasks, path), with_kwargs=True)
    tasks.paths = (*tasks.paths, path)


def _remove_hook(model: nn.Module, tasks: TaskModules, path: str) -> None:
    remove_hooks(
        model.get_submodule(path), lambda fn: isinstance(fn, _TaskHook) and fn.tasks is tasks
    )
    tasks.paths = tuple(p for p in tasks.paths if p != path)


def owned(model: nn.Module, name: str) -> dict[str, nn.Module]:
    """``{path: module}`` of the task modules adapter ``name`` owns."""
    tasks = container(model)
    if tasks is None:
        return {}
    found = {p: tasks.module_for(name, p) for p in tasks.paths}
    return {p: m for p, m in found.items() if m is not None}


def running(model: nn.Module, name: str | None, path: str) -> nn.Module:
    """The module that runs at ``path`` while adapter ``name`` is active."""
    tasks = container(model)
    own = tasks.module_for(name, path) if tasks is not None else None
    return own if own is not None else model.get_submodule(path)


def check_path(model: nn.Module, path: str) -> nn.Module:
    if not path or path == TASKS_ATTR or path.startswith(f"{TASKS_ATTR}."):
        raise ValueError(f"{path!r} cannot be a task module: name a submodule of the backbone")
    try:
        module = model.get_submodule(path)
    except AttributeError:
        children = [n for n, _ in model.named_children()]
        raise ValueError(
            f"{path!r} is not a submodule of {type(model).__name__}; top-level modules are "
            f"{children}"
        ) from None
    sites = {slot.site.path for _, _, slot in iter_slots(model)}
    sites |= {slot.site.output_path for _, _, slot in iter_slots(model)}
    for sub_path, sub in module.named_modules(prefix=path):
        if SLOT_ATTR in sub._modules or sub_path in sites:
            raise ValueError(
                f"{path!r} cannot be owned by one task: it holds an adapter site ({sub_path}); "
                "name a module inside the block instead (a norm, a linear layer, the head)"
            )
    return module


def set_task_module(model: nn.Module, name: str, path: str, module: nn.Module) -> None:
    """Give adapter ``name`` its own ``module`` at ``path`` (replacing one it owned there)."""
    if name not in adapter_configs(model):
        raise KeyError(
            f"model has no adapter named {name!r}; it has {sorted(adapter_configs(model))}"
        )
    if not isinstance(module, nn.Module):
        raise TypeError(f"a task module must be an nn.Module, got {type(module).__name__}")
    base = check_path(model, path)
    tasks = container(model, create=True)
    assert tasks is not None
    if name not in tasks:
        tasks[name] = nn.ModuleDict()
    tasks[name][_key(path)] = module.train(base.training)
    if path not in tasks.paths:
        _add_hook(model, tasks, path)
    sync(model)


def note_loaded(model: nn.Module, name: str, trained: dict[str, Any] | None) -> None:
    """Record that adapter ``name``'s trained modules were loaded into the model's own."""
    if trained:
        model.__dict__.setdefault(BASE_ATTR, {})[name] = list(trained["modules"])


def forget(model: nn.Module, name: str) -> None:
    """Drop every task module of adapter ``name`` (it is being deleted)."""
    model.__dict__.get(BASE_ATTR, {}).pop(name, None)
    tasks = container(model)
    if tasks is not None and name in tasks:
        del tasks[name]
        _prune(model, tasks)


def adopt(model: nn.Module, name: str) -> dict[str, nn.Module]:
    """Make adapter ``name``'s task modules the model's own (a merge); returns the modules they
    replace, ``{path: module}``, so that an unmerge can restore them."""
    replaced: dict[str, nn.Module] = {}
    tasks = container(model)
    if tasks is None:
        return replaced
    for path, module in owned(model, name).items():
        _remove_hook(model, tasks, path)
        replaced[path] = model.get_submodule(path)
        _install(model, path, module)
    if name in tasks:
        del tasks[name]
    _prune(model, tasks)
    return replaced


def unadopt(model: nn.Module, name: str, replaced: dict[str, nn.Module]) -> None:
    """Undo ``adopt``: the modules at ``replaced``'s paths go back to adapter ``name`` and
    the modules they replaced return to their places."""
    for path, base in replaced.items():
        mine = model.get_submodule(path)
        _install(model, path, base)
        set_task_module(model, name, path, mine)


def restore_all(model: nn.Module) -> None:
    """Remove every task module and hook (no adapter is left)."""
    tasks = container(model)
    if tasks is None:
        return
    for path in tasks.paths:
        _remove_hook(model, tasks, path)
    delattr(model, TASKS_ATTR)


def _prune(model: nn.Module, tasks: TaskModules) -> None:
    """Unhook paths no adapter owns any more; remove the container when it is empty."""
    for path in tasks.paths:
        if all(tasks.module_for(owner, path) is None for owner in tasks):
            _remove_hook(model, tasks, path)
    if not tasks.paths:
        delattr(model, TASKS_ATTR)


def _install(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, attr = path.rpartition(".")
    parent = model.get_submodule(parent_path)
    module.train(parent.training)
    setattr(parent, attr, module)


# -- building heads --------------------------------------------------------------------------------


def last_linear(module: nn.Module) -> tuple[str, nn.Linear] | None:
    found = None
    for path, sub in module.named_modules():
        if isinstance(sub, nn.Linear):
            found = (path, sub)
    return found


def head_like(
    base: nn.Module, shapes: dict[str, Sequence[int]], in_features: int | None = None
) -> nn.Module:
    """A copy of ``base`` whose linear layers take the given parameter ``shapes`` (keys relative
    to ``base``), freshly initialised where a shape changed; raises ``ValueError`` naming the
    tensor when the structure cannot take them exactly. A base without parameters
    (``nn.Identity``, a model built with ``num_classes=0``) becomes an ``nn.Linear`` if the
    shapes are one's taking ``in_features`` (the features the base receives).

    The shapes are checked in full before anything is allocated (``check_head_shapes``): a file
    claiming a bias of 2**40 classes costs nothing to refuse."""
    layers = check_head_shapes(base, shapes, in_features)
    if not dict(base.state_dict()):
        out_f, in_f = shapes["weight"]
        return nn.Linear(in_f, out_f, bias="bias" in shapes, **_factory(base))
    head = copy.deepcopy(base)
    for module in head.modules():  # the copy must not carry the task hook of the original
        remove_hooks(module, lambda fn: isinstance(fn, _TaskHook))
    for owner_path, layer in layers.items():
        out_f, in_f = shapes[f"{owner_path}.weight" if owner_path else "weight"]
        fresh = nn.Linear(
            in_f, out_f, bias=layer.bias is not None, device=layer.weight.device,
            dtype=layer.weight.dtype,
        )  # fmt: skip
        if owner_path:
            _install(head, owner_path, fresh)
        else:
            head = fresh
    return head


def check_head_shapes(
    base: nn.Module, shapes: dict[str, Sequence[int]], in_features: int | None = None
) -> dict[str, nn.Linear]:
    """Check that a copy of ``base`` can hold exactly ``shapes`` (see ``head_like``), without
    allocating anything; returns ``{path: linear layer}`` of the layers to be resized.

    Every tensor must keep ``base``'s shape except a linear layer's ``weight`` (and with it its
    ``bias``), which may change its number of outputs but not of inputs; the keys must be
    exactly ``base``'s."""
    own = {k: list(v.shape) for k, v in base.state_dict().items()}
    wanted = {k: list(v) for k, v in shapes.items()}
    if not own:
        return _check_linear(base, wanted, in_features)
    resized: dict[str, nn.Linear] = {}
    for key, shape in wanted.items():
        if key not in own or own[key] == shape:
            continue
        owner_path, _, leaf = key.rpartition(".")
        layer = base.get_submodule(owner_path)
        if not isinstance(layer, nn.Linear) or leaf not in ("weight", "bias"):
            raise ValueError(
                f"cannot give {key} the shape {shape[:8]}: it belongs to a "
                f"{type(layer).__name__}, and only linear layers are resized"
            )
        resized[owner_path] = layer
    planned = dict(own)
    for owner_path, layer in resized.items():
        prefix = f"{owner_path}." if owner_path else ""
        weight = wanted.get(f"{prefix}weight")
        if weight is None or len(weight) != 2 or weight[0] < 1:
            raise ValueError(
                f"{prefix}bias or weight has another shape than the layer's, but "
                f"{prefix}weight is {'missing' if weight is None else weight[:8]}: a resized "
                "linear layer needs a weight of shape [outputs >= 1, inputs]"
            )
        if weight[1] != layer.in_features:
            raise ValueError(
                f"{prefix}weight has shape {weight} but the layer takes {layer.in_features} "
                "features: the head was made for another backbone width"
            )
        planned[f"{prefix}weight"] = weight
        if layer.bias is not None:
            planned[f"{prefix}bias"] = [weight[0]]
    _same_shapes(base, planned, wanted)
    return resized


def _check_linear(
    base: nn.Module, wanted: dict[str, list[int]], in_features: int | None
) -> dict[str, nn.Linear]:
    weight = wanted.get("weight")
    if weight is None or len(weight) != 2 or weight[0] < 1 or set(wanted) - {"weight", "bias"}:
        raise ValueError(
            f"the {type(base).__name__} here has no parameters; it can only become a linear "
            f"layer (weight [outputs >= 1, inputs], optional bias), not {_shown(wanted)}"
        )
    if in_features is None:
        raise ValueError(
            f"cannot tell how many features the {type(base).__name__} receives (the model "
            "declares no num_features), so a linear layer for it cannot be checked"
        )
    planned = {"weight": [weight[0], in_features]}
    if "bias" in wanted:
        planned["bias"] = [weight[0]]
    _same_shapes(base, planned, wanted)
    return {}


def _shown(shapes: dict[str, list[int]]) -> str:
    listed = sorted(shapes)
    text = ", ".join(f"{k} {shapes[k][:8]}" for k in listed[:5])
    return text + (f" and {len(listed) - 5} more" if len(listed) > 5 else "")


def _same_shapes(
    base: nn.Module, planned: dict[str, list[int]], wanted: dict[str, list[int]]
) -> None:
    if planned == wanted:
        return
    wrong = sorted(k for k in set(planned) | set(wanted) if planned.get(k) != wanted.get(k))
    raise ValueError(
        f"the tensors {_shown({k: wanted[k] for k in wrong if k in wanted})} do not fit a "
        f"copy of {type(base).__name__}, which would hold "
        f"{_shown({k: planned[k] for k in wrong if k in planned}) or 'no such tensors'}"
    )


def features_into(model: nn.Module) -> int | None:
    """The number of features the model's classifier head receives, where the model says."""
    for attr in ("head_hidden_size", "num_features"):
        value = getattr(model, attr, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def _factory(module: nn.Module) -> dict:
    for tensor in module.parameters():
        return {"device": tensor.device, "dtype": tensor.dtype}
    return {}


def head_path(model: nn.Module) -> str:
    """Path of the model's classifier head (see ``arc_peft.get_head``)."""
    head = find_head(model)
    if head is None:
        raise ValueError(
            f"{type(model).__name__} has no classifier head arc_peft can find (no "
            "get_classifier(), heads, head, fc or classifier)"
        )
    for path, module in model.named_modules():
        if module is head:
            return path
    raise ValueError(f"the head of {type(model).__name__} is not one of its submodules")


def add_head(model: nn.Module, name: str, head: nn.Module | int) -> nn.Module:
    """Give adapter ``name`` its own classifier head; returns the head.

    Args:
        model: A model holding the adapter ``name``.
        name: The adapter (task) that owns the head.
        head: A module, or a number of classes: a copy of the model's own head whose last
            linear layer outputs that many classes (freshly initialised).

    Whenever ``name`` is active (``arc_peft.set_active_adapter``) the model runs this head;
    in a ``arc_peft.mixed_batch`` each sample gets its own task's head.
    ``arc_peft.save_adapter`` stores it, ``arc_peft.load_adapter`` gives it back to
    the adapter it is loaded as.
    """
    path = head_path(model)
    base = running(model, None, path)
    if isinstance(head, int) and not isinstance(head, bool):
        if head < 1:
            raise ValueError(f"add_head: num_classes={head} is invalid: expected an int >= 1")
        last = last_linear(base)
        if last is None:
            features = _in_features(model)
            head = nn.Linear(features, head, **_factory(model))
        else:
            layer_path, layer = last
            shapes = {k: list(v.shape) for k, v in base.state_dict().items()}
            shapes[f"{layer_path}.weight" if layer_path else "weight"] = [head, layer.in_features]
            if layer.bias is not None:
                shapes[f"{layer_path}.bias" if layer_path else "bias"] = [head]
            head = head_like(base, shapes)
    elif not isinstance(head, nn.Module):
        raise TypeError(
            f"add_head expects an nn.Module or a number of classes, got {type(head).__name__}"
        )
    set_task_module(model, name, path, head)
    return head


def _in_features(model: nn.Module) -> int:
    num_features = getattr(model, "num_features", None)
    if isinstance(num_features, int):
        return num_features
    raise ValueError(
        f"add_head: the head of {type(model).__name__} has no linear layer to copy and the model "
        "declares no num_features; pass a head module instead of a number of classes"
    )


def task_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every parameter of every adapter's task modules."""
    tasks = container(model)
    return list(tasks.parameters()) if tasks is not None else []


def task_modules(model: nn.Module, name: str) -> dict[str, nn.Module]:
    """``{path: module}`` of the modules adapter ``name`` owns (its head, and any module it
    carries from ``freeze_backbone(also=...)``)."""
    return owned(model, name)


# -- mixed batches ---------------------------------------------------------------------------------


def _route(
    batch: int,
    parts: list[tuple[nn.Module, Tensor]],
    own: nn.Module,
    args: tuple,
    kwargs: dict,
    output: Tensor,
) -> Tensor:
    """Each group of samples through its own module, the model's own module's samples taken
    from its ``output`` (it ran on the whole batch); narrower outputs padded with ``-inf``."""
    x = args[0] if args else next(iter(kwargs.values()))
    rows = x.shape[0]
    if rows % batch:
        raise ValueError(
            f"mixed batch of {batch} task names, but a task module received {rows} rows"
        )
    k = rows // batch
    outs = []
    for module, samples in parts:
        idx = samples.to(x.device)
        if k > 1:  # row r of a (batch * k)-row input belongs to sample r // k
            idx = (idx[:, None] * k + torch.arange(k, device=x.device)).reshape(-1)
        if module is own:
            outs.append((idx, output.index_select(0, idx)))
            continue
        sub_args = (x.index_select(0, idx), *args[1:]) if args else ()
        sub_kwargs = kwargs if args else {next(iter(kwargs)): x.index_select(0, idx)}
        outs.append((idx, module(*sub_args, **sub_kwargs)))
    width = max(out.shape[-1] for _, out in outs)
    first = outs[0][1]
    result = first.new_full((rows, *first.shape[1:-1], width), float("-inf"))
    for idx, out in outs:
        if out.shape[-1] < width:  # a head with fewer classes
            out = nn.functional.pad(out, (0, width - out.shape[-1]), value=float("-inf"))
        result = result.index_copy(0, idx, out)
    return result


def get_head(model: nn.Module, name: str | None = None) -> nn.Module | None:
    """The classifier head that runs: the active adapter's own head if it has one (see
    ``arc_peft.add_head``), otherwise the model's: timm's ``get_classifier()``, else a
    ``heads`` (torchvision ViT), ``head`` (Swin), ``fc`` or ``classifier`` attribute. ``None``
    if the model has none.

    A module containing attention is never taken for a classifier: it is an attention-pooling
    head (Hugging Face SigLIP's and AIMv2's ``head``) that computes features. Attention is
    recognised structurally: an ``nn.MultiheadAttention``, or a module that discovery's probe
    found attention in (an adapter site, or attention pooling left out), as recorded in the
    site plan that ``inject_arc`` (or ``site_plan``) keeps on the model.

    Args:
        model: The model.
        name: An adapter: the head that runs while it is active. Default: the active one.
    """
    head = find_head(model)
    if head is None:
        return None
    path = next(p for p, m in model.named_modules() if m is head)
    return running(model, name if name is not None else active(model), path)


def find_head(model: nn.Module) -> nn.Module | None:
    """The model's own classifier head (whichever adapter is active); see ``get_head``."""
    get_classifier = getattr(model, "get_classifier", None)
    if callable(get_classifier):
        found = get_classifier()
        if isinstance(found, nn.Module):
            return found
    attention: set[int] | None = None
    for attr in ("heads", "head", "fc", "classifier"):
        found = getattr(model, attr, None)
        if not isinstance(found, nn.Module):
            continue
        if attention is None:
            attention = _attention_modules(model)
        if not any(
            isinstance(m, nn.MultiheadAttention) or id(m) in attention for m in found.modules()
        ):
            return found
    return None


def _attention_modules(model: nn.Module) -> set[int]:
    """The ids of the modules that the site plans kept on ``model`` and on the adapted models
    inside it name as attention: sites of position ``"attn"`` and attention left out (pooling,
    cross-attention). Found by the probe from what a module computes, not from its name."""
    found: set[int] = set()
    for holder in model.modules():
        kept = holder.__dict__.get(PLAN_ATTR)
        if kept is None:
            continue
        plan = kept[1]
        named = dict(holder.named_modules())
        for entry in (*plan.sites, *plan.left_out):
            module = named.get(entry.path)
            if entry.position == "attn" and module is not None:
                found.add(id(module))
    return found
