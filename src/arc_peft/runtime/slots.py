"""The per-site runtime: an ``AdapterSlot`` holds the named adapters of one attention or MLP
module (a *site*) and applies them through forward hooks on that module.

Why hooks rather than a wrapper module: the adapted module keeps its place and its parameter
names (``blocks.0.attn.qkv.weight`` stays ``blocks.0.attn.qkv.weight``), so a plain backbone
checkpoint loads into an adapted model and a merged model is exactly the plain backbone.

A slot lives on the nearest module above its site that is not a container, under
``<holder>.arc_peft.<site path relative to it, dots as dashes>``, so an adapter parameter is named
e.g. ``blocks.0.arc_peft.attn.default.scale``. (Not on the site itself: torchvision's MLPs are
``nn.Sequential``, which would run any child it is given; nor on a ``ModuleList`` the model
iterates.) A site may have two ends: the input is read at one module, an output adapter's term
added at another (Hugging Face ``intermediate`` / ``output``).
"""

from __future__ import annotations

import inspect
import os
import sys
import warnings
from typing import Any

import torch
from torch import Tensor, nn

from ..discovery.sites import Site
from ..errors import AdaptersNotTrainedWarning, UnsupportedModelError
from ..methods import AdapterConfig
from ..methods.layers import Adapter
from ..methods.lean import LEAN
from ..state import SLOT_ATTR

__all__ = [
    "AdapterSlot",
    "BlockSlots",
    "adapter_configs",
    "check_name",
    "holder_of",
    "iter_slots",
    "remove_hooks",
]


class BlockSlots(nn.ModuleDict):
    """A block's slots by position (``"attn"``, ``"mlp"``); it never runs, it only holds state."""


class AdapterSlot(nn.ModuleDict):
    """The adapters of one site, by name, plus which of them runs.

    Exactly one of three modes applies at a time: *disabled* (the bare module runs), *routed*
    (each sample of a mixed-task batch goes through its own adapter, see
    ``arc_peft.mixed_batch``) or *active* (every sample goes through ``active``, or through
    no adapter when ``active`` is ``None`` or has no adapter at this site).
    """

    # Every piece of slot state is declared here, at class level, so that an adapter name that
    # would collide with it (adapters are entries of this ModuleDict) is caught by
    # ``hasattr(AdapterSlot, name)`` before anything is attached.
    site: Site
    key: str = ""
    input_name: str = ""
    output_name: str = ""
    position: str = ""
    block: int = -1
    active: str | None = None
    disabled: bool = False
    routing: tuple[int, list[tuple[str, Tensor]]] | None = None
    pending: Tensor | None = None
    places: tuple[tuple[int | None, str | None], ...] = ()
    # Set while ``site_plan`` checks that a forward reaches this site's hooks: which ends
    # (``"input"``, ``"output"``) would have run an adapter; nothing is adapted meanwhile.
    reached: set[str] | None = None
    # The site's pre-norm (``Site.norm``), relative to the holder; "" when it has none there.
    norm_name: str = ""
    # Set by the norm's hook when it ran the input adapter (compiled training, see _norm_hook),
    # cleared by the site's hook, which then leaves its input alone.
    adapted_at_norm: bool = False

    def __init__(self, site: Site, holder_path: str) -> None:
        super().__init__()
        self.site = site
        # The site's modules are found through the holder by these relative paths rather than
        # held here: a reference would register them twice (or, hidden, go stale after copying).
        self.input_name = _relative(site.path, holder_path)
        self.output_name = _relative(site.output_path, holder_path) if site.output_path else ""
        self.key = self.input_name.replace(".", "-")
        self.position = site.position
        self.block = site.block
        self.active: str | None = None
        self.disabled = False
        # (batch size, [(adapter name, sample indices)]) while a mixed batch is being run.
        self.routing: tuple[int, list[tuple[str, Tensor]]] | None = None
        # A two-ended site's input, held from its first module's call to its last one's.
        self.pending: Tensor | None = None
        norm = site.norm
        inside = norm is not None and (not holder_path or norm.path.startswith(f"{holder_path}."))
        self.norm_name = _relative(norm.path, holder_path) if inside else ""
        self.adapted_at_norm = False

    # -- attaching -----------------------------------------------------------------------------

    def _hooked(self, holder: nn.Module) -> list[tuple[nn.Module, str]]:
        """``(module, "pre" | "post" | "norm")`` for every hook this slot installs."""
        hooks = [(holder.get_submodule(self.input_name), "pre")]
        if self.output_name:
            hooks.append((holder.get_submodule(self.output_name), "post"))
        if self.norm_name:
            hooks.append((holder.get_submodule(self.norm_name), "norm"))
        return hooks

    def attach(self, holder: nn.Module) -> None:
        """Register this slot on ``holder`` and install its hooks on the site's modules."""
        slots = holder._modules.get(SLOT_ATTR)
        if not isinstance(slots, BlockSlots):
            slots = BlockSlots().train(holder.training)
            setattr(holder, SLOT_ATTR, slots)
        slots[self.key] = self.train(holder.training)
        # Resolved once here, not per call: the hooks run on every forward.
        self.places = tuple(self._places(holder.get_submodule(self.input_name)))
        for module, kind in self._hooked(holder):
            if kind == "pre":
                module.register_forward_pre_hook(self._pre_hook, with_kwargs=True)
            elif kind == "post":
                module.register_forward_hook(self._post_hook, with_kwargs=True)
            else:
                module.register_forward_hook(self._norm_hook, with_kwargs=True)

    def detach(self, holder: nn.Module) -> None:
        """Remove this slot and its hooks, leaving the holder and site modules as they were."""
        for module, _ in self._hooked(holder):
            remove_hooks(module, lambda fn: getattr(fn, "__self__", None) is self)
        slots = holder._modules[SLOT_ATTR]
        del slots[self.key]
        if len(slots) == 0:
            delattr(holder, SLOT_ATTR)

    # -- running -------------------------------------------------------------------------------

    def _adapt(self, adapter: Adapter, x: Tensor) -> Tensor:
        """``adapter`` on the channel axis of ``x`` (last, or 1 for channels-first inputs)."""
        axis = self.site.axis
        if axis == -1 or axis == x.dim() - 1:
            return adapter(x)
        return adapter(x.movedim(axis, -1)).movedim(-1, axis)

    def _run(self, x: Tensor, want_input: bool, out: Any = None) -> Tensor | None:
        """Adapted ``x`` (input adapters) or the term to add to the output (output adapters).

        Returns ``None`` when nothing applies, so the hook leaves the call untouched.
        """
        if self.reached is not None:
            self.reached.add("input" if want_input else "output")
            return None
        if self.disabled:
            return None
        if self.routing is None:
            adapter = self._get(self.active, want_input)
            if adapter is None:
                return None
            if want_input:
                return self._adapt(adapter, x)
            return self._adapt(adapter, out if adapter.placement == "sequential" else x)
        batch, groups = self.routing
        dim = self.site.batch_axis  # 1 for sequence-first inputs (L, N, D)
        rows = x.shape[dim]
        if rows % batch:
            raise ValueError(
                f"mixed batch of {batch} task names, but the module at {self.site.path} "
                f"received {rows} samples on axis {dim}: it must be a multiple of the batch size"
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
                result = base.index_copy(dim, idx, self._adapt(adapter, x.index_select(dim, idx)))
            else:
                src = out if adapter.placement == "sequential" else x
                base = torch.zeros_like(out) if result is None else result
                term = self._adapt(adapter, src.index_select(dim, idx))
                result = base.index_copy(dim, idx, term)
        return result

    def _get(self, name: str | None, want_input: bool) -> Adapter | None:
        if name is None or name not in self:
            return None
        adapter = self[name]
        return adapter if (adapter.placement == "input") == want_input else None

    def _places(self, module: nn.Module) -> list[tuple[int | None, str | None]]:
        """``(position, keyword)`` of every place the input may be passed: the probe saw one
        of the two, the signature gives the other (``attn(x)`` and ``attn(x=x)`` both work)."""
        try:
            names = [
                p.name
                for p in inspect.signature(module.forward).parameters.values()
                if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
            ]
        except (TypeError, ValueError):
            names = []
        places = []
        for kind, where in self.site.arg_keys:
            if kind == "arg":
                places.append((where, names[where] if where < len(names) else None))
            else:
                places.append((names.index(where) if where in names else None, where))
        return places

    def _input(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> Tensor:
        values = []
        for index, keyword in self.places:
            if index is not None and index < len(args):
                values.append(args[index])
            else:
                values.append(kwargs.get(keyword) if keyword is not None else None)
        x = values[0]
        if not isinstance(x, Tensor):
            raise TypeError(
                f"{type(module).__name__} at {self.site.path} was called without its input "
                f"tensor where the probe found it ({self.site.arg_keys[0]})"
            )
        if any(v is not x for v in values[1:]):
            raise ValueError(
                f"arc_peft adapts self-attention only: {type(module).__name__} at "
                f"{self.site.path} was called with distinct query/key/value tensors"
            )
        return x

    def _norm_hook(
        self, module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any
    ) -> Any:
        """Under ``torch.compile`` with autograd recording, the active input adapter runs here,
        on the norm's output, given the norm's normalised input ``x̂`` too
        (``Adapter.after_norm``): its backward pass then reads the ``x̂`` the norm's backward
        keeps anyway, where at the site the partitioner would save a token-sized tensor more
        per site. ``Site.norm`` guarantees the norm's output is the site's input and nothing
        else's, so this is the same map in the same place. Eager training reaches the same
        saving through the norm's saved tensors (``methods/lean.py``) and leaves this alone."""
        # Cleared on every call first: a forward that stopped between the norm and the site (an
        # exception) must not leave the site skipping its adapter on the next call. (Read first:
        # a module's attribute write is the slower path, and this runs on every eager norm.)
        if self.adapted_at_norm:
            self.adapted_at_norm = False
        if not (torch.compiler.is_compiling() and torch.is_grad_enabled() and LEAN.enabled):
            return None
        if self.reached is not None or self.disabled or self.routing is not None:
            return None
        adapter = self._get(self.active, want_input=True)
        norm = self.site.norm
        if adapter is None or norm is None or not isinstance(output, Tensor):
            return None
        kind, where = norm.arg_key
        x = args[where] if kind == "arg" else kwargs[where]
        x_hat, scale = norm.normalized(x, self.site.width)
        weight = getattr(module, norm.weight) if norm.weight else None
        bias = getattr(module, norm.bias) if norm.bias else None
        # scale only for an RMS norm: a method written for LayerNorms alone keeps working there.
        extra = () if scale is None else (scale,)
        new = adapter.after_norm(x_hat, weight, bias, output, *extra)
        if new is None:
            return None
        self.adapted_at_norm = True
        return new

    def _pre_hook(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> Any:
        x = self._input(module, args, kwargs)
        if self.training and not torch.is_grad_enabled():
            self._check_reentrant(x)
        if self.output_name and self.output_name != self.input_name:
            self.pending = x  # the output adapter at the site's far end reads it
        if self.adapted_at_norm:
            self.adapted_at_norm = False
            # x is already the adapter's output (_norm_hook): set by the norm just called, in
            # the same compiled forward. A flag left by an aborted compiled forward is never
            # honoured by an eager one.
            if torch.compiler.is_compiling():
                return None
        new = self._run(x, want_input=True)
        if new is None:
            return None
        args, kwargs = list(args), dict(kwargs)
        for index, keyword in self.places:
            if index is not None and index < len(args):
                args[index] = new
            elif keyword is not None:
                kwargs[keyword] = new
        return tuple(args), kwargs

    def _check_reentrant(self, x: Tensor) -> None:
        """Warn when this adapter runs inside reentrant activation checkpointing whose input
        does not require grad: torch then never recomputes the region with autograd, and the
        adapters get no gradient. Only reached in train mode without grad, so plain training
        and evaluation pay nothing."""
        if not any(p.requires_grad for p in self.parameters()):
            return
        frame = sys._getframe(2)
        while frame is not None:
            code = frame.f_code
            # torch.utils.checkpoint's CheckpointFunction.forward runs the region under no_grad;
            # the non-reentrant variant keeps grad enabled, so it never gets here.
            if code.co_name == "forward" and code.co_filename.endswith(_CHECKPOINT_FILE):
                # The region's own inputs decide (the site's input is computed under no_grad
                # there, whatever they are): one that requires grad gets the region recomputed.
                inputs = frame.f_locals.get("args", ())
                if any(isinstance(a, Tensor) and a.requires_grad for a in inputs):
                    return
                warnings.warn(
                    f"arc_peft: the adapter at {self.site.path!r} runs inside reentrant "
                    "activation checkpointing (torch.utils.checkpoint with use_reentrant=True) "
                    "whose input does not require grad, so the adapters get no gradient. Fix: "
                    "use_reentrant=False, or make the checkpointed input require grad "
                    "(x.requires_grad_(True)), or switch on the model's own gradient "
                    "checkpointing (transformers gradient_checkpointing_enable, timm "
                    "set_grad_checkpointing), where arc_peft does that for you",
                    AdaptersNotTrainedWarning,
                    stacklevel=2,
                )
                return
            frame = frame.f_back

    def _post_hook(
        self, module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any
    ) -> Any:
        if not isinstance(output, Tensor):
            return None  # tuple-returning modules are attention sites: only input adapters there
        if self.output_name != self.input_name:
            x, self.pending = self.pending, None
            if x is None:
                return None
        else:
            x = self._input(module, args, kwargs)
        delta = self._run(x, want_input=False, out=output)
        return None if delta is None else output + delta


_CHECKPOINT_FILE = os.path.join("torch", "utils", "checkpoint.py")


def _relative(path: str, holder_path: str) -> str:
    return path[len(holder_path) + 1 :] if holder_path else path


def holder_of(model: nn.Module, path: str) -> tuple[str, nn.Module]:
    """The nearest module above ``path`` that can hold slot state: not an ``nn.Sequential``
    (it would run the slot as a layer) nor a ``ModuleList`` / ``ModuleDict`` (the model iterates
    them)."""
    parts = path.split(".")
    for cut in range(len(parts) - 1, -1, -1):
        holder_path = ".".join(parts[:cut])
        holder = model.get_submodule(holder_path)
        if not isinstance(holder, (nn.Sequential, nn.ModuleList, nn.ModuleDict)):
            return holder_path, holder
    raise UnsupportedModelError(
        f"cannot attach adapter state for {path}: every module above it is an nn.Sequential, "
        "ModuleList or ModuleDict; wrap the model in an nn.Module first"
    )


def remove_hooks(module: nn.Module, match: Any) -> None:
    """Remove the forward (pre-)hooks of ``module`` for which ``match(hook)`` is true.

    Hooks are found by identity, not by stored handles: a deep-copied model holds copies of the
    handles that would point at the original model's hook dictionaries."""
    for hooks_attr, extra_attrs in (
        ("_forward_pre_hooks", ("_forward_pre_hooks_with_kwargs",)),
        ("_forward_hooks", ("_forward_hooks_with_kwargs", "_forward_hooks_always_called")),
    ):
        hooks = getattr(module, hooks_attr)
        for key in [k for k, fn in hooks.items() if match(fn)]:
            del hooks[key]
            for extra in extra_attrs:
                getattr(module, extra, {}).pop(key, None)


def iter_slots(model: nn.Module) -> list[tuple[str, nn.Module, AdapterSlot]]:
    """Every ``(slot path, block, slot)`` of ``model`` in module order; the slot path is the
    prefix of its adapters' parameter names (``blocks.0.arc_peft.attn``)."""
    found = []
    for path, block in model.named_modules():
        slots = block._modules.get(SLOT_ATTR)
        if isinstance(slots, BlockSlots):
            prefix = f"{path}.{SLOT_ATTR}" if path else SLOT_ATTR
            for key, slot in slots.items():
                found.append((f"{prefix}.{key}", block, slot))
    return found


def adapter_configs(model: nn.Module) -> dict[str, AdapterConfig]:
    """The adapters injected into ``model``, as ``{name: config}`` in injection order."""
    configs: dict[str, AdapterConfig] = {}
    for _, _, slot in iter_slots(model):
        for name, adapter in slot.items():
            configs.setdefault(name, adapter.config)
    return configs


def check_name(name: str) -> None:
    """Adapter names become ``ModuleDict`` keys of every slot (and parts of parameter names), so a
    name must not collide with anything an ``AdapterSlot`` instance has: class attributes,
    methods, and the attributes ``nn.Module.__init__`` sets (``training``, ``_parameters``...)."""
    valid = (
        isinstance(name, str)
        and name.replace("-", "_").isidentifier()
        and not name.startswith(("_", "-"))
    )
    if not valid or name in _reserved_names():
        raise ValueError(
            f"adapter name {name!r} is invalid: expected letters, digits, '_' and '-', not "
            "starting with '_', '-' or a digit, and not an attribute of a module (e.g. "
            "'default', 'cifar100', 'cifar-100'; not 'training', 'forward', 'active')"
        )


def _reserved_names() -> set[str]:
    return set(dir(AdapterSlot)) | set(AdapterSlot.__annotations__) | set(vars(nn.Module()))
