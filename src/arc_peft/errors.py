"""The library's exception types. Each is a ``ValueError`` so generic input handling still works."""

from __future__ import annotations

__all__ = ["AdapterFileError", "MergeError", "UnsupportedModelError"]


class UnsupportedModelError(ValueError):
    """The model has no attention/MLP block arc_peft knows how to adapt."""


class AdapterFileError(ValueError):
    """An adapter file is unreadable, corrupt, or does not fit the model it is loaded into."""


class MergeError(ValueError):
    """An adapter cannot be folded exactly into the backbone at some site."""
