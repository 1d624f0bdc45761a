"""AdaptMLP's config (no torch here: adapter file headers are read without it)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal, Union

from ..config import AdapterConfig, check_dropout, check_int, invalid

__all__ = ["AdaptMLPConfig"]


@dataclass(frozen=True)
class AdaptMLPConfig(AdapterConfig):
    """AdaptMLP (AdaptFormer, NeurIPS 2022): ``s · up(dropout(ReLU(down(x))))`` beside each MLP.

    Args:
        bottleneck: Hidden size ``r`` of the bottleneck (paper default 64).
        scale: The factor ``s`` (paper default 0.1), or ``"learnable"`` for a trainable scalar
            initialised to 1 (the official code's option).
        dropout: Dropout on the bottleneck (default 0.1).
        placement: ``"parallel"`` (paper default: the adapter sees the MLP's input and its output
            is added to the MLP's) or ``"sequential"`` (the adapter sees the MLP's output).
        layernorm: ``None`` (official default), ``"in"`` (LayerNorm on the adapter's input) or
            ``"out"`` (on its scaled output, ``LN(s · up(...))``, as the official code; the
            norm then undoes the size of ``s``, its own affine weight sets the branch's size).
        blocks: Block indices to adapt (negative counts from the end, e.g. ``(-2, -1)`` for the
            last two); ``None`` adapts every block. A block is a run of attention sites and
            the MLP sites after them (one transformer block in a ViT).
        target_modules: Glob patterns (``fnmatch``, matched against the whole module path, e.g.
            ``("blocks.*.attn",)`` or ``("*.mlp",)``): adapt only the sites whose module path
            matches one; ``None`` adapts every site.
        exclude_modules: Glob patterns of site module paths to leave out.
        allow_partial: Adapt what can be adapted when some attention module cannot be (the
            error then becomes a warning). Sites chosen away by ``blocks``, ``target_modules``
            or ``exclude_modules``, attention pooling and cross-attention are never an error.
    """

    bottleneck: int = 64
    scale: Union[float, Literal["learnable"]] = 0.1  # noqa: UP007 - dataclass field annotation
    dropout: float = 0.1
    placement: Literal["parallel", "sequential"] = "parallel"
    layernorm: Literal["in", "out"] | None = None
    blocks: tuple[int, ...] | None = None
    target_modules: tuple[str, ...] | None = None
    exclude_modules: tuple[str, ...] = ()
    allow_partial: bool = False

    method: ClassVar[str] = "adaptmlp"
    size_field: ClassVar[str | None] = "bottleneck"
    size_reason: ClassVar[str] = (
        "AdaptMLP projects down to the bottleneck and back (the paper uses 64 for ViT-B's 768)"
    )
    positions = ("mlp",)

    def __post_init__(self) -> None:
        cls = type(self)
        check_int(cls, "bottleneck", self.bottleneck)
        if self.scale != "learnable":
            if isinstance(self.scale, bool) or not isinstance(self.scale, (int, float)):
                invalid(cls, "scale", self.scale, "a finite float or 'learnable'")
            if self.scale != self.scale or abs(self.scale) == float("inf"):
                invalid(cls, "scale", self.scale, "a finite float or 'learnable'")
            object.__setattr__(self, "scale", float(self.scale))
        check_dropout(cls, self.dropout)
        object.__setattr__(self, "dropout", float(self.dropout))
        if self.placement not in ("parallel", "sequential"):
            invalid(cls, "placement", self.placement, "'parallel' or 'sequential'")
        if self.layernorm not in (None, "in", "out"):
            invalid(cls, "layernorm", self.layernorm, "None, 'in' or 'out'")
        self.check_selection()
