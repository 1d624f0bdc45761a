"""Method configurations: frozen, validated on construction, round-trippable through plain JSON."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, Union

__all__ = ["ARCConfig", "AdaptMLPConfig", "AdapterConfig", "config_from_dict"]

_POSITIONS = ("attn", "mlp")


def _fail(cls: type, field: str, value: Any, allowed: str) -> None:
    raise ValueError(f"{cls.__name__}.{field}={value!r} is invalid: expected {allowed}.")


def _check_int(cls: type, field: str, value: Any, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        _fail(cls, field, value, f"an int >= {minimum}")


def _check_dropout(cls: type, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        _fail(cls, "dropout", value, "a float in [0, 1)")


def _normalise_blocks(cls: type, value: Any) -> tuple[int, ...] | None:
    """``None`` (every block) or a non-empty tuple of distinct indices (negative: from the end)."""
    if value is None:
        return None
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        _fail(
            cls,
            "blocks",
            value,
            "None (all blocks) or a sequence of block indices such as (-2, -1)",
        )
    if len(value) == 0 or any(isinstance(i, bool) or not isinstance(i, int) for i in value):
        _fail(
            cls, "blocks", value, "None (all blocks) or a non-empty sequence of int block indices"
        )
    if len(set(value)) != len(value):
        _fail(cls, "blocks", value, "distinct block indices")
    return tuple(value)


def _normalise_patterns(cls: type, field: str, value: Any, allow_none: bool) -> Any:
    """``None`` (when allowed) or a tuple of non-empty module-path glob patterns."""
    if value is None and allow_none:
        return None
    if isinstance(value, str):
        value = (value,)
    if not isinstance(value, Sequence) or not all(isinstance(p, str) and p for p in value):
        expected = "None or " if allow_none else ""
        _fail(
            cls, field, value, f"{expected}a sequence of glob patterns such as ('blocks.*.attn',)"
        )
    if allow_none and len(value) == 0:
        _fail(cls, field, value, "None (every site) or at least one pattern")
    return tuple(value)


def _check_selection(self: Any) -> None:
    cls = type(self)
    object.__setattr__(self, "blocks", _normalise_blocks(cls, self.blocks))
    object.__setattr__(
        self,
        "target_modules",
        _normalise_patterns(cls, "target_modules", self.target_modules, True),
    )
    object.__setattr__(
        self,
        "exclude_modules",
        _normalise_patterns(cls, "exclude_modules", self.exclude_modules, False),
    )
    if not isinstance(self.allow_partial, bool):
        _fail(cls, "allow_partial", self.allow_partial, "True or False")


class _JSONMixin:
    """Shared (de)serialisation: adapter files store a config as JSON with a ``method`` tag."""

    method: str

    def to_dict(self) -> dict[str, Any]:
        data = {"method": self.method}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            data[f.name] = list(value) if isinstance(value, tuple) else value
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        data = dict(data)
        method = data.pop("method", cls.method)
        if method != cls.method:
            raise ValueError(f"config is for method {method!r}, not {cls.method!r}")
        known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(
                f"unknown {cls.__name__} field(s) {unknown}: expected only {sorted(known)}. "
                "Was the file written by a newer arc_peft?"
            )
        return cls(**data)

    @classmethod
    def from_json(cls, text: str):
        return cls.from_dict(json.loads(text))


@dataclass(frozen=True)
class ARCConfig(_JSONMixin):
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

    method = "arc"

    def to_dict(self) -> dict[str, Any]:
        data = super().to_dict()
        if not self.mergeable:  # written only when set: older arc_peft versions read the rest
            del data["mergeable"]
        return data

    def __post_init__(self) -> None:
        cls = type(self)
        _check_int(cls, "rank", self.rank)
        positions = self.positions
        if isinstance(positions, str) or not isinstance(positions, Sequence):
            _fail(cls, "positions", positions, f"a non-empty tuple drawn from {_POSITIONS}")
        positions = tuple(positions)
        if (
            not positions
            or len(set(positions)) != len(positions)
            or any(p not in _POSITIONS for p in positions)
        ):
            _fail(cls, "positions", self.positions, f"a non-empty tuple of distinct {_POSITIONS}")
        # Canonical order so that equal configs compare (and serialise) equal.
        object.__setattr__(self, "positions", tuple(p for p in _POSITIONS if p in positions))
        _check_dropout(cls, self.dropout)
        object.__setattr__(self, "dropout", float(self.dropout))
        if self.init not in ("paper", "identity"):
            _fail(cls, "init", self.init, "'paper' or 'identity'")
        if not isinstance(self.mergeable, bool):
            _fail(cls, "mergeable", self.mergeable, "True or False")
        _check_selection(self)


@dataclass(frozen=True)
class AdaptMLPConfig(_JSONMixin):
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

    method = "adaptmlp"
    positions = ("mlp",)

    def __post_init__(self) -> None:
        cls = type(self)
        _check_int(cls, "bottleneck", self.bottleneck)
        if self.scale != "learnable":
            if isinstance(self.scale, bool) or not isinstance(self.scale, (int, float)):
                _fail(cls, "scale", self.scale, "a finite float or 'learnable'")
            if self.scale != self.scale or abs(self.scale) == float("inf"):
                _fail(cls, "scale", self.scale, "a finite float or 'learnable'")
            object.__setattr__(self, "scale", float(self.scale))
        _check_dropout(cls, self.dropout)
        object.__setattr__(self, "dropout", float(self.dropout))
        if self.placement not in ("parallel", "sequential"):
            _fail(cls, "placement", self.placement, "'parallel' or 'sequential'")
        if self.layernorm not in (None, "in", "out"):
            _fail(cls, "layernorm", self.layernorm, "None, 'in' or 'out'")
        _check_selection(self)


AdapterConfig = Union[ARCConfig, AdaptMLPConfig]  # noqa: UP007 - a runtime alias


def config_from_dict(data: dict[str, Any]) -> AdapterConfig:
    """Rebuild a config from ``to_dict`` output, dispatching on its ``method`` tag."""
    if not isinstance(data, dict):
        raise ValueError(f"a config must be a JSON object, got {type(data).__name__}")
    method = data.get("method")
    for cls in (ARCConfig, AdaptMLPConfig):
        if method == cls.method:
            return cls.from_dict(data)
    raise ValueError(f"unknown adapter method {method!r}: expected 'arc' or 'adaptmlp'")
