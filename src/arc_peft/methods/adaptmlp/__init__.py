"""AdaptMLP — AdaptFormer (NeurIPS 2022): ``config.py`` (no torch) and ``layers.py`` (the
``AdaptMLP`` layer, its lean training path, the builder)."""

from ..registry import register_method
from .config import AdaptMLPConfig

__all__ = ["AdaptMLPConfig"]

register_method(
    AdaptMLPConfig,
    "arc_peft.methods.adaptmlp.layers:build_adaptmlp",
    example=lambda: AdaptMLPConfig(bottleneck=4),
)
