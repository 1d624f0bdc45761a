"""Writing adapter files: one small safetensors file per task, holding the adapter (and by default
the classifier head) and enough metadata to rebuild and check it without the training code::

    arc_peft.save_adapter(model, "cifar100.safetensors")

The format is specified in ``docs/file-format.md``. A save never leaves a half-written file at the
destination (``arc_peft.io.atomic``).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from typing import Any

import safetensors.torch
import torch
from torch import Tensor, nn

from ..errors import printable
from ..runtime import foreign, heads
from ..runtime.heads import get_head
from ..runtime.multitask import active_adapter
from ..runtime.slots import adapter_configs
from ..runtime.wrappers import adapted_model, full_tensor, is_sharded, reshard
from ..state import TRAINED_ATTR, __version__
from . import identity, layout, rebuild, taskfiles
from .atomic import write_atomic
from .format import (
    DIGEST_FIELD,
    FORMAT_NAME,
    FORMAT_VERSION,
    FileProblem,
    check_metadata,
    outermost,
    parse_header,
    parse_metadata,
)
from .info import identity_fields

__all__ = ["save_adapter"]


def _resolve_name(model: nn.Module, name: str | None) -> str:
    configs = adapter_configs(model)
    if name is not None:
        if name not in configs:
            raise KeyError(f"model has no adapter named {name!r}; it has {sorted(configs)}")
        return name
    active = active_adapter(model)
    if active is not None:
        return active
    if len(configs) == 1:
        return next(iter(configs))
    if not configs:
        raise ValueError(
            f"save_adapter: {type(model).__name__} has no adapters; inject one first "
            "(arc_peft.inject_arc)"
        )
    raise ValueError(
        f"save_adapter: no adapter is active and the model has several {sorted(configs)}: "
        "pass name=... to choose the one to save"
    )


def _serialize(tensors: dict[str, Tensor], metadata: dict[str, str]) -> bytes:
    """safetensors bytes with a deterministic header.

    The tensor bytes and their layout come from the safetensors library; the header is re-emitted
    here with sorted metadata because the library writes metadata in hash order, which would make
    the same weights give different bytes from one run to the next.
    """
    raw = safetensors.torch.save(tensors)
    size = int.from_bytes(raw[:8], "little")
    entries = json.loads(raw[8 : 8 + size])
    data = raw[8 + size :]
    # A digest of the tensor bytes: a file damaged after it was written (a truncated copy, a
    # flipped disk block, zeroed pages) is refused on load, not silently loaded.
    metadata = {**metadata, DIGEST_FIELD: hashlib.sha256(data).hexdigest()}
    header: dict[str, Any] = {"__metadata__": dict(sorted(metadata.items()))}
    for key in sorted(entries, key=lambda k: (entries[k]["data_offsets"][0], k)):
        header[key] = entries[key]
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=True).encode("utf-8")
    text += b" " * (-len(text) % 8)  # keep the data 8-byte aligned, as safetensors does
    return len(text).to_bytes(8, "little") + text + data


def save_adapter(
    model: nn.Module,
    path: str | os.PathLike[str],
    name: str | None = None,
    include_head: bool = True,
    metadata: Mapping[str, Any] | None = None,
) -> None:
    """Save one adapter (and by default the classifier head) to a safetensors file.

    Nothing else of the model is stored: a ViT-B/16 ARC adapter with a 100-class head is about
    0.69 MB. The write is atomic: a failure leaves an existing file at ``path`` untouched.
    The same weights always give the same bytes. Modules trained with
    ``freeze_backbone(also=...)`` are stored too.

    ``torch.compile``, DDP and ``DataParallel`` wrappers are looked through (the file holds the
    plain model's keys). With FSDP2 (``fully_shard``) call it on every rank: the shards are
    gathered (a collective) and rank 0 writes the file.

    Args:
        model: A model holding the adapter (or a wrapper of one).
        path: Destination file (conventionally ``*.safetensors``).
        name: The adapter to save; default: the active adapter, or the only one if none is
            active.
        include_head: Also store the classifier head that runs while the adapter is active
            (its own, see ``arc_peft.add_head``, or the model's).
        metadata: Free-form JSON-serialisable facts to keep in the file (class names, dataset,
            metrics); ``read_adapter_info`` and ``arc-peft inspect`` show them.

    The file also records the backbone's identity where its library gives one (timm model name
    and pretrained tag, torchvision builder, Hugging Face ``name_or_path``).

    Raises:
        KeyError: the model has no adapter called ``name``.
        ValueError: ``name`` is ``None`` and no single adapter can be chosen, a weight is NaN
            or infinite (such a file could not be loaded back), or, after
            ``arc_peft.freeze_backbone``, a parameter the file would not hold is trainable.
        OSError: the file cannot be written.
    """
    if isinstance(path, nn.Module) and not isinstance(model, nn.Module):
        raise TypeError(
            f"save_adapter(model, path): the arguments are swapped (got a {type(model).__name__} "
            f"first and a {type(path).__name__} second); call arc_peft.save_adapter(model, path)"
        )
    model = adapted_model(model)  # through DDP/compile, and a LightningModule's .model
    reshard(model)  # FSDP2: read the kept shards, not unsharded copies about to be freed
    name = _resolve_name(model, name)
    config = adapter_configs(model)[name]
    state = dict(layout.adapter_state(model, name))
    head_path, head_state = taskfiles.head_state(model, name) if include_head else ("", {})
    trained_paths, trained_state = layout.trained_state(model, exclude=set(head_state))
    trained_paths, trained_state = taskfiles.with_owned(
        model, name, trained_paths, trained_state, exclude=set(head_state)
    )
    trained_paths = outermost(trained_paths)  # a module inside another is stored with it
    user = identity.user_metadata(metadata)
    clash = sorted(set(state) & (set(head_state) | set(trained_state)))
    if clash:
        raise ValueError(f"save_adapter: head or trained keys {clash} collide with adapter keys")
    _check_nothing_lost(model, head_state, trained_state)
    state.update(head_state)
    state.update(trained_state)
    sharded = any(is_sharded(v) for v in state.values())
    # FSDP2 shards: gather the whole tensors (a collective, so every rank is in this call).
    tensors = {k: full_tensor(v.detach()) for k, v in state.items()}
    key = layout.first_non_finite(tensors)
    if key is not None:
        raise ValueError(
            f"save_adapter: {key} holds NaN or infinite values; the file could not be "
            "loaded back. Check the training run (learning rate, AMP overflow)."
        )
    if sharded and torch.distributed.get_rank() != 0:
        return  # every rank holds the same gathered tensors; one of them writes
    dtypes = sorted({layout.dtype_name(v.dtype) for v in tensors.values()})

    def group(where: str, located: Any, keys: dict[str, Tensor]) -> dict[str, Any] | None:
        shapes = {k: list(tensors[k].shape) for k in sorted(keys)}
        return {where: located, "shapes": shapes} if keys else None

    fields = {
        "format": FORMAT_NAME,
        "format_version": str(FORMAT_VERSION),
        "arc_peft_version": __version__,
        "name": name,
        "method": config.method,
        "config": config.to_json(),
        "backbone": json.dumps(layout.backbone_fingerprint(model), sort_keys=True),
        "head": json.dumps(group("module", head_path, head_state), sort_keys=True),
        "dtype": ",".join(dtypes),
        "model": json.dumps(_identity(model), sort_keys=True),
    }
    if user is not None:
        fields["user"] = user
    if trained_state:  # only then: files without trained modules keep their exact bytes
        fields["trained"] = json.dumps(
            group("modules", trained_paths, trained_state), sort_keys=True
        )
    # Own contiguous CPU copies: safetensors refuses views and tensors sharing storage.
    cpu = {k: v.to("cpu", copy=True).contiguous() for k, v in tensors.items()}
    data = _serialize(cpu, fields)
    _check_readable(data)
    write_atomic(os.fspath(path), data)


def _identity(model: nn.Module) -> dict[str, Any]:
    """The model's identity, and for timm models what rebuilds it: the builder arguments that
    differ from the entrypoint's defaults and whether pretrained weights were loaded
    (``io.rebuild``)."""
    found = identity.model_identity(model)
    if found.get("library") != "timm":
        return found
    built = rebuild.build_arguments(model, found["architecture"])
    if built is not None:
        args, complete = built
        if args:
            found["args"] = args
        if not complete:
            found["args_complete"] = False
    pretrained = rebuild.pretrained_weights(model)
    if pretrained is not None:
        found["pretrained"] = pretrained
    return found


def _check_readable(data: bytes) -> None:
    """Refuse to write what ``read_adapter_info`` / ``load_adapter`` would refuse (a header over
    the size limit, metadata nested too deeply...): the reader's own checks on the header."""
    size = int.from_bytes(data[:8], "little")
    try:
        header = parse_header(data[: 8 + size], len(data))
        check_metadata(header)
        parse_metadata(header)
        identity_fields(header)
    except FileProblem as exc:
        raise ValueError(
            "save_adapter: arc_peft could not read this file back, so it is not written: "
            f"{printable(str(exc))[:500]}. Store less metadata (or less deeply nested) with it"
        ) from None


def _check_nothing_lost(
    model: nn.Module, head_state: dict[str, Tensor], trained_state: dict[str, Tensor]
) -> None:
    """After ``freeze_backbone``, refuse to save if a parameter was made trainable behind its
    back: the file would not reproduce the trained model. (Without ``freeze_backbone`` the whole
    model is trainable by default and nothing can be inferred.)"""
    if TRAINED_ATTR not in model.__dict__:
        return
    head = get_head(model)
    stored = (*head_state.values(), *trained_state.values())
    kept = layout.adapter_tensor_ids(model) | {id(t) for t in stored}
    kept |= {id(p) for p in head.parameters()} if head is not None else set()
    kept |= {id(p) for p in heads.task_parameters(model)}  # other tasks' heads are theirs
    # peft's layers (LoRA added after arc_peft) are peft's to save, with its own save_pretrained.
    kept |= {id(p) for m in foreign.foreign_layers(model).values() for p in m.parameters()}
    lost = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in kept]
    if lost:
        more = f" and {len(lost) - 5} more" if len(lost) > 5 else ""
        raise ValueError(
            f"save_adapter: {', '.join(lost[:5])}{more} are trainable but would not be saved, "
            "so the file could not reproduce the trained model. Name their modules in "
            "freeze_backbone(model, also=[...]) (those are stored), or freeze them"
        )
