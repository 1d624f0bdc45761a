"""Folding an ARC adapter into the layers that read its site's input, for any architecture, and
checking in float64 that the fold is exact before anything is committed.

The generic fold needs no knowledge of the module: the probe recording says which ops read the
site's input. If every reader (through ops that only move tokens) is a linear layer or a
convolution, ARC's affine map ``x -> x·M + b`` on the channel axis folds into each of them:
``W' = W ×_in Mᵀ`` and ``c' = c + W·b`` (summed over the kernel for a convolution). A reader
without a bias drops its offset ``W·b``; whether that is harmless (keys under softmax) or not is
decided by the numerical check, not assumed. Anything else reading the input (a norm, padding, a
pooling) makes the merge impossible, and the refusal names it.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_map

from ..errors import MergeError
from .graph import SHAPE_OPS, Finder
from .probe import Recording

__all__ = ["check_fold", "generic_fold"]

# Relative tolerance of the float64 check: a fold that is exact in exact arithmetic differs by
# ~1e-15 here, a fold that drops something that matters by far more than this.
RTOL = 1e-9


def _site_call(rec: Recording, module: nn.Module):
    for call in rec.calls:
        if call.module is module:
            return call
    raise MergeError("the probe forward did not call this module, so its fold cannot be checked")


def generic_fold(rec: Recording, module: nn.Module, M: Tensor, b: Tensor) -> dict[str, Tensor]:
    """New values (``{name relative to module: tensor}``, float64) of the layers that read
    ``module``'s input, with the adapter ``x -> x·M + b`` folded in. Changes nothing."""
    call = _site_call(rec, module)
    finder = Finder(rec)
    names = {id(t): n for n, t in module.named_parameters()}
    out: dict[str, Tensor] = {}
    readers = [i for i in finder.readers(call.main_input, call.end) if i >= call.start]
    if not readers:
        raise MergeError("no layer inside the module reads its input")
    for index in readers:
        op = rec.ops[index]
        if op.name not in ("linear", "conv1d", "conv2d", "conv3d") or not op.params:
            what = f"a {op.name} op" if op.name not in SHAPE_OPS else op.name
            raise MergeError(
                f"{what} reads the adapted input before any linear layer, so the adapter cannot "
                "be folded into a layer's weights"
            )
        weight = op.params[0][1]
        weight_name = names.get(id(weight))
        if weight_name is None:
            raise MergeError(f"{op.name} reads the input with a weight the module does not own")
        groups = op.args[6] if len(op.args) > 6 else op.kwargs.get("groups", 1)
        if op.name != "linear" and groups != 1:
            raise MergeError(f"{weight_name} is a grouped convolution (groups={groups})")
        if weight_name in out:
            continue
        w64 = weight.detach().to(device=M.device, dtype=torch.float64)
        flat = w64.reshape(w64.shape[0], w64.shape[1], -1)
        if flat.shape[1] != M.shape[0]:
            raise MergeError(f"{weight_name} reads {flat.shape[1]} channels, expected {M.shape[0]}")
        out[weight_name] = torch.einsum("oit,ji->ojt", flat, M).reshape(w64.shape)
        offset = torch.einsum("oit,i->o", flat, b)
        bias = op.params[1][1] if len(op.params) > 1 else None
        bias_name = names.get(id(bias)) if bias is not None else None
        if bias is not None and bias_name is None:
            raise MergeError(f"the bias of {weight_name} is computed, not a parameter")
        if bias_name is not None:
            out[bias_name] = bias.detach().to(M.device, torch.float64) + offset
        # No bias: the offset is dropped; check_fold decides whether that changes the output.
    return out


def _apply_affine(x: Tensor, M: Tensor, b: Tensor, axis: int) -> Tensor:
    moved = x.movedim(axis, -1)
    return (moved @ M + b).movedim(-1, axis)


def check_fold(
    rec: Recording,
    module: nn.Module,
    M: Tensor,
    b: Tensor,
    new_values: dict[str, Tensor],
    axis: int,
    places: tuple[tuple[int | None, str | None], ...],
) -> None:
    """Raise ``MergeError`` unless ``module`` with ``new_values`` computes in float64 what
    ``module`` computes on the adapted input, on the input the probe gave it."""
    call = _site_call(rec, module)
    if call.captured is None:
        raise MergeError("the probe forward did not keep this module's arguments")
    args, kwargs = call.captured

    def to64(value: Any) -> Any:
        if isinstance(value, Tensor) and value.is_floating_point():
            return value.detach().to(device=M.device, dtype=torch.float64)
        return value

    args64, kwargs64 = tree_map(to64, args), tree_map(to64, kwargs)
    replica = copy.deepcopy(module)
    # not chained: some modules' train() returns None (timm LeViT's attention)
    replica.to(device=M.device, dtype=torch.float64)
    replica.eval()
    for sub in replica.modules():  # the adapters' own hooks must not run in the check
        sub._forward_pre_hooks.clear()
        sub._forward_hooks.clear()

    def with_input(transform) -> tuple[list, dict]:
        a, k = list(args64), dict(kwargs64)
        x = None
        for index, keyword in places:
            if index is not None and index < len(a):
                x = a[index] if x is None else x
            elif keyword in k:
                x = k[keyword] if x is None else x
        new = transform(x)
        for index, keyword in places:
            if index is not None and index < len(a):
                a[index] = new
            elif keyword in k:
                k[keyword] = new
        return a, k

    with torch.no_grad():
        a, k = with_input(lambda x: _apply_affine(x, M, b, axis))
        expected = replica(*a, **k)
        for name, value in new_values.items():
            target = (
                replica.get_parameter(name)
                if _is_param(replica, name)
                else (replica.get_buffer(name))
            )
            target.copy_(value.to(target.device, target.dtype))
        a, k = with_input(lambda x: x)
        merged = replica(*a, **k)
    pairs = [
        (e, m)
        for e, m in zip(_tensors(expected), _tensors(merged), strict=False)
        if e.is_floating_point()
    ]
    for e, m in pairs:
        error = (e - m).abs().max().item() if e.numel() else 0.0
        scale = 1.0 + (e.abs().max().item() if e.numel() else 0.0)
        if error > RTOL * scale:
            raise MergeError(
                f"the folded weights do not reproduce the adapted output (max difference "
                f"{error:.3g} in float64): a layer that reads the input lacks the bias the "
                "adapter's offset W·b needs, or the module transforms the input in a way the "
                "fold cannot follow. An exact merge needs the adapter bias b (or W·b) to be 0 there"
            )


def _is_param(module: nn.Module, name: str) -> bool:
    try:
        module.get_parameter(name)
        return True
    except AttributeError:
        return False


def _tensors(value: Any) -> list[Tensor]:
    from torch.utils._pytree import tree_flatten

    return [t for t in tree_flatten(value)[0] if isinstance(t, Tensor)]
