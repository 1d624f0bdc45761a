"""The base of every method's config: frozen, validated on construction, round-trippable
through plain JSON. Nothing here imports torch, so adapter file headers are read without it."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from typing import Any, ClassVar, NoReturn

from ..errors import ConfigError

__all__ = ["MAX_SIZE", "POSITIONS", "AdapterConfig", "check_dropout", "check_int", "invalid"]

POSITIONS = ("attn", "mlp")


def invalid(cls: type, field: str, value: Any, allowed: str) -> NoReturn:
    """Raise the ``ConfigError`` every config gives for a bad field value."""
    raise ConfigError(f"{cls.__name__}.{field}={value!r} is invalid: expected {allowed}.")


# Far above any size a config holds (a rank is at most a site's width, a few thousand), and small
# enough that width × size cannot overflow a tensor's size computation: ARCConfig(rank=2**62)
# raised a RuntimeError from inside torch, after part of the model was injected.
MAX_SIZE = 2**31 - 1


def check_int(cls: type, field: str, value: Any, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= MAX_SIZE:
        invalid(cls, field, value, f"an int in [{minimum}, {MAX_SIZE}]")


def check_dropout(cls: type, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        invalid(cls, "dropout", value, "a float in [0, 1)")


def _normalise_blocks(cls: type, value: Any) -> tuple[int, ...] | None:
    """``None`` (every block) or a non-empty tuple of distinct indices (negative: from the end)."""
    if value is None:
        return None
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        invalid(
            cls,
            "blocks",
            value,
            "None (all blocks) or a sequence of block indices such as (-2, -1)",
        )
    if len(value) == 0 or any(isinstance(i, bool) or not isinstance(i, int) for i in value):
        invalid(
            cls, "blocks", value, "None (all blocks) or a non-empty sequence of int block indices"
        )
    if len(set(value)) != len(value):
        invalid(cls, "blocks", value, "distinct block indices")
    return tuple(value)


def _normalise_patterns(cls: type, field: str, value: Any, allow_none: bool) -> Any:
    """``None`` (when allowed) or a tuple of non-empty module-path glob patterns."""
    if value is None and allow_none:
        return None
    if isinstance(value, str):
        value = (value,)
    if not isinstance(value, Sequence) or not all(isinstance(p, str) and p for p in value):
        expected = "None or " if allow_none else ""
        invalid(
            cls, field, value, f"{expected}a sequence of glob patterns such as ('blocks.*.attn',)"
        )
    if allow_none and len(value) == 0:
        invalid(cls, field, value, "None (every site) or at least one pattern")
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
        invalid(cls, "allow_partial", self.allow_partial, "True or False")


class AdapterConfig:
    """Base class of every method's config: a frozen dataclass whose subclass sets ``method`` (the
    tag files store, the registry's key) and ``positions`` (which sites it adapts), declares the
    site-selection fields ``blocks``, ``target_modules``, ``exclude_modules`` and
    ``allow_partial``, and calls ``check_selection()`` from its ``__post_init__``.

    (The selection fields are declared by each subclass, not here: dataclass fields of a base
    come first, which would change the positional order of every config's own fields.)
    """

    method: ClassVar[str]
    positions: tuple[str, ...]
    blocks: tuple[int, ...] | None
    target_modules: tuple[str, ...] | None
    exclude_modules: tuple[str, ...]
    allow_partial: bool

    def check_selection(self) -> None:
        """Validate and normalise the site-selection fields (for ``__post_init__``)."""
        _check_selection(self)

    # The field sizing a method's bottleneck (``"rank"``), which must stay below a site's width,
    # and why (for the message); ``None``: the method has no such limit.
    size_field: ClassVar[str | None] = None
    size_reason: ClassVar[str] = ""

    def width_problem(self, width: int) -> str | None:
        """Why this config cannot adapt a site ``width`` channels wide (``None``: it can).
        ``inject_arc`` asks for every chosen site before it changes anything."""
        if self.size_field is None:
            return None
        size = getattr(self, self.size_field)
        if size < width:
            return None
        return (
            f"{type(self).__name__}.{self.size_field}={size} is not below the site's width "
            f"{width}: {self.size_reason}. Use {self.size_field} < {width}"
        )

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
            raise ConfigError(f"config is for method {method!r}, not {cls.method!r}")
        known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(
                f"unknown {cls.__name__} field(s) {unknown}: expected only {sorted(known)}. "
                "Was the file written by a newer arc_peft?"
            )
        # JSON has no tuples: sequence fields come back as the tuples to_dict wrote them from.
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})

    @classmethod
    def from_json(cls, text: str):
        return cls.from_dict(json.loads(text))
