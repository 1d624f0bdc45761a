"""ARC's memory-lean training path: keep for the backward pass only what the backbone keeps anyway.

Plain autograd through ``x + dropout(x·U·diag(s))·Uᵀ + b`` saves the adapter's input ``x`` (an
``N×D`` token tensor) for the gradient of ``U``, plus the ``N×r`` bottleneck and the dropout
noise. The frozen backbone saves none of these: a frozen linear keeps no input. In a pre-norm
block ``x`` is a norm's output, and the norm has already saved what it needs to recompute it (its
input and statistics). So :class:`_LeanARC` saves the dropout mask only (``N×r`` booleans) and, in
the backward pass, recomputes ``x`` from what the norm saved and ``x·U`` from ``x``. Where no such
norm produced the input, it saves ``x`` and the mask: still what the gradient of ``U, s, b``
needs, and less than plain autograd.

How the norm is found: by the autograd node that produced ``x``, not by module — a table of the
ops whose saved tensors determine their output (:data:`_NORMS`), through any chain of
permutations and transposes (channels-first sites, ``LayerNorm2d``). ``x``'s node is only looked
at in the forward pass; its saved tensors are read in the backward pass, before the norm's own
backward frees them (the norm's node runs after every consumer of its output). Any other producer
(an RMS norm written in elementwise ops, windows partitioned after the norm, a routed sub-batch of
a mixed-task batch, a cast) takes the saving path, and so does everything under saved-tensor
hooks (activation checkpointing, which recomputes the whole region anyway).

The forward pass runs the same torch ops as :meth:`arc_peft.ARC.forward`, in the same order and
under the same autocast state, so its outputs are identical to the plain path's; gradients agree
to float rounding. Under ``torch.compile`` and without autograd the plain path runs (the compiler
chooses what to save itself).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor

__all__ = ["LEAN", "arc_forward", "lean_disabled", "recompute_source"]


class _Switch:
    """Whether :class:`~arc_peft.ARC` trains through the lean path (on by default)."""

    enabled: bool = True


LEAN = _Switch()


@contextlib.contextmanager
def lean_disabled() -> Iterator[None]:
    """Train through plain autograd inside this block (to compare the two paths)."""
    before, LEAN.enabled = LEAN.enabled, False
    try:
        yield
    finally:
        LEAN.enabled = before


def _layer_norm(node: Any) -> Tensor:
    # native_layer_norm saves (input, mean, rstd, weight, bias); mean/rstd keep the normalised
    # dims as size 1, so they broadcast against the input.
    x, mean, rstd = node._saved_input, node._saved_result1, node._saved_result2
    y = (x.to(mean.dtype) - mean) * rstd
    if node._saved_weight is not None:
        y = y * node._saved_weight
    if node._saved_bias is not None:
        y = y + node._saved_bias
    return y


# The autograd nodes of normalisations whose saved tensors determine their output, by the op's
# name (derivatives.yaml), with how to recompute it. The norm's own backward needs these saved
# tensors anyway, so keeping them costs nothing. (GroupNorm is not one: it does not save its
# bias, which its backward does not need.)
_NORMS: dict[str, Callable[[Any], Tensor]] = {
    "NativeLayerNormBackward0": _layer_norm,
}
# Pure layout changes between the norm and the adapter, replayed on the recomputed tensor.
_VIEWS: dict[str, Callable[[Any, Tensor], Tensor]] = {
    "PermuteBackward0": lambda node, y: y.permute(node._saved_dims),
    "TransposeBackward0": lambda node, y: y.transpose(node._saved_dim0, node._saved_dim1),
}


def _has_saved(node: Any, names: tuple[str, ...]) -> bool:
    # Looked up on the class: reading the attribute on the node would unpack the saved tensor,
    # which under activation checkpointing means recomputing the checkpointed region.
    return all(hasattr(type(node), f"_saved_{n}") for n in names)


_NEEDS = {
    "NativeLayerNormBackward0": ("input", "result1", "result2", "weight", "bias"),
    "PermuteBackward0": ("dims",),
    "TransposeBackward0": ("dim0", "dim1"),
}


def recompute_source(x: Tensor) -> tuple[Any, ...] | None:
    """The chain of autograd nodes (norm first, then layout changes) that recomputes ``x`` from
    tensors its producer saved anyway, or ``None`` when ``x`` was not produced that way."""
    node, chain = x.grad_fn, []
    while node is not None:
        name = type(node).__name__
        if not _has_saved(node, _NEEDS.get(name, ("?",))):
            return None
        chain.append(node)
        if name in _NORMS:
            return tuple(reversed(chain))
        if name not in _VIEWS:
            return None
        edges = node.next_functions
        if not edges or edges[0][1] != 0:
            return None
        node = edges[0][0]
    return None


def _saved_tensor_hooks_active() -> bool:
    """Whether saved tensors are being packed (activation checkpointing, CPU offloading): then
    reading the norm's saved input would unpack it a second time, which checkpointing forbids, so
    the input is saved instead (inside a checkpointed region nothing is kept anyway)."""
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    return top is None or top(False) is not None


def _recompute(chain: tuple[Any, ...]) -> Tensor:
    y = _NORMS[type(chain[0]).__name__](chain[0])
    for node in chain[1:]:
        y = _VIEWS[type(node).__name__](node, y)
    return y


class _LeanARC(torch.autograd.Function):
    """``x + dropout(x·U·diag(s))·Uᵀ + b`` saving the dropout mask and, without a recompute
    source, ``x``; everything else is recomputed in the backward pass."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: Tensor,
        u: Tensor,
        s: Tensor,
        bias: Tensor,
        p: float,
        source: tuple[Any, ...] | None,
    ) -> Tensor:
        flat = x.reshape(-1, x.shape[-1])
        # The same ops as ARC.forward (see there for why), so the outputs are identical.
        a = flat @ (u * s)
        mask = None
        if p > 0:
            h, mask = torch.native_dropout(a, p, True)  # what nn.Dropout runs, with its mask
        else:
            h = a
        out = torch.addmm(flat, h, u.t()) if h.dtype == flat.dtype else flat + h @ u.t()
        out.add_(bias)
        ctx.source, ctx.p, ctx.shape = source, p, x.shape
        ctx.x_dtype, ctx.compute_dtype, ctx.bias_dtype = x.dtype, a.dtype, bias.dtype
        ctx.save_for_backward(u, s, mask, flat if source is None else None)
        return out.view(x.shape)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        u, s, mask, flat = ctx.saved_tensors
        if flat is None:
            flat = _recompute(ctx.source).to(ctx.x_dtype).reshape(-1, u.shape[0])
        cd = ctx.compute_dtype
        g = grad.reshape(-1, u.shape[0])
        gc, uc, usc, fc = g.to(cd), u.to(cd), (u * s).to(cd), flat.to(cd)
        a = fc @ usc
        scale = 1.0 / (1.0 - ctx.p) if mask is not None else 1.0
        h = a if mask is None else a * mask * scale
        dh = gc @ uc  # N×r
        da = dh if mask is None else dh * mask * scale
        grad_x = grad_u = grad_s = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = (g + (da @ usc.t()).to(g.dtype)).view(ctx.shape)
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            d_us = (fc.t() @ da).to(u.dtype)  # gradient of U·diag(s)
            if ctx.needs_input_grad[1]:
                grad_u = d_us * s + (gc.t() @ h).to(u.dtype)
            if ctx.needs_input_grad[2]:
                grad_s = (d_us * u).sum(0)
        if ctx.needs_input_grad[3]:
            grad_b = g.sum(0).to(ctx.bias_dtype)
        return grad_x, grad_u, grad_s, grad_b, None, None


def arc_forward(x: Tensor, u: Tensor, s: Tensor, bias: Tensor, p: float) -> Tensor | None:
    """The lean training forward of ARC, or ``None`` where the plain path should run (no
    autograd, compiling, switched off)."""
    if not LEAN.enabled or not torch.is_grad_enabled() or torch.compiler.is_compiling():
        return None
    if not (x.requires_grad or u.requires_grad or s.requires_grad or bias.requires_grad):
        return None
    source = None
    if x.requires_grad and not _saved_tensor_hooks_active():
        source = recompute_source(x)
    return _LeanARC.apply(x, u, s, bias, p, source)
