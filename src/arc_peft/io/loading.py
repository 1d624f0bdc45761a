"""Reading adapter files back into a model::

    fresh = timm.create_model("vit_base_patch16_224", pretrained=True, num_classes=100)
    arc_peft.load_adapter(fresh, "cifar100.safetensors")     # injects, then loads

Files are never unpickled, and a load validates everything before it changes the model
(``io/format.py`` parses and bounds the file, ``io/layout.py`` matches it).
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import AdapterFileError, printable
from ..inject import delete_adapter, inject_arc
from ..runtime import heads
from ..runtime.heads import find_head
from ..runtime.multitask import active_adapter, set_active_adapter
from ..runtime.slots import adapter_configs, check_name, iter_slots
from ..runtime.wrappers import adapted_model, check_injectable, is_sharded, reshard
from ..state import DEFAULT_ADAPTER
from . import identity, layout, taskfiles
from .format import (
    Contents,
    FileProblem,
    Header,
    about,
    check_metadata,
    open_regular,
    parse_metadata,
    read_header,
    read_tensors,
)
from .info import identity_fields, read_adapter_info
from .sources import resolve

__all__ = ["load_adapter"]


def _stage(target: Tensor, source: Tensor) -> Tensor:
    return source.to(device=target.device, dtype=target.dtype)


def _copy(target: Tensor, value: Tensor) -> None:
    if is_sharded(target):  # FSDP2: every rank read the whole file; keep this rank's shard
        from torch.distributed.tensor import distribute_tensor

        value = distribute_tensor(value, target.device_mesh, target.placements, src_data_rank=None)
    target.copy_(value)


@contextlib.contextmanager
def _rng_untouched(model: nn.Module) -> Iterator[None]:
    """Keep the global RNG as it was: injection initialises weights that are overwritten anyway,
    and loading a file should not change the random draws of the code that follows."""
    cuda = sorted({t.device.index or 0 for t in model.parameters() if t.device.type == "cuda"})
    with torch.random.fork_rng(devices=cuda):
        yield


def load_adapter(
    model: nn.Module,
    path: str | os.PathLike[str],
    name: str = DEFAULT_ADAPTER,
    activate: bool | None = None,
    load_head: bool = True,
    check_model: bool = True,
) -> nn.Module:
    """Load an adapter file into ``model``: inject from the stored config, then copy the weights.

    If ``model`` already has an adapter ``name`` with the same config, its weights are replaced;
    with a different config this is an error. The load is all-or-nothing: the file is parsed and
    checked (keys, shapes, finite values, backbone fingerprint, head shape) before the model
    changes, and on any error the model is left exactly as it was. Tensors are converted to the
    device and dtype of the model's parameters they replace (and checked for NaN/inf after the
    conversion). Modules trained with ``freeze_backbone(also=...)`` that the file stores are
    loaded too. Every bad file is an ``AdapterFileError``, found in bounded time
    and memory (see the limits in the file-format docs).

    ``model`` may be a ``torch.compile`` / DDP / ``DataParallel`` wrapper or an FSDP2-sharded
    model if it already holds adapter ``name`` (its weights are replaced); injecting into one
    is refused.

    The classifier head stored in the file (if any) goes with the adapter. Into a model with no
    other adapter, a head of the model's shape is copied into the model's head; otherwise (other
    tasks on the backbone, or another number of classes) it becomes the adapter's own head,
    which runs whenever ``name`` is active and for its samples of a
    ``arc_peft.mixed_batch`` (see ``arc_peft.add_head``). Modules trained with
    ``freeze_backbone(also=...)`` are treated the same way. A model without a classifier (timm
    ``features_only=True``) takes the adapter alone; its blocks may be named differently.

    The file's recorded backbone identity must match: another architecture is refused (even
    with the same widths: ``vit_tiny`` vs ``deit_tiny``), another pretrained tag or hub id warns.

    Args:
        model: A plain backbone built like the one the adapter was trained on, or one that
            already holds adapters.
        path: The adapter file (from ``save_adapter``), a folder holding
            ``adapter.safetensors``, or ``"hf-hub:user/repo"`` (see
            ``arc_peft.push_adapter_to_hub``).
        name: Name to load the adapter under.
        activate: ``True``: make it the active adapter; ``False``: leave the active adapter as
            it was before the call (none, if there was none); ``None`` (default): as
            ``arc_peft.inject_arc`` does, a newly injected adapter becomes active only if
            no other adapter is active.
        load_head: Load the stored classifier head (``False``: the adapter runs with the
            model's head).
        check_model: Refuse a file recorded for another architecture (``False``: only the
            block count and widths must agree).

    Returns:
        ``model`` itself.

    Raises:
        AdapterFileError: the file is not a regular file, unreadable as an adapter file,
            corrupt, from a newer format, or does not fit ``model`` (other backbone, other head,
            other config under ``name``).
        ValueError: ``name`` is not a valid adapter name, or the adapter would have to be
            injected into a wrapped or sharded model.
        OSError: the file cannot be opened.
    """
    if isinstance(path, nn.Module) and not isinstance(model, nn.Module):
        raise TypeError(
            f"load_adapter(model, path): the arguments are swapped (got a {type(model).__name__} "
            f"first and a {type(path).__name__} second); call "
            "arc_peft.load_adapter(model, path)"
        )
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"load_adapter expects the model (an nn.Module) first, got {type(model).__name__}"
        )
    path = resolve(path)
    wrapper, model = model, _target(model, path)
    check_name(name)
    # A refused load leaves the model as it was, down to its attributes (the site plan a check
    # computed and keeps on the model) and the global RNG (building a head of another shape
    # draws its initial weights, which the file's then replace).
    before = dict(model.__dict__)
    try:
        with _rng_untouched(model):
            _load(model, wrapper, path, name, activate, load_head, check_model)
    except BaseException:
        for key in [k for k in model.__dict__ if k not in before]:
            del model.__dict__[key]
        for key, value in before.items():
            if model.__dict__.get(key, _MISSING) is not value:
                model.__dict__[key] = value
        raise
    return wrapper


_MISSING = object()


def _target(model: nn.Module, path: str) -> nn.Module:
    """The model to load into: the adapted model inside ``model`` (``adapted_model``), or, for
    a container with no adapter yet and no head of its own (a LightningModule holding a fresh
    backbone), the one submodule of the class the file was saved from: so that the adapters
    sit on it, as if loaded into it directly, and later saves record it."""
    model = adapted_model(model)
    if iter_slots(model) or find_head(model) is not None:
        return model
    try:
        architecture = read_adapter_info(path).backbone.get("architecture")
    except (AdapterFileError, OSError):
        return model  # the load itself reports the file's problem
    inner = identity.inner_models(model, architecture)
    return inner[0] if len(inner) == 1 else model


def _load(
    model: nn.Module,
    wrapper: nn.Module,
    path: str,
    name: str,
    activate: bool | None,
    load_head: bool,
    check_model: bool,
) -> None:
    reshard(model)  # FSDP2: write into the kept shards, not unsharded copies about to be freed
    with about(path):
        with open_regular(path) as handle:
            header = read_header(handle)
            check_metadata(header)
            contents = parse_metadata(header)
            head, trained, to_own = taskfiles.load_plan(
                model, name, contents.head if load_head else None, contents.trained
            )
            # Everything the header can tell is checked before the data is read or anything built.
            expected, needs_inject, warning = _check_against_model(
                model, header, contents, name, head, trained, check_model
            )
            try:
                taskfiles.check_owned(model, to_own)
            except ValueError as exc:
                raise FileProblem(str(exc)) from None
            if warning:
                # stacklevel 3: the user's call, above load_adapter and _load
                warnings.warn(printable(f"{path}: {warning}"), stacklevel=3)
            if needs_inject:
                check_injectable(wrapper, "load_adapter", stacklevel=4)
            tensors = read_tensors(handle, header)
        try:
            owned = taskfiles.build_owned(model, to_own, tensors)
        except ValueError as exc:
            raise FileProblem(str(exc)) from None
        # The file's own heads are checked like the tensors copied into the model: in the dtype
        # they now have (a value finite in the file may not be in the model's dtype).
        key = layout.first_non_finite(
            {f"{p}.{k}": v for p, m in owned.items() for k, v in m.state_dict().items()}
        )
        if key is not None:
            raise FileProblem(f"{key} holds NaN or infinite values (in the model's dtype)")

        previous_active = active_adapter(model)
        if needs_inject:
            try:
                with warnings.catch_warnings():
                    warnings.filterwarnings(
                        "ignore", message=".*torch.compile has already compiled"
                    )
                    inject_arc(model, contents.config, name=name)
            except ValueError as exc:  # inject_arc leaves the model unchanged when it raises
                problem = f"its config {contents.config} does not fit this model: {exc}"
                raise FileProblem(problem) from None
        try:
            extra = contents.extra_keys()
            adapter_found = {k: v for k, v in tensors.items() if k not in extra}
            model_state = layout.adapter_state(model, name)
            adapter_found = layout.renamed(adapter_found, model_state)
            tensors = {**tensors, **adapter_found}  # also under the model's names, for staging
            pairs = layout.match_keys("adapter", model_state, adapter_found)
            pairs += [(k, expected[k]) for k in expected]
            # Convert everything first (the step that can run out of memory), check the converted
            # values (1e300 is finite in float64 but inf in float32), then copy: the copies cannot
            # fail once shapes match, so the model never ends up half-loaded.
            staged = {key: _stage(target, tensors[key]) for key, target in pairs}
            key = layout.first_non_finite(staged)
            if key is not None:
                raise FileProblem(
                    f"{key} holds NaN or infinite values (in the model's dtype); the adapter is "
                    "unusable",
                )
            with torch.no_grad():
                for key, target in pairs:
                    _copy(target, staged[key])
        except BaseException:
            if needs_inject:
                delete_adapter(model, name)
                if previous_active is not None and active_adapter(model) != previous_active:
                    set_active_adapter(model, previous_active)
            raise
        for module_path, module in owned.items():
            heads.set_task_module(model, name, module_path, module)
        heads.note_loaded(model, name, trained)
        if activate is True:
            set_active_adapter(model, name)
        elif activate is False and active_adapter(model) != previous_active:
            set_active_adapter(model, previous_active)


def _check_against_model(
    model: nn.Module,
    header: Header,
    contents: Contents,
    name: str,
    head_meta: dict[str, Any] | None,
    trained_meta: dict[str, Any] | None,
    check_model: bool,
) -> tuple[dict[str, Tensor], bool, str | None]:
    """Check the header against ``model`` (identity, backbone, the head and trained modules
    copied into the model, the adapter's tensor shapes). Returns ``({file key: model tensor}``
    for that head and those trained modules, whether adapter ``name`` has to be injected, a
    warning about the file's identity or ``None``)."""
    stored_id, _ = identity_fields(header)
    refusal, warning, same = identity.check_identity(stored_id, identity.model_identity(model))
    actual = layout.backbone_fingerprint(model)
    stored_arch = contents.backbone.get("architecture")
    # The same network in another form: the model wraps the file's (timm features_only=True),
    # or the file's model wrapped this one (a transformers classifier's base model, ``.vit``).
    related = stored_arch != actual["architecture"] and (
        identity.wraps(model, stored_arch)
        or actual["architecture"] in (contents.backbone.get("contains") or ())
    )
    if related:
        refusal = None  # the same network: blocks and widths decide
    if same or not check_model or related:
        actual["architecture"] = stored_arch
    diffs = layout.fingerprint_differences(contents.backbone, actual)
    if diffs:
        raise FileProblem(
            f"made for another backbone (file vs model: {'; '.join(diffs)}). Build the model "
            "the adapter was trained on.",
        )
    if refusal and check_model:
        raise FileProblem(f"made for another model: {refusal}")
    entries = header.entries
    targets: dict[str, Tensor] = {}
    if head_meta:
        _, model_head = taskfiles.head_state(model)
        if not model_head:
            raise FileProblem(
                f"the file holds a classifier head ({head_meta['module']}) but "
                f"{type(model).__name__} has none: pass load_head=False",
            )
        diffs = [
            f"{key} {shape} vs {list(model_head[key].shape)}"
            for key, shape in head_meta["shapes"].items()
            if key in model_head and list(model_head[key].shape) != shape
        ]
        if diffs:
            raise FileProblem(
                f"the stored head is for another number of classes (file vs model: "
                f"{'; '.join(diffs)}). Build the model with the matching num_classes, or pass "
                "load_head=False.",
            )
        stored = {k: entries[k] for k in head_meta["shapes"]}
        for key, _ in layout.match_keys("head", model_head, stored):
            targets[key] = model_head[key]
    if trained_meta:
        trained = layout.trained_targets(model, trained_meta)
        stored = {k: entries[k] for k in trained_meta["shapes"]}
        for key, _ in layout.match_keys("trained", trained, stored):
            targets[key] = trained[key]

    config = contents.config
    existing = adapter_configs(model)
    extra = contents.extra_keys()
    adapter_entries = {k: e for k, e in entries.items() if k not in extra}
    if name in existing:
        if existing[name] != config:
            raise FileProblem(
                f"the model already has an adapter {name!r} with a different config "
                f"({existing[name]}) than the file ({config}). Load it under another name "
                f"(name=...) or remove the existing one first (arc_peft.delete_adapter).",
            )
        state = layout.adapter_state(model, name)
        layout.match_keys("adapter", state, layout.renamed(adapter_entries, state))
        return targets, False, warning
    planned = layout.planned_state(model, config)
    layout.match_keys(
        "adapter",
        planned,
        layout.renamed(adapter_entries, planned),
        versus=f"its own config {config}",
    )
    return targets, True, warning
