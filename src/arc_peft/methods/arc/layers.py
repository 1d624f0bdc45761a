"""ARC — Adapter Re-Composing (Dong et al., NeurIPS 2023): its layers, its lean training path,
and how injection builds them.

``x + dropout(x·U·diag(s_l))·Uᵀ + b_l`` on a site's input, with ``U`` shared by every site of one
position and width (a ``SharedProjection`` the runtime holds above those sites), ``s_l`` and
``b_l`` per site. Linear, so ``ARC.affine()`` gives the map ``merge_adapter`` folds into the
backbone.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..layers import Adapter, SharedState
from ..lean import (
    BackwardCasts,
    autocast_dtype,
    dropout_backward,
    dropout_with_mask,
    first_order_only,
    input_grad_product,
    lean_applies,
    norm_source,
    normalized_down_product,
)
from ..registry import SiteLike
from .config import ARCConfig

__all__ = [
    "ARC",
    "SharedProjection",
    "arc_forward",
    "arc_output",
    "build_arc",
    "scaled_projection",
]


class SharedProjection(SharedState):
    """ARC's ``U`` (``dim × rank``) for a group of layers that share it, held apart from them.

    ``inject_arc`` registers one per (position, width) group on the nearest module above every
    site of the group (the model itself for a ViT, a stage for Swin), under
    ``arc_peft_shared.<adapter name>.<position>-<width>``, and each site's ``ARC`` reads it.
    Why not on the group's first layer: a module sharded on its own (FSDP2's
    ``fully_shard(block)``) gathers its parameters only while it runs, so a ``U`` held by block
    0 would still be sharded when block 1 reads it; held above the blocks, it belongs to the
    unit that encloses them all.

    Args:
        dim: Token width ``D``.
        rank: Bottleneck size ``r``.
        anchor: Path of the group's first site: adapter files store ``U`` under that site's
            slot, as they always have.
    """

    holds = "ARC's U"

    def __init__(
        self,
        dim: int,
        rank: int,
        anchor: str = "",
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(anchor)
        self.dim, self.rank = dim, rank
        self.projection = nn.Parameter(torch.empty(dim, rank, device=device, dtype=dtype))
        nn.init.xavier_uniform_(self.projection)
        self.casts = BackwardCasts()  # U cast once per backward pass for all its sites

    def extra_repr(self) -> str:
        return f"dim={self.dim}, rank={self.rank}, anchor={self.anchor!r}"


class ARC(Adapter):
    """ARC adapter: ``x + dropout(x · U · diag(s)) · Uᵀ + b``.

    ``U`` (``dim × rank``) is the symmetric down/up projection; ``s`` (``rank``) and ``b``
    (``dim``) belong to this layer. Several layers share one ``U`` by passing ``share_with``:
    a ``SharedProjection`` (how ``inject_arc`` shares it) or a first ``ARC`` that *owns* it. The
    parameter is registered at its holder only, so ``named_parameters()`` lists it once and it
    is stored once; the other layers read it through their ``owner``.

    Args:
        dim: Token width ``D``.
        rank: Bottleneck size ``r``.
        dropout: Dropout probability on the ``r``-dimensional bottleneck.
        scale_init: ``"zeros"`` (the layer starts as an exact identity) or ``"xavier"``
            (xavier-uniform on a ``(1, r)`` tensor, the official MLP-position init).
        share_with: A ``SharedProjection``, or an owning ``ARC``, whose ``U`` this layer uses
            instead of owning one.
    """

    def __init__(
        self,
        dim: int,
        rank: int = 50,
        dropout: float = 0.1,
        scale_init: str = "zeros",
        share_with: ARC | SharedProjection | None = None,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if scale_init not in ("zeros", "xavier"):
            raise ValueError(
                f"ARC scale_init={scale_init!r} is invalid: expected 'zeros' or 'xavier'"
            )
        factory = {"device": device, "dtype": dtype}
        self.dim, self.rank = dim, rank
        if share_with is None:
            self.projection = nn.Parameter(torch.empty(dim, rank, **factory))
            nn.init.xavier_uniform_(self.projection)
            self.casts = BackwardCasts()
            owner = None
        else:
            owning = isinstance(share_with, SharedProjection) or (
                isinstance(share_with, ARC) and share_with.owner is None
            )
            if not owning or (share_with.dim, share_with.rank) != (dim, rank):
                raise ValueError(
                    f"ARC(dim={dim}, rank={rank}) can only share U with a SharedProjection or an "
                    f"owning ARC of the same dim and rank, got {share_with!r}"
                )
            owner = share_with
        # A plain attribute, not a submodule: registering the owner here would list the shared U
        # once per layer and make every layer's state dict carry a copy of it.
        object.__setattr__(self, "owner", owner)
        self.scale = nn.Parameter(torch.zeros(rank, **factory))
        if scale_init == "xavier":
            # The official code draws the MLP scales as a (1, r) xavier-uniform matrix.
            bound = math.sqrt(6.0 / (1 + rank))
            nn.init.uniform_(self.scale, -bound, bound)
        self.bias = nn.Parameter(torch.zeros(dim, **factory))
        self.dropout = nn.Dropout(dropout)

    @property
    def U(self) -> Tensor:
        """The shared ``dim × rank`` projection this layer uses."""
        return self.projection if self.owner is None else self.owner.projection

    def forward(self, x: Tensor) -> Tensor:
        u = self.U
        if torch.is_grad_enabled():
            # Training: the same ops through an autograd Function that keeps less for the
            # backward pass (_LeanARC); None where it does not apply.
            p = self.dropout.p if self.dropout.training else 0.0
            holder = self if self.owner is None else self.owner
            casts = getattr(holder, "casts", None)  # None: a module pickled before it existed
            out = arc_forward(x, u, self.scale, self.bias, p, casts)
            if out is not None:
                return out
        flat = x.reshape(-1, x.shape[-1])
        # Fold diag(s) into U once per call (D×r) instead of scaling every token's bottleneck;
        # under autocast rounded as it is written, as autocast would round it for the GEMM: the
        # same values, one op less per site (the lean path computes it the same way).
        h = self.dropout(flat @ scaled_projection(u, self.scale))
        return arc_output(flat, h, u, self.bias).view(x.shape)

    def after_norm(
        self,
        x_hat: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        y: Tensor,
        scale: Tensor | None = None,
    ) -> Tensor:
        """``forward(y)`` for ``y`` a norm's output ``x̂·weight + bias`` (``x̂ = x_hat·scale``
        for an RMS norm), its down product computed from ``x̂`` (``normalized_down_product``):
        what compiled training runs, so that it keeps no token-sized tensor for the gradient of
        ``U`` and ``s``."""
        u = self.U
        flat = x_hat.reshape(-1, self.dim)
        scale = scale.reshape(-1, 1) if scale is not None else None
        down = normalized_down_product(flat, weight, bias, u * self.scale, scale)
        h = self.dropout(down)
        return arc_output(y.reshape(-1, self.dim), h, u, self.bias).view(y.shape)

    @property
    def shared(self) -> SharedProjection | None:
        return self.owner if isinstance(self.owner, SharedProjection) else None

    def affine(
        self, dtype: torch.dtype | None = None, device: torch.device | None = None
    ) -> tuple[Tensor, Tensor]:
        """``merged_matrix``: ARC is linear, so every ARC site can be merged."""
        return self.merged_matrix(dtype, device)

    def merged_matrix(
        self, dtype: torch.dtype | None = None, device: torch.device | None = None
    ) -> tuple[Tensor, Tensor]:
        """``(M, b)`` with ``M = I + U·diag(s)·Uᵀ`` so that in eval mode ``ARC(x) == x @ M + b``.

        Args:
            dtype: Compute in this dtype (e.g. float64 for an exact fold); default: the weights'.
            device: Compute on this device; default: the weights'.
        """
        u = self.U.to(device=device, dtype=dtype)
        s = self.scale.to(device=device, dtype=dtype)
        eye = torch.eye(self.dim, device=u.device, dtype=u.dtype)
        return eye + (u * s) @ u.t(), self.bias.to(device=device, dtype=dtype)

    def extra_repr(self) -> str:
        shared = "" if self.owner is None else ", shared U"
        return f"dim={self.dim}, rank={self.rank}, dropout={self.dropout.p}{shared}"


def scaled_projection(u: Tensor, s: Tensor) -> Tensor:
    """``U·diag(s)`` for the down product, in the dtype autocast would cast it to for the GEMM
    (rounded as it is written, ``out=``: the values of casting it after, one op less). Where
    autograd records the product (plain autograd: ``out=`` has no gradient) autocast casts it."""
    low = autocast_dtype(u)
    if low is None or (torch.is_grad_enabled() and (u.requires_grad or s.requires_grad)):
        return u * s
    return torch.mul(u, s, out=u.new_empty(u.shape, dtype=low))


def arc_output(flat: Tensor, h: Tensor, u: Tensor, bias: Tensor) -> Tensor:
    """``x + h·Uᵀ + b`` for ARC's two paths (``ARC.forward`` and ``_LeanARC``), so their outputs
    are identical. The residual is accumulated inside the GEMM and the bias added in place: one
    token-sized pass and one token-sized temporary less (about 15% of the adapter's time). Under
    autocast ``h`` is low precision and the sum stays in ``x``'s dtype: ``(x + b) + h·Uᵀ``, the
    low-precision product added last and in place: the same values, and about a third less time
    for the sums than ``(x + h·Uᵀ) + b``, whose out-of-place mixed-dtype sum is slow
    (docs/benchmarks.md)."""
    if h.dtype == flat.dtype:
        return torch.addmm(flat, h, u.t()).add_(bias)
    # F.linear(h, U) is h·Uᵀ, the same GEMM; given U itself (a leaf parameter), autocast casts it
    # once per autocast region and reuses the cast at every site sharing U: one op per site less
    # than casting the view Uᵀ, which it cannot cache.
    return torch.add(flat, bias).add_(F.linear(h, u))


class _LeanARC(torch.autograd.Function):
    """``x + dropout(x·U·diag(s))·Uᵀ + b`` saving the ``N×r`` bottleneck and the dropout mask,
    and ``x`` only where it cannot be recomputed from a norm's saved tensors."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: Tensor,
        u: Tensor,
        s: Tensor,
        bias: Tensor,
        p: float,
        source: tuple[Any, ...] | None,
        casts: BackwardCasts | None = None,
    ) -> Tensor:
        flat = x.reshape(-1, x.shape[-1])
        # The same ops as ARC.forward, so the outputs are identical; U·diag(s) is cast as
        # autocast would cast it for the GEMM, here, so that the backward pass reuses it.
        us = scaled_projection(u, s)
        # The input too, where the GEMM runs in low precision: the same cast autocast makes, and
        # where x has to be saved, its low-precision copy is what the backward's GEMM reads
        # (half the bytes of x under bf16 autocast, as plain autograd keeps).
        low = flat.to(us.dtype) if us.dtype == autocast_dtype(flat) else flat
        a = low @ us
        mask = None
        if p > 0:
            h, mask = dropout_with_mask(a, p)
        else:
            h = a
        out = arc_output(flat, h, u, bias)
        ctx.source, ctx.p, ctx.shape, ctx.casts = source, p, x.shape, casts
        ctx.x_dtype, ctx.bias_dtype = x.dtype, bias.dtype
        ctx.save_for_backward(u, s, us, mask, h, low if source is None else None)
        return out.view(x.shape)

    @staticmethod
    @first_order_only
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        u, s, us, mask, h, flat = ctx.saved_tensors
        cd = h.dtype  # the bottleneck's dtype: the GEMMs' under autocast
        g = grad.reshape(-1, u.shape[0])
        gc = g.to(cd)
        # U in cd: under autocast cast once per backward pass for every site sharing it.
        dh = gc @ (u.to(cd) if ctx.casts is None else ctx.casts.cast(u, cd))  # N×r
        da = dh if mask is None else dropout_backward(dh, mask, ctx.p)
        grad_x = grad_u = grad_s = grad_b = None
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            # First: it reads the norm's input, which the norm's backward, next, reads again.
            d_us = input_grad_product(ctx.source, ctx.x_dtype, flat, da, u.shape[0])
            d_us = d_us.to(u.dtype)  # gradient of U·diag(s)
            if ctx.needs_input_grad[1]:
                # gᵀ·h + d_us·diag(s), the second term added in the same pass (a low-precision
                # product widened as it is read: the values of casting it first, one op less).
                grad_u = torch.addcmul(gc.t() @ h, d_us, s).to(u.dtype)
            if ctx.needs_input_grad[2]:
                # Σ_d U[d,k]·d_us[d,k]: r dot products as one batched GEMM, one op where a
                # product and a sum are two (the result is already contiguous: no copy).
                grad_s = torch.bmm(u.t().unsqueeze(1), d_us.t().unsqueeze(2)).view(-1)
        if ctx.needs_input_grad[3]:
            grad_b = g.sum(0).to(ctx.bias_dtype)
        if ctx.needs_input_grad[0]:
            usc = us.to(cd)  # the forward's U·diag(s), already in cd (no op) but in rare dtypes
            if g.dtype == cd:  # the residual's gradient accumulated inside the GEMM
                grad_x = torch.addmm(g, da, usc.t()).view(ctx.shape)
            else:
                # One mixed-precision add (the product widened as it is read): the same sum
                # as casting it first, one op less.
                grad_x = torch.add(g, da @ usc.t()).view(ctx.shape)
        return grad_x, grad_u, grad_s, grad_b, None, None, None


def arc_forward(
    x: Tensor, u: Tensor, s: Tensor, bias: Tensor, p: float, casts: BackwardCasts | None = None
) -> Tensor | None:
    """The lean training forward of ARC, or ``None`` where the plain path should run (no
    autograd, compiling, switched off). ``casts``: where the backward pass keeps its cast of
    ``U`` for the other sites sharing it."""
    if not lean_applies(x, (u, s, bias)):
        return None
    return _LeanARC.apply(x, u, s, bias, p, norm_source(x), casts)


def _without_bias(adapter: ARC) -> None:
    """``ARCConfig(mergeable=True)``: the attention-site adapter's bias becomes a constant zero
    (a non-persistent buffer, so files and parameter counts leave it out): its key offset is
    what RoPE and cosine attention cannot absorb in a merge."""
    zero = torch.zeros_like(adapter.bias.detach())
    del adapter.bias
    adapter.register_buffer("bias", zero, persistent=False)


def build_arc(
    sites: Sequence[SiteLike], config: ARCConfig, factory: Callable[[SiteLike], dict[str, Any]]
) -> list[Adapter]:
    """One ``ARC`` per site; one ``SharedProjection`` per (position, width) group, anchored at the
    group's first site (drawn first, as when the group's first ARC owned it)."""
    owners: dict[tuple[str, int], SharedProjection] = {}
    layers: list[Adapter] = []
    for site in sites:
        kwargs = factory(site)
        group = (site.position, site.width)
        if group not in owners:
            owners[group] = SharedProjection(site.width, config.rank, site.path, **kwargs)
        paper_zero = site.position == "attn" or config.init == "identity"
        layer = ARC(
            site.width,
            config.rank,
            dropout=config.dropout,
            scale_init="zeros" if paper_zero else "xavier",
            share_with=owners[group],
            **kwargs,
        )
        if config.mergeable and site.position == "attn":
            _without_bias(layer)
        layers.append(layer)
    return layers
