"""The adapter layers themselves: ``ARC`` and ``AdaptMLP``, ordinary ``nn.Module`` s."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .lean import adaptmlp_forward, arc_forward, arc_output

__all__ = ["ARC", "AdaptMLP", "Adapter", "SharedProjection"]


class Adapter(nn.Module):
    """Base class of every adapter layer: what ``arc_peft.freeze_backbone`` and
    ``arc_peft.count_parameters`` recognise as adapter state (structurally, by type).

    ``transforms_input`` tells where the adapter acts: ``True`` — it maps the sub-module's input
    to a new input (ARC); ``False`` — it adds to the sub-module's output (AdaptMLP).
    """

    transforms_input: bool = True


class SharedProjection(Adapter):
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

    def __init__(
        self,
        dim: int,
        rank: int,
        anchor: str = "",
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.dim, self.rank, self.anchor = dim, rank, anchor
        self.projection = nn.Parameter(torch.empty(dim, rank, device=device, dtype=dtype))
        nn.init.xavier_uniform_(self.projection)

    def forward(self, *args: object) -> Tensor:
        raise RuntimeError("SharedProjection holds ARC's U; the ARC layers that read it run")

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
            # backward pass (arc_peft.lean); None where it does not apply.
            p = self.dropout.p if self.dropout.training else 0.0
            out = arc_forward(x, u, self.scale, self.bias, p)
            if out is not None:
                return out
        flat = x.reshape(-1, x.shape[-1])
        # Fold diag(s) into U once per call (D×r) instead of scaling every token's bottleneck.
        h = self.dropout(flat @ (u * self.scale))
        return arc_output(flat, h, u, self.bias).view(x.shape)

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

    transforms_input = False

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
            # Training: the same ops, keeping less for the backward pass (arc_peft.lean).
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
