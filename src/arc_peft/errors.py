"""The library's exception types (each a ``ValueError``, so generic input handling still works)
and its warning category."""

from __future__ import annotations

__all__ = ["AdapterFileError", "AdaptersNotSavedWarning", "MergeError", "UnsupportedModelError"]


class UnsupportedModelError(ValueError):
    """The model has no attention/MLP block arc_peft knows how to adapt."""


class AdapterFileError(ValueError):
    """An adapter file is unreadable, corrupt, or does not fit the model it is loaded into."""


class MergeError(ValueError):
    """An adapter cannot be folded exactly into the backbone at some site."""


class AdaptersNotSavedWarning(UserWarning):
    """A save that the matching load would bring back without the model's adapters (Hugging
    Face ``save_pretrained`` -> ``from_pretrained``); the message names the route that keeps
    them."""
