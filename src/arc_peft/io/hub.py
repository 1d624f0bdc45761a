"""Sharing adapters on the Hugging Face Hub, as timm and peft users expect.

A repo written here holds three files::

    adapter.safetensors    the adapter file (see docs/file-format.md)
    adapter_config.json    method, config, backbone identity, counts, metadata (small, readable)
    README.md              a generated model card

``huggingface_hub`` is an optional extra (``pip install "arc-peft[hub]"``), imported only when
a Hub repo is named: local files and folders never need it.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import timm

from .info import read_adapter_info
from .loading import load_adapter
from .saving import save_adapter
from .sources import ADAPTER_FILE, CONFIG_FILE, HUB_PREFIX, hub_client, resolve

if TYPE_CHECKING:
    from torch import nn

__all__ = ["create_model", "push_adapter_to_hub", "save_adapter_folder"]

CARD_FILE = "README.md"


def _card(info: Any, repo_id: str | None) -> str:
    """The generated model card (Markdown with the Hub's YAML header)."""
    model = info.model or {}
    base = model.get("hub_id") or model.get("name_or_path") or model.get("architecture")
    tags = ["arc-peft", info.method, "image-classification"]
    lines = ["---", "library_name: arc-peft", "tags:"] + [f"- {t}" for t in tags]
    if model.get("library") == "timm" and model.get("hub_id"):
        lines.append(f"base_model: {model['hub_id']}")
    lines += ["---", "", f"# {repo_id or info.name}", ""]
    lines.append(
        f"An arc_peft **{info.method}** adapter ({info.config}) for "
        f"`{base or info.backbone.get('architecture')}`: {info.adapter_parameters:,} adapter "
        f"parameters, {info.head_parameters:,} head parameters, {info.file_size:,} bytes."
    )
    metrics = info.metadata.get("metrics")
    if isinstance(metrics, Mapping) and metrics:
        lines += ["", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in metrics.items()]
    source = f"{HUB_PREFIX}{repo_id}" if repo_id else "path/to/this/folder"
    lines += [
        "",
        "## Use",
        "",
        "```python",
        "import arc_peft",
        "",
        f'model = arc_peft.create_model("{source}")  # backbone + adapter + head',
        "```",
        "",
    ]
    return "\n".join(lines)


def save_adapter_folder(
    model: nn.Module,
    folder: str | os.PathLike[str],
    name: str | None = None,
    metadata: Mapping[str, Any] | None = None,
    repo_id: str | None = None,
) -> str:
    """Write adapter ``name`` as a Hub repo's files into ``folder`` (created if needed):
    ``adapter.safetensors``, ``adapter_config.json`` and a generated ``README.md``. Returns the
    folder; ``arc_peft.load_adapter`` and ``create_model`` read it directly."""
    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    file = os.path.join(folder, ADAPTER_FILE)
    save_adapter(model, file, name=name, metadata=metadata)
    info = read_adapter_info(file)
    config = info.to_dict()
    config.pop("path")
    with open(os.path.join(folder, CONFIG_FILE), "w", encoding="utf-8") as handle:
        json.dump(config, handle, indent=2, sort_keys=True)
        handle.write("\n")
    with open(os.path.join(folder, CARD_FILE), "w", encoding="utf-8") as handle:
        handle.write(_card(info, repo_id))
    return folder


def push_adapter_to_hub(
    model: nn.Module,
    repo_id: str,
    name: str | None = None,
    metadata: Mapping[str, Any] | None = None,
    *,
    private: bool | None = None,
    token: str | None = None,
    commit_message: str = "Upload arc_peft adapter",
) -> str:
    """Push adapter ``name`` (default: the active one) to the Hub repo ``repo_id``, created if
    needed: the adapter file, its JSON config and a model card naming the backbone, method,
    parameter count and any ``metadata["metrics"]``. Returns the commit URL.

    Load it back with ``arc_peft.load_adapter(model, "hf-hub:" + repo_id)``, or build backbone
    and adapter in one call with ``create_model``.
    """
    hub = hub_client()
    api = hub.HfApi(token=token)
    with tempfile.TemporaryDirectory() as folder:
        save_adapter_folder(model, folder, name=name, metadata=metadata, repo_id=repo_id)
        api.create_repo(repo_id, private=private, exist_ok=True)
        commit = api.upload_folder(
            repo_id=repo_id, folder_path=folder, commit_message=commit_message
        )
    return str(getattr(commit, "commit_url", commit))


def create_model(
    source: str | os.PathLike[str], pretrained: bool = True, **kwargs: Any
) -> nn.Module:
    """Build the backbone an adapter file records and load the adapter into it, in one call.

    Args:
        source: An adapter file, a folder holding one, or ``"hf-hub:user/repo"``.
        pretrained: Load the backbone's pretrained weights (the tag the adapter was trained
            on). ``False`` builds it randomly initialised (tests, offline use).
        kwargs: Passed on to ``timm.create_model`` (e.g. ``img_size`` for a custom size).

    Only timm backbones can be built from the file alone (their identity names the model and
    its pretrained tag); for others build the model yourself and call
    ``arc_peft.load_adapter``.
    """
    file = resolve(source)
    info = read_adapter_info(file)
    model_id = info.model
    if model_id.get("library") != "timm":
        raise ValueError(
            f"{source}: create_model builds timm backbones; this adapter was trained on "
            f"{model_id.get('library') or 'an unrecorded'} model "
            f"({model_id.get('architecture') or info.backbone.get('architecture')}): build it "
            "yourself and call arc_peft.load_adapter(model, ...)"
        )
    name = model_id["architecture"]
    if model_id.get("tag"):
        name = f"{name}.{model_id['tag']}"
    if info.head is not None and "num_classes" not in kwargs:
        # The stored head decides the classes; the model's own head then has the same shape.
        weight = [s for k, s in info.head["shapes"].items() if k.endswith("weight")]
        if weight:
            kwargs["num_classes"] = weight[-1][0]
    model = timm.create_model(name, pretrained=pretrained, **kwargs)
    return load_adapter(model, file)
