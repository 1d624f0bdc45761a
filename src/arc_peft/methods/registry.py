"""The method registry: how an adapter method joins arc_peft.

A method is a config class (``AdapterConfig`` subclass with a ``method`` tag) and a ``build``
function that makes the adapter layers for the sites a config selected. Everything else —
injection, merging, adapter files, parameter counts, the tests' method table — looks methods up
here, so adding one is one module and one ``register_method`` call (see docs/adding-a-method.md).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from ..errors import ConfigError
from .config import AdapterConfig

if TYPE_CHECKING:
    from .layers import Adapter


__all__ = [
    "BuildFn",
    "Method",
    "SiteLike",
    "config_from_dict",
    "get_method",
    "register_method",
    "registered_methods",
]


class SiteLike(Protocol):
    """What a method's builder reads of a site (``arc_peft.Site`` has these and more): methods sit
    below discovery and do not import it."""

    path: str
    position: str
    width: int


# ``build(sites, config, factory)`` returns one new adapter layer per site, in order;
# ``factory(site)`` gives the ``device`` / ``dtype`` keyword arguments for that site's tensors.
# Layers that share state (ARC's ``U``) return it through ``Adapter.shared``.
BuildFn = Callable[
    [Sequence["SiteLike"], Any, Callable[["SiteLike"], dict[str, Any]]], "list[Adapter]"
]


@dataclass(frozen=True)
class Method:
    """One adapter method.

    Attributes:
        name: The config's ``method`` tag, as adapter files store it (``"arc"``).
        config_class: Its ``AdapterConfig`` subclass.
        builder: Makes the adapter layers (see ``BuildFn``), or where to find that function,
            ``"package.module:function"``, imported on first use (the built-in methods' layers
            import torch; their configs, which reading a file header needs, do not).
        example: A small config for tests and docs (``config_class()`` by default).
    """

    name: str
    config_class: type[AdapterConfig]
    builder: BuildFn | str
    example: Callable[[], AdapterConfig] | None = None

    @property
    def build(self) -> BuildFn:
        """The build function (imported on first use when given by name)."""
        if not isinstance(self.builder, str):
            return self.builder
        module, _, function = self.builder.partition(":")
        return getattr(importlib.import_module(module), function)

    def example_config(self) -> AdapterConfig:
        return self.example() if self.example is not None else self.config_class()


_METHODS: dict[str, Method] = {}


def register_method(
    config_class: type[AdapterConfig],
    build: BuildFn | str,
    *,
    example: Callable[[], AdapterConfig] | None = None,
    replace: bool = False,
) -> Method:
    """Make ``config_class`` a method ``inject_arc`` accepts and adapter files can name.

    Args:
        config_class: A frozen dataclass subclassing ``AdapterConfig`` with a ``method`` tag.
        build: Makes its adapter layers (see ``BuildFn``), or ``"package.module:function"``
            naming it, imported on first use.
        example: Returns a small config of this method (for tests and docs).
        replace: Allow replacing a method registered under the same tag.

    Returns:
        The registered ``Method``.
    """
    if not (isinstance(config_class, type) and issubclass(config_class, AdapterConfig)):
        raise TypeError(f"register_method expects an AdapterConfig subclass, got {config_class!r}")
    name = getattr(config_class, "method", None)
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(
            f"{config_class.__qualname__}.method={name!r} is invalid: expected an identifier "
            "naming the method (e.g. 'arc'), as adapter files store it"
        )
    if name in _METHODS and _METHODS[name].config_class is not config_class and not replace:
        raise ValueError(
            f"method {name!r} is already registered by "
            f"{_METHODS[name].config_class.__qualname__}; pass replace=True to replace it"
        )
    if not (callable(build) or (isinstance(build, str) and ":" in build)):
        raise TypeError(
            f"register_method: build must be a function or 'package.module:function', got "
            f"{build!r}"
        )
    method = Method(name, config_class, build, example)
    _METHODS[name] = method
    return method


def registered_methods() -> list[Method]:
    """Every registered method, in registration order."""
    return list(_METHODS.values())


def get_method(config: AdapterConfig) -> Method:
    """The method ``config`` belongs to; ``TypeError`` for anything that is not a registered
    method's config."""
    tag = getattr(type(config), "method", None)
    method = _METHODS.get(tag) if isinstance(tag, str) else None
    if method is None or not isinstance(config, method.config_class):
        known = " or ".join(m.config_class.__name__ for m in _METHODS.values())
        raise TypeError(f"expected an {known}, got {type(config).__name__}")
    return method


def config_from_dict(data: dict[str, Any]) -> AdapterConfig:
    """Rebuild a config from ``to_dict`` output, dispatching on its ``method`` tag."""
    if not isinstance(data, dict):
        raise ConfigError(f"a config must be a JSON object, got {type(data).__name__}")
    tag = data.get("method")
    method = _METHODS.get(tag) if isinstance(tag, str) else None
    if method is None:
        known = " or ".join(repr(n) for n in _METHODS)
        raise ConfigError(f"unknown adapter method {data.get('method')!r}: expected {known}")
    return method.config_class.from_dict(data)
