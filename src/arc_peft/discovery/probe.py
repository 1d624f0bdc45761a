"""One recorded forward pass: which modules ran, which tensor operations each issued, and how the
tensors flowed between them.

Site discovery (``discovery/sites.py``) and the generic merge (``discovery/fold.py``) ask
questions of this record ("which tensor do q, k and v all come from?", "which linear layers read
this input?") instead of knowing module classes. The record is built by a
``TorchFunctionMode``, which sees every torch function and tensor method
call, plus forward pre/post hooks on every module for the call tree; both are removed afterwards.

Tensors are numbered in creation order (``tid``); a tensor seen for the first time as an input
(the model input, a constant) is a leaf. Parameters and buffers are *state*, not activations: an
op that reads one is a *parameterised* op.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

__all__ = ["Call", "Op", "Recording", "record", "run"]


def _name(func: Any) -> str:
    name = getattr(func, "__name__", None) or str(func)
    return name.strip("_") if name.startswith("__") and name != "__get__" else name


@dataclass
class Op:
    """One torch function call that produced tensors."""

    index: int
    name: str
    call: int  # index of the innermost module call it ran in (0: the model itself)
    inputs: list[int]  # tids of activation inputs, in argument order
    outputs: list[int]
    params: list[tuple[str, Tensor]]  # (qualified name, tensor) of state read: weights, buffers
    args: tuple = ()  # kept only for the ops discovery inspects (see _KEEP_ARGS)
    kwargs: dict = field(default_factory=dict)


@dataclass
class Call:
    """One module call."""

    index: int
    path: str
    module: nn.Module
    parent: int | None
    depth: int
    inputs: list[tuple[Any, int]]  # (("arg", i) or ("kw", name), tid) of tensor arguments
    start: int  # first op index inside the call
    end: int = -1  # one past the last op index inside the call
    outputs: list[int] = field(default_factory=list)
    captured: tuple[tuple, dict] | None = None  # the call's arguments, when asked to keep them

    @property
    def main_input(self) -> int | None:
        return self.inputs[0][1] if self.inputs else None


# Ops whose arguments discovery needs later (the reader's weight layout, the attention operands).
_KEEP_ARGS = {
    "linear", "conv1d", "conv2d", "conv3d", "multi_head_attention_forward", "softmax", "sum",
    "layer_norm", "rms_norm",
}  # fmt: skip
# Ops whose non-tensor arguments discovery reads (an RMS norm written out: ``discovery/norms``).
_KEEP_SCALARS = {"pow", "mean", "add"}


class Recording:
    """What one forward pass did. Build it with ``record``."""

    def __init__(self, model: nn.Module, keep: Iterable[nn.Module] = ()) -> None:
        self.model = model
        self.paths = {id(m): p for p, m in model.named_modules(remove_duplicate=False)}
        self.state = {}
        for name, tensor in model.named_parameters(remove_duplicate=False):
            self.state.setdefault(id(tensor), (name, tensor))
        for name, tensor in model.named_buffers(remove_duplicate=False):
            self.state.setdefault(id(tensor), (name, tensor))
        self.keep = {id(m) for m in keep}
        self.ops: list[Op] = []
        self.calls: list[Call] = []
        self.producer: dict[int, int] = {}  # tid -> index of the op that made it
        self.shapes: dict[int, tuple[int, ...]] = {}
        self.consumers: dict[int, list[int]] = {}  # tid -> indices of ops reading it
        self._tids = WeakIdKeyDictionary()
        self.from_input: set[int] = set()  # tids computed from the model's input
        self._stack: list[int] = []

    # -- building --------------------------------------------------------------------------

    def tid(self, tensor: Tensor) -> int:
        found = self._tids.get(tensor)
        if found is None:
            found = len(self.shapes)
            self._tids[tensor] = found
            self.shapes[found] = tuple(tensor.shape)
        return found

    def _state_name(self, tensor: Tensor) -> str | None:
        entry = self.state.get(id(tensor))
        return entry[0] if entry is not None and entry[1] is tensor else None

    def on_op(self, func: Any, args: tuple, kwargs: dict, out: Any) -> None:
        outs = [t for t in tree_flatten(out)[0] if isinstance(t, Tensor)]
        if not outs:
            return  # a metadata query (shape, dim, ...) or an in-place op returning None
        flat = tree_flatten((args, kwargs))[0]
        inputs: list[int] = []
        params: list[tuple[str, Tensor]] = []
        for value in flat:
            if not isinstance(value, Tensor):
                continue
            state = self._state_name(value)
            if state is not None:
                params.append((state, value))
            else:
                inputs.append(self.tid(value))
        index = len(self.ops)
        name = _name(func)
        outputs = []
        for tensor in outs:
            known = self._tids.get(tensor)
            if known is not None and known in inputs:  # in place: same tensor, same tid
                outputs.append(known)
                continue
            tid = self.tid(tensor)
            self.producer[tid] = index
            outputs.append(tid)
        if any(tid in self.from_input for tid in inputs):
            self.from_input.update(outputs)
        keep = name in _KEEP_ARGS
        if not keep and name in _KEEP_SCALARS:
            # Only the plain values (exponents, dims, an eps): never a tensor kept alive.
            args = tuple(None if isinstance(a, Tensor) else a for a in args)
            kwargs = {k: v for k, v in kwargs.items() if not isinstance(v, Tensor)}
            keep = True
        self.ops.append(
            Op(
                index,
                name,
                self._stack[-1] if self._stack else 0,
                inputs,
                outputs,
                params,
                args if keep else (),
                kwargs if keep else {},
            )
        )
        for tid in inputs:
            self.consumers.setdefault(tid, []).append(index)

    def pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        inputs = []
        for i, value in enumerate(args):
            if isinstance(value, Tensor) and self._state_name(value) is None:
                inputs.append((("arg", i), self.tid(value)))
        for key, value in kwargs.items():
            if isinstance(value, Tensor) and self._state_name(value) is None:
                inputs.append((("kw", key), self.tid(value)))
        if not self._stack:  # the model's own call: its tensor inputs are the roots
            self.from_input.update(tid for _, tid in inputs)
        index = len(self.calls)
        parent = self._stack[-1] if self._stack else None
        depth = self.calls[parent].depth + 1 if parent is not None else 0
        call = Call(
            index, self.paths.get(id(module), "?"), module, parent, depth, inputs, len(self.ops)
        )
        if id(module) in self.keep:
            call.captured = (args, dict(kwargs))
        self.calls.append(call)
        self._stack.append(index)

    def post_hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        index = self._stack.pop()
        call = self.calls[index]
        call.end = len(self.ops)
        call.outputs = [self.tid(t) for t in tree_flatten(output)[0] if isinstance(t, Tensor)]

    # -- questions -------------------------------------------------------------------------

    def contains(self, outer: int, inner: int) -> bool:
        """Whether call ``inner`` runs inside call ``outer`` (or is it)."""
        while inner is not None:
            if inner == outer:
                return True
            inner = self.calls[inner].parent
        return False

    def lca(self, a: int, b: int) -> int:
        """The innermost call containing both calls ``a`` and ``b``."""
        ancestors = set()
        while a is not None:
            ancestors.add(a)
            a = self.calls[a].parent
        while b not in ancestors:
            b = self.calls[b].parent
        return b

    def enclosing(self, call: int) -> list[int]:
        """``call`` and every call around it, innermost first."""
        chain = []
        while call is not None:
            chain.append(call)
            call = self.calls[call].parent
        return chain

    def ancestors(self, tid: int, floor: int = -1) -> set[int]:
        """Every tensor ``tid`` was computed from (itself included), ignoring tids <= ``floor``."""
        seen, todo = {tid}, [tid]
        while todo:
            op = self.producer.get(todo.pop())
            if op is None:
                continue
            for parent in self.ops[op].inputs:
                if parent > floor and parent not in seen:
                    seen.add(parent)
                    todo.append(parent)
        return seen

    def descendants(
        self, tid: int, stop: int | None = None, learned: Callable[[Op], bool] | None = None
    ) -> dict[int, bool]:
        """Tensors computed from ``tid`` by ops before index ``stop``; the value says whether the
        path went through a parameterised op (one for which ``learned(op)`` holds, when given: a
        norm's affine or a learned bias is parameterised too, but does not mix channels)."""
        through: dict[int, bool] = {tid: False}
        todo = [tid]
        while todo:
            current = todo.pop()
            for index in self.consumers.get(current, ()):
                if stop is not None and index >= stop:
                    continue
                op = self.ops[index]
                flag = through[current] or (bool(op.params) and (learned is None or learned(op)))
                for out in op.outputs:
                    if out not in through or (flag and not through[out]):
                        through[out] = flag
                        todo.append(out)
        return through


class _Mode(TorchFunctionMode):
    def __init__(self, recording: Recording) -> None:
        super().__init__()
        self.recording = recording

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self.recording.on_op(func, args, kwargs, out)
        return out


def record(model: nn.Module, example: Any, keep: Iterable[nn.Module] = ()) -> Recording:
    """Run ``model`` once on ``example`` (see ``run``) and return the ``Recording``.

    Calls of the modules in ``keep`` also keep their arguments (for the merge check). Every hook
    is removed even on failure.
    """
    recording = Recording(model, keep)
    handles = []
    try:
        for module in model.modules():
            handles.append(module.register_forward_pre_hook(recording.pre_hook, with_kwargs=True))
            handles.append(module.register_forward_hook(recording.post_hook, with_kwargs=True))
        run(model, example, _Mode(recording))
    finally:
        for handle in handles:
            handle.remove()
    return recording


def run(model: nn.Module, example: Any, within: Any = None) -> Any:
    """``model``'s output on ``example`` (a tensor, a tuple of arguments or a dict of keyword
    arguments), run in eval mode without gradients (inside the context manager ``within``, when
    given); the train/eval mode of every module is restored afterwards, even on failure."""
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        args, kwargs = _as_call(example)
        with torch.no_grad(), within if within is not None else contextlib.nullcontext():
            return model(*args, **kwargs)
    finally:
        for module, mode in modes.items():
            module.training = mode


def _as_call(example: Any) -> tuple[tuple, dict]:
    if isinstance(example, dict):
        return (), dict(example)
    if isinstance(example, (tuple, list)):
        return tuple(example), {}
    return (example,), {}
