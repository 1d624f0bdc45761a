"""ARC's config (no torch here: adapter file headers are read without it)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from ..config import POSITIONS, AdapterConfig, check_dropout, check_int, invalid

__all__ = ["ARCConfig"]


@dataclass(frozen=True)
class ARCConfig(AdapterConfig):
    """Adapter Re-Composing (ARC, NeurIPS 2023).

    Each adapted site computes ``x + dropout(x U diag(s_l)) Uᵀ + b_l`` on the input of the
    attention and/or MLP sub-module; ``U`` is shared by every site of one position and width.

    Args:
        rank: Bottleneck size ``r`` (paper default 50).
        positions: Which sub-module inputs to adapt: ``("attn", "mlp")`` is ARC,
            ``("attn",)`` is ARC_att.
        dropout: Dropout on the ``r``-dimensional bottleneck (official default 0.1).
        init: ``"paper"`` — the official initialisation (attention scales zero, MLP scales
            xavier-uniform, so only the attention adapter starts as an identity);
            ``"identity"`` — every scale zero, so the adapted model equals the backbone at init.
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
        mergeable: Keep every site exactly mergeable, whatever the training does: the
            attention-site adapters have no bias ``b_l`` (it stays zero), because on RoPE
            (EVA-02) and cosine attention (Swin V2), and where torchvision's Swin pads its
            windows, the bias's key offset cannot be folded into the weights. Costs ``D``
            trainable parameters per attention site (a few percent of ARC's) and the bias's
            share of the accuracy; see docs/merging.md.
    """

    rank: int = 50
    positions: tuple[str, ...] = ("attn", "mlp")
    dropout: float = 0.1
    init: Literal["paper", "identity"] = "paper"
    blocks: tuple[int, ...] | None = None
    target_modules: tuple[str, ...] | None = None
    exclude_modules: tuple[str, ...] = ()
    allow_partial: bool = False
    mergeable: bool = False

    method: ClassVar[str] = "arc"
    # U is D×r: with r ≥ D the "bottleneck" holds every direction, and U·diag(s)·Uᵀ is an
    # arbitrary D×D map with more parameters than a full fine-tune of it: not ARC.
    size_field: ClassVar[str | None] = "rank"
    size_reason: ClassVar[str] = (
        "ARC's projection U is width × rank, a bottleneck only for rank < width (the paper "
        "uses 50 for ViT-B's 768)"
    )

    def to_dict(self) -> dict[str, Any]:
        data = super().to_dict()
        if not self.mergeable:  # written only when set: older arc_peft versions read the rest
            del data["mergeable"]
        return data

    def __post_init__(self) -> None:
        cls = type(self)
        check_int(cls, "rank", self.rank)
        positions = self.positions
        if isinstance(positions, str) or not isinstance(positions, Sequence):
            invalid(cls, "positions", positions, f"a non-empty tuple drawn from {POSITIONS}")
        positions = tuple(positions)
        if (
            not positions
            or len(set(positions)) != len(positions)
            or any(p not in POSITIONS for p in positions)
        ):
            invalid(cls, "positions", self.positions, f"a non-empty tuple of distinct {POSITIONS}")
        # Canonical order so that equal configs compare (and serialise) equal.
        object.__setattr__(self, "positions", tuple(p for p in POSITIONS if p in positions))
        check_dropout(cls, self.dropout)
        object.__setattr__(self, "dropout", float(self.dropout))
        if self.init not in ("paper", "identity"):
            invalid(cls, "init", self.init, "'paper' or 'identity'")
        if not isinstance(self.mergeable, bool):
            invalid(cls, "mergeable", self.mergeable, "True or False")
        self.check_selection()
