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
import re
import tempfile
import warnings
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import timm
import torch

from ..errors import printable
from ..runtime.heads import features_into
from . import rebuild
from .atomic import replace_folder, write_atomic
from .format import FileProblem, about
from .info import read_adapter_info
from .loading import load_adapter
from .saving import save_adapter
from .sources import ADAPTER_FILE, CONFIG_FILE, HUB_PREFIX, hub_client, resolve

if TYPE_CHECKING:
    from torch import nn

__all__ = ["build_timm", "create_model", "push_adapter_to_hub", "save_adapter_folder", "timm_name"]

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
    folder; ``arc_peft.load_adapter`` and ``create_model`` read it directly.

    The folder is replaced whole and atomically (``arc_peft.io.atomic.replace_folder``): the three
    files are written and ``fsync``ed into a new folder next to it, which then takes its place
    in one step, so a reader, a crash or a concurrent save never leaves a mix of two saves;
    links in the old folder are discarded, not followed. A folder holding other files is
    refused (``ValueError``): they would be lost."""

    def write(into: str) -> None:
        file = os.path.join(into, ADAPTER_FILE)
        save_adapter(model, file, name=name, metadata=metadata)
        info = read_adapter_info(file)
        config = info.to_dict()
        config.pop("path")
        text = json.dumps(config, indent=2, sort_keys=True) + "\n"
        write_atomic(os.path.join(into, CONFIG_FILE), text.encode("utf-8"))
        write_atomic(os.path.join(into, CARD_FILE), _card(info, repo_id).encode("utf-8"))

    folder = os.fspath(folder)
    replace_folder(folder, write, own=(ADAPTER_FILE, CONFIG_FILE, CARD_FILE))
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
    source: str | os.PathLike[str], pretrained: bool | None = None, **kwargs: Any
) -> nn.Module:
    """Build the backbone an adapter file records and load the adapter into it, in one call.

    Args:
        source: An adapter file, a folder holding one, or ``"hf-hub:user/repo"``.
        pretrained: Load the backbone's pretrained weights (the tag the adapter was trained
            on). Default: as the file records (a file saved from a randomly initialised
            backbone rebuilds one; files that do not say load the weights). ``False`` builds
            it randomly initialised (tests, offline use).
        kwargs: Passed on to ``timm.create_model``, over the builder arguments the file records
            (those that differed from the entrypoint's defaults: ``img_size``, ``patch_size``,
            ``depth``...), so the model is built as the adapter's backbone was. A file that
            records that its backbone had other changes warns (pass them here).

    Only timm backbones can be built from the file alone (their identity names the model and
    its pretrained tag); for others build the model yourself and call
    ``arc_peft.load_adapter``. The name must be a model (and tag) of the installed timm's own
    registry: a file naming ``local-dir:...`` or another ``hf-hub:...`` source is refused
    (``AdapterFileError``) before timm is called. The head's classes come from the file once
    a headless meta-device copy of the model shows that its input width is the file's.
    """
    file = resolve(source)
    info = read_adapter_info(file)
    model_id = info.model
    if model_id.get("library") != "timm":
        raise ValueError(
            printable(
                f"{source}: create_model builds timm backbones; this adapter was trained on "
                f"{model_id.get('library') or 'an unrecorded'} model "
                f"({model_id.get('architecture') or info.backbone.get('architecture')}): build "
                "it yourself and call arc_peft.load_adapter(model, ...)"
            )
        )
    with about(file):
        name = timm_name(model_id)
        args = {**rebuild.checked_arguments(model_id), **kwargs}
        trained_on = model_id.get("pretrained")
        if pretrained is None:
            pretrained = trained_on is not False
        elif pretrained and trained_on is False:
            warnings.warn(
                f"{source}: the adapter was trained on a randomly initialised {name} (its norm "
                "layers were at their initial values); loading pretrained weights it never saw. "
                "Pass pretrained=False (or leave it out) to rebuild the backbone it was trained on",
                stacklevel=2,
            )
        if model_id.get("args_complete") is False and not kwargs:
            warnings.warn(
                f"{source}: the adapter's {name} was built with arguments arc_peft could not "
                f"record (it records {args or 'none'}); the model may not be the one it was "
                "trained on. Pass the builder arguments to create_model(source, ...) yourself",
                stacklevel=2,
            )
        model = build_timm(name, info, pretrained=pretrained, **args)
    return load_adapter(model, file)


# What a file may name for create_model: a model of timm's own registry and a pretrained tag of
# it; never "local-dir:..." or another "hf-hub:..." (timm would read that folder's config and
# weights, or query a second repository, on the file's word).
_TIMM_NAME = re.compile(r"[A-Za-z0-9_]{1,200}")
_TIMM_TAG = re.compile(r"[A-Za-z0-9_]{1,200}(?:[.-][A-Za-z0-9_]{1,200}){0,8}")


def timm_name(model_id: dict[str, Any]) -> str:
    """The timm model name (``architecture.tag``) a file's identity records, if timm's own
    registry knows it; ``FileProblem`` otherwise (nothing is read or downloaded)."""
    arch, tag = model_id.get("architecture"), model_id.get("tag")
    known = isinstance(arch, str) and bool(_TIMM_NAME.fullmatch(arch)) and timm.is_model(arch)
    if known and tag is not None:
        known = isinstance(tag, str) and bool(_TIMM_TAG.fullmatch(tag))
        try:
            known = known and timm.models.get_pretrained_cfg(f"{arch}.{tag}") is not None
        except RuntimeError:  # timm: "Invalid pretrained tag"
            known = False
    if not known:
        shown = repr(f"{arch}.{tag}" if tag is not None else arch)[:200]
        raise FileProblem(
            f"it names the timm model {shown}, which is not in this timm's registry "
            f"(timm {timm.__version__}). create_model builds only registered models; build "
            "the backbone yourself and call arc_peft.load_adapter(model, path)"
        )
    return f"{arch}.{tag}" if tag else arch


def head_size(head: dict[str, Any]) -> tuple[int, int]:
    """``(classes, features)`` of a file's stored head (its last linear layer's weight), checked
    to be one a linear layer has; ``FileProblem`` otherwise."""
    weights = sorted(k for k in head["shapes"] if k.endswith("weight"))
    shape = head["shapes"][weights[-1]] if weights else None
    bias = head["shapes"].get(f"{weights[-1][: -len('weight')]}bias") if weights else None
    if shape is None or len(shape) != 2 or min(shape) < 1 or bias not in (None, shape[:1]):
        raise FileProblem(
            f"its head is not a classifier's (a last weight of shape [classes >= 1, features "
            f">= 1] and a bias of [classes]); it holds {str(head['shapes'])[:200]}"
        )
    return shape[0], shape[1]


def build_timm(name: str, info: Any, pretrained: bool, **kwargs: Any) -> nn.Module:
    """``timm.create_model(name, ...)`` with the classes of the file's head (unless ``kwargs``
    says ``num_classes``), once a headless copy built on the meta device (no memory, the global
    RNG put back) shows that the head's input width is the file's: a head claiming 2**40
    classes is refused (``FileProblem``), not allocated."""
    if info.head is None or "num_classes" in kwargs:
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    classes, features = head_size(info.head)
    try:
        with torch.random.fork_rng(devices=[]), torch.device("meta"):
            headless = timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
    except (RuntimeError, NotImplementedError):  # a constructor that computes on its tensors
        with torch.random.fork_rng(devices=[]):  # the model's own size, not the file's
            headless = timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
    width = features_into(headless)
    del headless
    if width != features:
        raise FileProblem(
            f"its head takes {features} features but {name} gives its head {width}: the file "
            "was made for another backbone"
        )
    return timm.create_model(name, pretrained=pretrained, num_classes=classes, **kwargs)
