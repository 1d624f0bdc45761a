"""Ops per adapted site: the aten ops one training forward + backward dispatches, counted.

On a GPU an eager step of a small adapter is bound by kernel launches, and every aten op that
computes something is (at least) one kernel. So the count of those ops — deterministic, the same
on every machine and run — tells what a GPU profile would: the ops a method adds to the floor
(the frozen backbone, gradients to the image), divided by its adapted sites. On an H200 this
CPU count and the CUDA kernel count of one step agreed to within one op per site (issue 17).

What is counted: every aten op a ``TorchDispatchMode`` sees during the forward pass, the loss and
``loss.backward()`` (the optimizer is left out), except the ones that launch no kernel — views
and aliases (their schema returns an alias that is not written: ``view``, ``t``, ``detach``…)
and bare allocations (``empty_like``…), which :func:`kernel_op` leaves out.
"""

from __future__ import annotations

import collections
import contextlib
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from arc_peft.methods.lean import lean_disabled

# Allocations and metadata: no kernel runs (an allocator call at most).
_NO_KERNEL = {
    "empty",
    "empty_like",
    "empty_strided",
    "new_empty",
    "new_empty_strided",
    "promote_types",
    "result_type",
    "is_same_size",
    "_has_compatible_shallow_copy_type",
    "lift_fresh",
    "_unsafe_view",  # a view whose schema does not say so (reshape of a temporary)
}


def kernel_op(func: Any) -> bool:
    """Whether the aten op ``func`` computes something (launches a kernel on a GPU)."""
    if func.overloadpacket.__name__ in _NO_KERNEL:
        return False
    # A view or alias returns a tensor aliasing an input without writing it; an in-place op
    # returns its (written) input, and computes.
    for ret in func._schema.returns:
        info = ret.alias_info
        if info is not None and not info.is_write:
            return False
    return True


class _Counter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if kernel_op(func):
            self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def count_step(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    dtype: str = "fp32",
    grads_to_input: bool = False,
    lean: bool = True,
) -> collections.Counter[str]:
    """The kernel ops (by name) of one training forward + backward of ``model`` (optimizer
    excluded), after one uncounted step (lazy initialisation, autocast's first casts)."""
    model.train()
    switch: Callable[[], Any] = contextlib.nullcontext if lean else lean_disabled
    counter = _Counter()
    for counted in (False, True):
        model.zero_grad(set_to_none=True)
        inp = x.detach().requires_grad_(True) if grads_to_input else x
        with switch(), counter if counted else contextlib.nullcontext():
            with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=dtype == "bf16"):
                out = model(inp)
            F.cross_entropy(out.float(), y).backward()
    model.zero_grad(set_to_none=True)
    return counter.ops


def adapted_sites(model: nn.Module) -> int | None:
    """How many sites a method adapts: arc_peft's adapter layers (not the shared ``U``), peft's
    tuner layers; ``None`` for models without either."""
    from arc_peft.methods.layers import Adapter, SharedState

    ours = [m for m in model.modules() if isinstance(m, Adapter) and not isinstance(m, SharedState)]
    if ours:
        return len(ours)
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:
        return None
    theirs = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    return len(theirs) or None


def per_site(
    ops: collections.Counter[str], floor: collections.Counter[str], sites: int
) -> dict[str, float]:
    """``(ops - floor) / sites`` by op name, zeros left out, largest first."""
    diff = {n: (ops[n] - floor[n]) / sites for n in set(ops) | set(floor) if ops[n] != floor[n]}
    return dict(sorted(diff.items(), key=lambda kv: (-kv[1], kv[0])))


def cuda_kernels(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    dtype: str = "fp32",
    grads_to_input: bool = False,
    lean: bool = True,
) -> int:
    """The CUDA kernels ``torch.profiler`` records in one training forward + backward (after one
    unprofiled step; optimizer excluded): what :func:`count_step` stands for on a GPU."""
    from torch.profiler import ProfilerActivity, profile

    model.train()
    switch: Callable[[], Any] = contextlib.nullcontext if lean else lean_disabled

    def step() -> None:
        model.zero_grad(set_to_none=True)
        inp = x.detach().requires_grad_(True) if grads_to_input else x
        with switch(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == "bf16"):
            out = model(inp)
        F.cross_entropy(out.float(), y).backward()

    step()
    torch.cuda.synchronize()
    # CPU activity too: the kernels are then listed with the ops that launched them.
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    model.zero_grad(set_to_none=True)
    # Kernel launches, not memcpy/memset records.
    return sum(
        1
        for e in prof.events()
        if e.device_type == torch.autograd.DeviceType.CUDA
        and not e.name.startswith(("Memcpy", "Memset"))
    )
