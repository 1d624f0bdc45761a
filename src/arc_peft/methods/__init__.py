"""Adapter methods: one module per method, each joining through ``register_method``.

Importing this package registers the built-in methods, ARC (``arc/``) and AdaptMLP
(``adaptmlp/``), without importing torch: each method's ``config.py`` is torch-free and its
``layers.py`` is imported when an adapter is first built. ``config.py`` and ``layers.py`` here
hold what every method subclasses, ``lean.py`` what the memory-lean training paths share.
"""

# Registration order is the order messages and the tests' method table list them in.
from . import arc

# isort: split
from . import adaptmlp
from .config import AdapterConfig
from .registry import (
    Method,
    config_from_dict,
    get_method,
    register_method,
    registered_methods,
)

__all__ = [
    "AdapterConfig",
    "Method",
    "adaptmlp",
    "arc",
    "config_from_dict",
    "get_method",
    "register_method",
    "registered_methods",
]
