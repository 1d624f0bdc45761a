"""Glue for the tools users train with. Each module imports its tool (an optional dependency) at
import time, so import only the one you use: ``arc_peft.integrations.transformers`` (a
``Trainer`` callback). Recipes for Lightning, accelerate, timm and ONNX need no glue; see
``docs/integrations.md``."""
