"""ARC — Adapter Re-Composing (NeurIPS 2023): ``config.py`` (no torch) and ``layers.py`` (the
``ARC`` layer, the shared projection, the lean training path, the builder)."""

from ..registry import register_method
from .config import ARCConfig

__all__ = ["ARCConfig"]

register_method(
    ARCConfig, "arc_peft.methods.arc.layers:build_arc", example=lambda: ARCConfig(rank=4)
)
