"""AdaptMLP — AdaptFormer (Chen et al., NeurIPS 2022): its layer, its lean training path, and
how injection builds it.

``s · up(dropout(ReLU(down(x))))`` beside each MLP, added to the MLP's output (``"parallel"``:
computed from the MLP's input; ``"sequential"``: from its output). Not linear, so not mergeable.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..layers import Adapter
from ..lean import (
    autocast_dtype,
    dropout_with_mask,
    first_order_only,
    input_grad_product,
    lean_applies,
    norm_source,
)
from ..registry import SiteLike
from .config import AdaptMLPConfig

__all__ = ["AdaptMLP", "adaptmlp_forward", "build_adaptmlp"]


class AdaptMLP(Adapter):
    """AdaptMLP bottleneck: ``s · up(dropout(ReLU(down(x))))``, optionally with a LayerNorm.

    Initialised as in the official code ("lora" init): ``down.weight`` kaiming-uniform(a=√5),
    ``down.bias``, ``up.weight`` and ``up.bias`` zero, so the adapter's output starts at zero.

    Args:
        dim: Token width ``D``.
        bottleneck: Hidden size ``r``.
        scale: The factor ``s``, or ``"learnable"`` for a trainable scalar initialised to 1.
        dropout: Dropout probability on the bottleneck.
        placement: ``"parallel"`` — output = ``mlp(x) + AdaptMLP(x)``; ``"sequential"`` —
            output = ``mlp(x) + AdaptMLP(mlp(x))``. Used by the injection hook, not by
            ``forward``, which returns the scaled adapter branch alone.
        layernorm: ``None``, ``"in"`` (LayerNorm on the adapter's input) or ``"out"``
            (LayerNorm on the scaled output, ``LN(s · up(...))``, as the official code). A
            LayerNorm undoes any positive scale of its input, so with ``"out"`` ``s`` has no
            effect beyond its sign (and the norm's ``eps``): the norm's affine weight sets the
            branch's size.
    """

    # Parallel or sequential (set per layer): adds to the MLP's output; a ReLU, so no affine().
    merge_refusal = "AdaptMLP has a ReLU: it is not a linear map of the site's input"

    def __init__(
        self,
        dim: int,
        bottleneck: int = 64,
        scale: float | str = 0.1,
        dropout: float = 0.1,
        placement: str = "parallel",
        layernorm: str | None = None,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if placement not in ("parallel", "sequential"):
            raise ValueError(
                f"AdaptMLP placement={placement!r} is invalid: expected 'parallel' or 'sequential'"
            )
        if layernorm not in (None, "in", "out"):
            raise ValueError(
                f"AdaptMLP layernorm={layernorm!r} is invalid: expected None, 'in' or 'out'"
            )
        factory = {"device": device, "dtype": dtype}
        self.dim, self.bottleneck, self.placement = dim, bottleneck, placement
        self.norm = nn.LayerNorm(dim, **factory) if layernorm is not None else None
        self.layernorm = layernorm
        self.down = nn.Linear(dim, bottleneck, **factory)
        self.up = nn.Linear(bottleneck, dim, **factory)
        self.dropout = nn.Dropout(dropout)
        self.learnable_scale = scale == "learnable"
        # A fixed s stays a Python float: no state to store, and it follows x's dtype under AMP.
        self.scale: Tensor | float = (
            nn.Parameter(torch.ones(1, **factory)) if self.learnable_scale else float(scale)
        )
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: Tensor) -> Tensor:
        if self.norm is None and not self.learnable_scale:
            if not torch.is_grad_enabled():
                # Inference: ReLU and the scale in place, the same values, two temporaries fewer.
                return self.up(self.dropout(F.relu(self.down(x), inplace=True))).mul_(self.scale)
            # Training: the same ops, keeping less for the backward pass (_LeanAdaptMLP).
            p = self.dropout.p if self.dropout.training else 0.0
            out = adaptmlp_forward(x, self.down, self.up, self.scale, p)
            if out is not None:
                return out
        if self.layernorm == "in":
            x = self.norm(x)
        h = self.up(self.dropout(F.relu(self.down(x)))) * self.scale
        if self.layernorm == "out":  # after the scale, as the official code: LN(s · up(...))
            h = self.norm(h)
        return h

    def extra_repr(self) -> str:
        scale = "learnable" if self.learnable_scale else f"{float(self.scale):g}"
        return (
            f"dim={self.dim}, bottleneck={self.bottleneck}, scale={scale}, "
            f"placement={self.placement!r}, layernorm={self.layernorm!r}"
        )


class _LeanAdaptMLP(torch.autograd.Function):
    """``s · up(dropout(ReLU(down(x))))`` saving only the ``N×r`` bottleneck after dropout (it
    gives the gradient of ``up`` and, by its sign, where ReLU and dropout let gradients through)
    and ``x`` only where it cannot be recomputed from a norm's saved tensors."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: Tensor,
        w_down: Tensor,
        b_down: Tensor,
        w_up: Tensor,
        b_up: Tensor,
        scale: float,
        p: float,
        source: tuple[Any, ...] | None,
    ) -> Tensor:
        # The same ops as AdaptMLP.forward, so the outputs are identical; the weights are cast
        # as autocast would cast them for the GEMMs, here, so that the backward pass reuses
        # the casts.
        low = autocast_dtype(w_down)
        wd, wu = (w_down.to(low), w_up.to(low)) if low is not None else (w_down, w_up)
        # x as well, where x has to be saved: the cast autocast would make, and what the
        # backward's GEMM reads (half the bytes of x under bf16 autocast, as plain autograd).
        read = x.to(low) if low is not None and source is None and autocast_dtype(x) == low else x
        h = torch.relu(F.linear(read, wd, b_down))
        if p > 0:
            h = dropout_with_mask(h, p)[0]
        out = F.linear(h, wu, b_up) * scale
        ctx.source, ctx.scale, ctx.drop_scale = source, scale, 1.0 / (1.0 - p) if p < 1 else 0.0
        ctx.x_dtype, ctx.shape = x.dtype, x.shape
        ctx.dtypes = (w_down.dtype, b_down.dtype, w_up.dtype, b_up.dtype)
        ctx.save_for_backward(wd, wu, h, read if source is None else None)
        return out

    @staticmethod
    @first_order_only
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        w_down, w_up, h, flat = ctx.saved_tensors  # the weights as the forward's GEMMs read them
        dim, cd = w_down.shape[1], h.dtype
        h = h.reshape(-1, h.shape[-1])
        g = grad.reshape(-1, grad.shape[-1])
        # s·grad, rounded to cd as it is written: one op, the same values as casting after.
        d_out = torch.mul(g, ctx.scale, out=g.new_empty(g.shape, dtype=cd))
        # Where h > 0 both ReLU and dropout passed the value: the only places a gradient flows.
        # (ReLU's own backward op: a boolean mask of h > 0 would be converted without vector
        # instructions, six times slower.) Dropout's factor scales the GEMM's result inside the
        # GEMM (alpha; beta=0 ignores the empty input): one op where a product after is two.
        dh = torch.addmm(d_out.new_empty(()), d_out, w_up.to(cd), beta=0, alpha=ctx.drop_scale)
        dz = torch.ops.aten.threshold_backward(dh, h, 0)
        grads: list[Tensor | None] = [None] * 8
        dtypes = ctx.dtypes
        if ctx.needs_input_grad[0]:
            grads[0] = (dz @ w_down.to(cd)).to(ctx.x_dtype).view(ctx.shape)
        # The sums accumulate in the parameters' dtype directly: one op each, not two.
        if ctx.needs_input_grad[2]:
            grads[2] = dz.sum(0, dtype=dtypes[1])
        if ctx.needs_input_grad[1]:
            x = flat.reshape(-1, dim) if flat is not None else None
            # The down bias's gradient is the norm's bias term's column sum: computed once.
            reuse = grads[2] if grads[2] is not None and grads[2].dtype == dtypes[0] else None
            grads[1] = input_grad_product(ctx.source, ctx.x_dtype, x, dz, dim, reuse)
            grads[1] = grads[1].t().to(dtypes[0])
        if ctx.needs_input_grad[3]:
            grads[3] = (d_out.t() @ h).to(dtypes[2])
        if ctx.needs_input_grad[4]:
            grads[4] = d_out.sum(0, dtype=dtypes[3])
        return tuple(grads)


def adaptmlp_forward(x: Tensor, down: Any, up: Any, scale: float, p: float) -> Tensor | None:
    """The lean training forward of AdaptMLP (fixed scale, no LayerNorm), or ``None``."""
    params = (down.weight, down.bias, up.weight, up.bias)
    if not lean_applies(x, params):
        return None
    return _LeanAdaptMLP.apply(x, *params, scale, p, norm_source(x))


def build_adaptmlp(
    sites: Sequence[SiteLike], config: AdaptMLPConfig, factory: Callable[[SiteLike], dict[str, Any]]
) -> list[Adapter]:
    """One ``AdaptMLP`` per site."""
    return [
        AdaptMLP(
            site.width,
            config.bottleneck,
            scale=config.scale,
            dropout=config.dropout,
            placement=config.placement,
            layernorm=config.layernorm,
            **factory(site),
        )
        for site in sites
    ]
