"""The library's exception types. Each is a ``ValueError`` so generic input handling still works."""

from __future__ import annotations

__all__ = [
    "AdapterFileError",
    "AdaptersNotTrainedWarning",
    "ConfigError",
    "MergeError",
    "UnsupportedModelError",
    "printable",
]


class ConfigError(ValueError):
    """A config is invalid: a field value out of its range, an unknown field or method in a
    config's dict, or a size that does not fit the model it is injected into (a rank not below
    a site's width). The message names the field, the value, what is allowed and the fix."""


class UnsupportedModelError(ValueError):
    """The model has no attention/MLP block arc_peft knows how to adapt."""


class AdapterFileError(ValueError):
    """An adapter file is unreadable, corrupt, or does not fit the model it is loaded into."""


class MergeError(ValueError):
    """An adapter cannot be folded exactly into the backbone at some site."""


class AdaptersNotTrainedWarning(UserWarning):
    """Adapters run where they cannot get a gradient: inside reentrant activation checkpointing
    whose input does not require grad."""


def printable(text: str) -> str:
    """``text`` safe to print anywhere: control characters (newlines, ESC, VT/FF/FS, NEL,
    U+2028 included: a file's text must not start lines of its own or drive the terminal) and
    lone surrogates (which a file's JSON may hold, and which no terminal encoding accepts)
    become escapes."""
    return "".join(
        ch if ch.isprintable() and not 0xD800 <= ord(ch) <= 0xDFFF else ascii(ch)[1:-1]
        for ch in text
    )
