"""Which model an adapter file belongs to: the backbone's identity where its library records one,
and how the file's keys map onto a model built another way (``features_only=True``).

The identity is a small JSON object stored in the file's metadata under ``"model"``:

- timm: ``{"library": "timm", "architecture": "vit_base_patch16_224", "tag": "augreg_in21k",
  "hub_id": "timm/vit_base_patch16_224.augreg_in21k"}`` from the model's ``pretrained_cfg``;
- torchvision: ``{"library": "torchvision", "architecture": "vit_b_16"}`` when the builder can be
  told from the model's configuration;
- Hugging Face: ``{"library": "transformers", "architecture": "ViTModel", "name_or_path": ...}``.

A different ``architecture`` of the same library is refused by ``arc_peft.load_adapter``
(a ``vit_tiny`` adapter does not belong in ``deit_tiny`` even though every width agrees); a
different pretrained tag, hub id or ``name_or_path`` only warns (same network, other weights).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ..errors import printable

if TYPE_CHECKING:  # torch is not imported to read a file's description
    from torch import nn

__all__ = [
    "check_identity",
    "describe",
    "inner_models",
    "json_object",
    "model_identity",
    "qualified",
    "remap_keys",
    "user_metadata",
    "wraps",
]

# torchvision ViT builders by (patch size, width, depth); the model object keeps these values.
_TV_VIT = {
    (16, 768, 12): "vit_b_16",
    (32, 768, 12): "vit_b_32",
    (16, 1024, 24): "vit_l_16",
    (32, 1024, 24): "vit_l_32",
    (14, 1280, 32): "vit_h_14",
}
# torchvision Swin builders by (embed dim, blocks per stage, v2).
_TV_SWIN = {
    (96, (2, 2, 6, 2), False): "swin_t",
    (96, (2, 2, 18, 2), False): "swin_s",
    (128, (2, 2, 18, 2), False): "swin_b",
    (96, (2, 2, 6, 2), True): "swin_v2_t",
    (96, (2, 2, 18, 2), True): "swin_v2_s",
    (128, (2, 2, 18, 2), True): "swin_v2_b",
}


def _torchvision_builder(model: nn.Module) -> str | None:
    name = type(model).__name__
    if name == "VisionTransformer":
        layers = getattr(getattr(model, "encoder", None), "layers", None)
        key = (getattr(model, "patch_size", None), getattr(model, "hidden_dim", None))
        return _TV_VIT.get((*key, len(layers) if layers is not None else -1))
    if name == "SwinTransformer":
        features = getattr(model, "features", None)
        try:
            embed = features[0][0].out_channels
            depths = tuple(len(features[i]) for i in range(1, len(features), 2))
        except (TypeError, IndexError, AttributeError):
            return None
        v2 = any("V2" in type(m).__name__ for m in model.modules())
        return _TV_SWIN.get((embed, depths, v2))
    return None


def model_identity(model: nn.Module) -> dict[str, Any]:
    """The identity of ``model`` as far as its library records it (``{}`` if nothing is known)."""
    cfg = getattr(model, "pretrained_cfg", None)
    if isinstance(cfg, dict) and cfg.get("architecture"):
        found = {"library": "timm", "architecture": cfg["architecture"]}
        for key, field in (("tag", "tag"), ("hub_id", "hf_hub_id")):
            if cfg.get(field):
                found[key] = cfg[field]
        return found
    module = type(model).__module__
    if module.startswith("torchvision."):
        builder = _torchvision_builder(model)
        return {"library": "torchvision", "architecture": builder} if builder else {}
    config = getattr(model, "config", None)
    if module.startswith("transformers.") and config is not None:
        found = {"library": "transformers", "architecture": type(model).__name__}
        name_or_path = getattr(config, "_name_or_path", "") or getattr(model, "name_or_path", "")
        if name_or_path:
            found["name_or_path"] = str(name_or_path)
        return found
    return {}


def check_identity(
    stored: dict[str, Any], actual: dict[str, Any]
) -> tuple[str | None, str | None, bool]:
    """``(refusal, warning, same architecture)`` for loading a file of identity ``stored`` into
    a model of identity ``actual``."""
    if not stored or not actual or stored.get("library") != actual.get("library"):
        return None, None, False  # nothing to compare: the width fingerprint still applies
    if stored.get("architecture") != actual.get("architecture"):
        return (
            f"it was trained on {stored.get('library')} {stored.get('architecture')!r} and the "
            f"model is {actual.get('architecture')!r}. Build the model it belongs to, or pass "
            "check_model=False if you are sure (the widths agree)",
            None,
            False,
        )
    for key in ("tag", "hub_id", "name_or_path"):
        # Only a file that names its weights can disagree (one built from a config names none).
        if stored.get(key) and stored.get(key) != actual.get(key):
            return (
                None,
                f"the adapter was trained on {stored.get('architecture')} with {key} "
                f"{stored.get(key)!r}; the model has {actual.get(key)!r} (other pretrained "
                "weights: the adapter may not fit them)",
                True,
            )
    return None, None, True


def _words(key: str) -> str:
    return re.sub(r"[._]", "_", key)


def remap_keys(found: set[str], expected: set[str]) -> dict[str, str]:
    """``{file key: model key}`` for a model that holds the same blocks under other names.

    timm's ``features_only=True`` wraps the network (``model.blocks.0...``) or flattens its
    stages (``layers_0.blocks.0...``); a transformers classifier holds its base model under a
    prefix (``vit.``). A file key maps to the one model key that ends with it once dots and
    underscores are read alike, at a name boundary, or, for a file saved from the wrapping form
    and loaded into the bare one, the other way round; keys already equal map to themselves.
    Returns only a complete, one-to-one mapping, else ``{}``.
    """
    if found == expected:
        return {k: k for k in found}
    forward = _suffix_mapping(found, expected)
    if forward:
        return forward
    # The index is then built from the file's keys: bounded by the model's own key lengths, so
    # a hostile file's long keys cost nothing (a wrapper adds a short prefix).
    longest = max((len(k) for k in expected), default=0) + 200
    if any(len(k) > longest for k in found):
        return {}
    backward = _suffix_mapping(expected, found)  # {model key: file key}
    return {file_key: model_key for model_key, file_key in backward.items()}


def _suffix_mapping(found: set[str], expected: set[str]) -> dict[str, str]:
    """``{key of found: the one key of expected that ends with it}``, complete and one-to-one,
    else ``{}``."""
    if len(found) != len(expected):  # a complete one-to-one mapping needs as many keys
        return {}
    # Every model key under each of its word-boundary suffixes: a file key is then looked up
    # once (comparing it with every model key made a hostile file quadratic in its keys). The
    # index is the model's, so its size depends on the model alone.
    by_suffix: dict[str, list[str]] = {}
    for key in expected:
        words = _words(key)
        by_suffix.setdefault(words, []).append(key)
        for i, ch in enumerate(words):
            if ch == "_":
                by_suffix.setdefault(words[i + 1 :], []).append(key)
    mapping: dict[str, str] = {}
    for key in found:
        hits = by_suffix.get(_words(key), [])
        if len(hits) != 1:
            return {}
        mapping[key] = hits[0]
    if len(set(mapping.values())) != len(mapping) or set(mapping.values()) != expected:
        return {}
    return mapping


def qualified(cls: type) -> str:
    """``module.qualname`` of a class: how files name architectures."""
    return f"{cls.__module__}.{cls.__qualname__}"


def inner_models(model: nn.Module, architecture: Any) -> list[nn.Module]:
    """The outermost proper submodules of ``model`` of class ``architecture``
    (``module.qualname``)."""
    if not isinstance(architecture, str):
        return []
    found: list[tuple[str, nn.Module]] = []
    for path, module in model.named_modules():
        if not path or any(path.startswith(f"{p}.") for p, _ in found):
            continue
        if qualified(type(module)) == architecture:
            found.append((path, module))
    return [module for _, module in found]


def wraps(model: nn.Module, architecture: Any) -> bool:
    """Whether ``model`` is, or wraps, a module of class ``architecture`` (``module.qualname``),
    as timm's ``features_only=True`` wraps the network."""
    return isinstance(architecture, str) and any(
        qualified(type(m)) == architecture for m in model.modules()
    )


def describe(model: dict[str, Any], metadata: dict[str, Any]) -> list[tuple[str, str]]:
    """Rows for ``arc_peft.AdapterInfo``'s summary (model identity, user metadata), in the
    ``(label, text)`` form of its other rows."""
    rows = []
    if model:
        known = [f"{k} {model[k]}" for k in ("tag", "hub_id", "name_or_path") if k in model]
        extra = f" ({', '.join(known)})" if known else ""
        rows.append(("model", f"{model.get('library')} {model.get('architecture')}{extra}"))
    for key, value in metadata.items():
        text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
        rows.append((f"[{key}]", text if len(text) <= 100 else text[:97] + "..."))
    return [(printable(label), printable(text)) for label, text in rows]


def user_metadata(metadata: Mapping[str, Any] | None) -> str | None:
    """``save_adapter(metadata=...)`` as the JSON text stored in the file (``None``: none)."""
    if metadata is None:
        return None
    if not isinstance(metadata, Mapping):
        raise TypeError(f"save_adapter: metadata must be a dict, got {type(metadata).__name__}")
    try:
        return json.dumps(dict(metadata), sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(
            "save_adapter: metadata must be JSON-serialisable (str, numbers, lists, dicts; no "
            f"NaN): {exc}"
        ) from None


def json_object(metadata: Mapping[str, str], key: str) -> dict[str, Any]:
    """The optional JSON-object field ``key`` of a file's metadata (``{}`` when absent);
    ``ValueError`` if it is not a JSON object."""
    if key not in metadata:
        return {}
    try:
        value = json.loads(metadata[key])
    except (ValueError, RecursionError) as exc:
        raise ValueError(f"{key} is not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{key} must be a JSON object")
    return value
