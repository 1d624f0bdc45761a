"""Adapter files: one small safetensors file per task, holding the adapter (and by default the
classifier head) and enough metadata to rebuild and check it without the training code::

    arc_peft.save_adapter(model, "cifar100.safetensors")
    fresh = timm.create_model("vit_base_patch16_224", pretrained=True, num_classes=100)
    arc_peft.load_adapter(fresh, "cifar100.safetensors")     # injects, then loads
    print(arc_peft.read_adapter_info("cifar100.safetensors"))  # no model needed

The format is specified in ``docs/file-format.md``. Safety rules: files are never unpickled, a
load validates everything before it changes the model, and a save never leaves a half-written
file at the destination.
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

import safetensors.torch
import torch
from torch import Tensor, nn

from . import heads, identity
from .atomic import write_atomic
from .config import AdapterConfig
from .fileformat import (
    FORMAT_NAME,
    FORMAT_VERSION,
    Contents,
    Header,
    bad,
    check_metadata,
    open_regular,
    parse_metadata,
    read_header,
    read_tensors,
)
from .info import AdapterInfo, identity_fields, read_adapter_info, resolve_source, runs
from .inject import (
    DEFAULT_ADAPTER,
    _build_adapters,
    _check_name,
    _select,
    adapter_configs,
    delete_adapter,
    inject_arc,
    site_plan,
)
from .modules import Adapter, SharedProjection
from .multitask import active_adapter, set_active_adapter
from .params import TRAINED_ATTR, get_head
from .shared import iter_shared
from .slots import SLOT_ATTR, AdapterSlot, holder_of, iter_slots
from .wrappers import (
    check_injectable,
    full_tensor,
    is_sharded,
    original_class,
    reshard,
    unwrap,
)

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "AdapterInfo",
    "load_adapter",
    "read_adapter_info",
    "save_adapter",
]


# -- fingerprints ------------------------------------------------------------------------------


def _backbone_fingerprint(model: nn.Module) -> dict[str, Any]:
    """What an adapter file must agree with: architecture, block count and every site's width.

    Computed from the model's sites (see ``arc_peft.site_plan``), so it is the same before
    and after injection and for any model built the same way (pretrained or not).
    """
    plan = site_plan(model)
    widths = {p: [s.width for s in plan.sites if s.position == p] for p in ("attn", "mlp")}
    cls = original_class(model)  # not FSDP's generated subclass
    return {
        "architecture": f"{cls.__module__}.{cls.__qualname__}",
        "num_blocks": plan.num_blocks,
        "widths": widths,
    }


def _head_state(model: nn.Module, name: str | None = None) -> tuple[str, dict[str, Tensor]]:
    """``(module path, {model key: tensor})`` of the classifier head that runs while adapter
    ``name`` is active (its own or the model's; ``None``: the model's); empty if none."""
    return heads.head_state(model, name)


def _file_state(layers: list[tuple[str, str, Adapter]]) -> dict[str, Tensor]:
    """``{file key: tensor}`` of one adapter from its ``(slot path, site path, layer)`` per site:
    each layer's state under its slot, with the adapter-name component dropped
    (``blocks.0.arc_peft.attn.scale``), so a file loads under any name; a shared ARC projection
    once, as ``projection`` under the slot of its group's first site (its ``anchor``), wherever
    the model holds it."""
    state: dict[str, Tensor] = {}
    for slot_path, site_path, layer in layers:
        for key, value in layer.state_dict(keep_vars=True).items():
            state[f"{slot_path}.{key}"] = value
        owner = getattr(layer, "owner", None)
        if isinstance(owner, SharedProjection) and owner.anchor == site_path:
            state[f"{slot_path}.projection"] = owner.projection
    return state


def _adapter_state(model: nn.Module, name: str) -> dict[str, Tensor]:
    """``{file key: parameter or buffer}`` of adapter ``name`` (see ``_file_state``)."""
    return _file_state(
        [(path, slot.site.path, slot[name]) for path, _, slot in iter_slots(model) if name in slot]
    )


def _isfinite(flat: Tensor) -> Tensor:
    try:
        return torch.isfinite(flat)
    except (NotImplementedError, RuntimeError):  # float8 has no isfinite kernel; upcasting is exact
        return torch.isfinite(flat.float())


def _first_non_finite(tensors: dict[str, Tensor]) -> str | None:
    """The first key holding a NaN or infinity, or ``None``.

    One check per dtype over all tensors concatenated: per-tensor checks cost a kernel launch
    each, which dominated save/load time for the ~50 small tensors of a ViT-B adapter.
    """
    by_dtype: dict[tuple[torch.dtype, torch.device], list[str]] = {}
    for key, value in tensors.items():
        if value.is_floating_point():
            by_dtype.setdefault((value.dtype, value.device), []).append(key)
    for keys in by_dtype.values():
        flat = torch.cat([tensors[k].detach().reshape(-1) for k in keys])
        if not bool(_isfinite(flat).all()):
            return next(k for k in keys if not bool(_isfinite(tensors[k].detach()).all()))
    return None


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _fingerprint_differences(stored: dict[str, Any], actual: dict[str, Any]) -> list[str]:
    diffs = []
    if stored.get("architecture") != actual["architecture"]:
        diffs.append(f"architecture {stored.get('architecture')} vs {actual['architecture']}")
    if stored.get("num_blocks") != actual["num_blocks"]:
        diffs.append(f"{stored.get('num_blocks')} blocks vs {actual['num_blocks']}")
    stored_widths = stored.get("widths") or {}
    for position in ("attn", "mlp"):
        want = stored_widths.get(position)
        have = actual["widths"][position]
        if want != have:
            shown = runs(want) if isinstance(want, list) else repr(want)
            diffs.append(f"{position} widths per block [{shown}] vs [{runs(have)}]")
    return diffs


# -- writing -----------------------------------------------------------------------------------


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
    from . import __version__  # here, not at import time: the package imports this module

    model = unwrap(model)
    reshard(model)  # FSDP2: read the kept shards, not unsharded copies about to be freed
    name = _resolve_name(model, name)
    config = adapter_configs(model)[name]
    state = dict(_adapter_state(model, name))
    head_path, head_state = _head_state(model, name) if include_head else ("", {})
    trained_paths, trained_state = _trained_state(model, exclude=set(head_state))
    trained_paths, trained_state = heads.with_owned(
        model, name, trained_paths, trained_state, exclude=set(head_state)
    )
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
    key = _first_non_finite(tensors)
    if key is not None:
        raise ValueError(
            f"save_adapter: {key} holds NaN or infinite values; the file could not be "
            "loaded back. Check the training run (learning rate, AMP overflow)."
        )
    if sharded and torch.distributed.get_rank() != 0:
        return  # every rank holds the same gathered tensors; one of them writes
    dtypes = sorted({_dtype_name(v.dtype) for v in tensors.values()})

    def group(where: str, located: Any, keys: dict[str, Tensor]) -> dict[str, Any] | None:
        shapes = {k: list(tensors[k].shape) for k in sorted(keys)}
        return {where: located, "shapes": shapes} if keys else None

    metadata = {
        "format": FORMAT_NAME,
        "format_version": str(FORMAT_VERSION),
        "arc_peft_version": __version__,
        "name": name,
        "method": config.method,
        "config": config.to_json(),
        "backbone": json.dumps(_backbone_fingerprint(model), sort_keys=True),
        "head": json.dumps(group("module", head_path, head_state), sort_keys=True),
        "dtype": ",".join(dtypes),
        "model": json.dumps(identity.model_identity(model), sort_keys=True),
    }
    if user is not None:
        metadata["user"] = user
    if trained_state:  # only then: files without trained modules keep their exact bytes
        metadata["trained"] = json.dumps(
            group("modules", trained_paths, trained_state), sort_keys=True
        )
    # Own contiguous CPU copies: safetensors refuses views and tensors sharing storage.
    cpu = {k: v.to("cpu", copy=True).contiguous() for k, v in tensors.items()}
    write_atomic(os.fspath(path), _serialize(cpu, metadata))


def _slot_tensor_ids(model: nn.Module) -> set[int]:
    """Every parameter and buffer of every adapter (whichever is active)."""
    found = {
        id(t) for _, _, slot in iter_slots(model) for t in slot.state_dict(keep_vars=True).values()
    }
    return found | {id(p) for entry in iter_shared(model) for p in entry[3].parameters()}


def _trained_state(model: nn.Module, exclude: set[str]) -> tuple[list[str], dict[str, Tensor]]:
    """``(module paths, {model key: tensor})`` of the backbone modules that
    ``freeze_backbone(also=...)`` made trainable, without adapter tensors or keys in ``exclude``."""
    paths = list(model.__dict__.get(TRAINED_ATTR, ()))
    adapters = _slot_tensor_ids(model)
    state: dict[str, Tensor] = {}
    for path in paths:
        try:
            module = model.get_submodule(path)
        except AttributeError:
            raise ValueError(
                f"save_adapter: freeze_backbone(also=...) made {path!r} trainable, but the model "
                "no longer has such a module; call freeze_backbone again"
            ) from None
        prefix = f"{path}." if path else ""
        for key, value in module.state_dict(keep_vars=True).items():
            if id(value) not in adapters and f"{prefix}{key}" not in exclude:
                state[f"{prefix}{key}"] = value
    return paths, state


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
    kept = _slot_tensor_ids(model) | {id(t) for t in stored}
    kept |= {id(p) for p in head.parameters()} if head is not None else set()
    kept |= {id(p) for p in heads.task_parameters(model)}  # other tasks' heads are theirs
    lost = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in kept]
    if lost:
        more = f" and {len(lost) - 5} more" if len(lost) > 5 else ""
        raise ValueError(
            f"save_adapter: {', '.join(lost[:5])}{more} are trainable but would not be saved, "
            "so the file could not reproduce the trained model. Name their modules in "
            "freeze_backbone(model, also=[...]) (those are stored), or freeze them"
        )


# -- loading -----------------------------------------------------------------------------------


def _describe_keys(keys: set[str], limit: int = 5) -> str:
    listed = sorted(keys)
    more = f" and {len(listed) - limit} more" if len(listed) > limit else ""
    return ", ".join(listed[:limit]) + more


def _match(
    path: str, what: str, expected: dict[str, Tensor], found: dict[str, Any], versus: str = "model"
) -> list[tuple[str, Tensor]]:
    """Pair every expected tensor with the file's key, or raise naming what does not fit.

    ``found`` maps file keys to tensors or to header entries (``{"shape": [...]}``)."""
    missing, unexpected = set(expected) - set(found), set(found) - set(expected)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {what} key(s): {_describe_keys(missing)}")
        if unexpected:
            parts.append(f"unexpected {what} key(s): {_describe_keys(unexpected)}")
        raise bad(
            path,
            "; ".join(parts) + ". The file was made for a differently structured model or "
            "adapter (or edited).",
        )
    pairs = []
    for key, target in expected.items():
        source = found[key]
        shape = list(source["shape"] if isinstance(source, dict) else source.shape)
        if shape != list(target.shape):
            raise bad(
                path,
                f"shape mismatch for {key}: file {shape[:8]}, {versus} {list(target.shape)}",
            )
        pairs.append((key, target))
    return pairs


def _planned_state(path: str, model: nn.Module, config: AdapterConfig) -> dict[str, Tensor]:
    """``{file key: tensor}`` that injecting ``config`` would create, built on the meta device:
    nothing is allocated, so a file claiming ``rank=10**9`` costs nothing to refuse."""
    try:
        chosen = _select(site_plan(model), config)
        built = _build_adapters(model, chosen, config, device="meta")
    except ValueError as exc:  # UnsupportedModelError included
        raise bad(path, f"its config {config} does not fit this model: {exc}") from None
    layers = []
    for site, adapter in built:
        holder_path, _ = holder_of(model, site.path)
        prefix = f"{holder_path}.{SLOT_ATTR}" if holder_path else SLOT_ATTR
        key = AdapterSlot(site, holder_path).key  # named as iter_slots will name it
        layers.append((f"{prefix}.{key}", site.path, adapter))
    return _file_state(layers)


def _trained_targets(path: str, model: nn.Module, trained: dict[str, Any]) -> dict[str, Tensor]:
    """The model tensors the file's trained-module tensors go to (those the model has)."""
    state: dict[str, Tensor] = {}
    for module_path in trained["modules"]:
        try:
            module = model.get_submodule(module_path)
        except AttributeError:
            raise bad(
                path,
                f"it stores the trained module {module_path!r} (freeze_backbone(also=...)), "
                f"which {type(model).__name__} does not have",
            ) from None
        prefix = f"{module_path}." if module_path else ""
        state.update({f"{prefix}{k}": v for k, v in module.state_dict(keep_vars=True).items()})
    return {k: state[k] for k in trained["shapes"] if k in state}


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
    path = resolve_source(path)
    wrapper, model = model, unwrap(model)
    _check_name(name)
    reshard(model)  # FSDP2: write into the kept shards, not unsharded copies about to be freed
    with open_regular(path) as handle:
        header = read_header(path, handle)
        check_metadata(path, header)
        contents = parse_metadata(path, header)
        head, trained, to_own = heads.load_plan(
            model, name, contents.head if load_head else None, contents.trained
        )
        # Everything the header can tell is checked before the data is read or anything built.
        expected, needs_inject = _check_against_model(
            path, model, header, contents, name, head, trained, check_model
        )
        if needs_inject:
            check_injectable(wrapper, "load_adapter")
        tensors = read_tensors(path, handle, header)
    try:
        owned = heads.build_owned(model, to_own, tensors)
    except ValueError as exc:
        raise bad(path, str(exc)) from None

    previous_active = active_adapter(model)
    if needs_inject:
        try:
            with _rng_untouched(model), warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*torch.compile has already compiled")
                inject_arc(model, contents.config, name=name)
        except ValueError as exc:  # inject_arc leaves the model unchanged when it raises
            problem = f"its config {contents.config} does not fit this model: {exc}"
            raise bad(path, problem) from None
    try:
        adapter_found = {k: v for k, v in tensors.items() if k not in contents.extra_keys()}
        model_state = _adapter_state(model, name)
        adapter_found = _renamed(adapter_found, model_state)
        tensors = {**tensors, **adapter_found}  # also under the model's names, for staging
        pairs = _match(path, "adapter", model_state, adapter_found)
        pairs += [(k, expected[k]) for k in expected]
        # Convert everything first (the step that can run out of memory), check the converted
        # values (1e300 is finite in float64 but inf in float32), then copy: the copies cannot
        # fail once shapes match, so the model never ends up half-loaded.
        staged = {key: _stage(target, tensors[key]) for key, target in pairs}
        key = _first_non_finite(staged)
        if key is not None:
            raise bad(
                path,
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
    return wrapper


def _check_against_model(
    path: str,
    model: nn.Module,
    header: Header,
    contents: Contents,
    name: str,
    head_meta: dict[str, Any] | None,
    trained_meta: dict[str, Any] | None,
    check_model: bool,
) -> tuple[dict[str, Tensor], bool]:
    """Check the header against ``model`` (identity, backbone, the head and trained modules
    copied into the model, the adapter's tensor shapes). Returns ``({file key: model tensor}``
    for that head and those trained modules, whether adapter ``name`` has to be injected)."""
    stored_id, _ = identity_fields(path, header)
    refusal, warning, same = identity.check_identity(stored_id, identity.model_identity(model))
    actual = _backbone_fingerprint(model)
    if same or not check_model or identity.wraps(model, contents.backbone.get("architecture")):
        # The same network built another way (features_only=True): blocks and widths decide.
        actual["architecture"] = contents.backbone.get("architecture")
    diffs = _fingerprint_differences(contents.backbone, actual)
    if diffs:
        raise bad(
            path,
            f"made for another backbone (file vs model: {'; '.join(diffs)}). Build the model "
            "the adapter was trained on.",
        )
    if refusal and check_model:
        raise bad(path, f"made for another model: {refusal}")
    if warning:
        warnings.warn(f"{path}: {warning}", stacklevel=3)
    entries = header.entries
    targets: dict[str, Tensor] = {}
    if head_meta:
        _, model_head = _head_state(model)
        if not model_head:
            raise bad(
                path,
                f"the file holds a classifier head ({head_meta['module']}) but "
                f"{type(model).__name__} has none: pass load_head=False",
            )
        diffs = [
            f"{key} {shape} vs {list(model_head[key].shape)}"
            for key, shape in head_meta["shapes"].items()
            if key in model_head and list(model_head[key].shape) != shape
        ]
        if diffs:
            raise bad(
                path,
                f"the stored head is for another number of classes (file vs model: "
                f"{'; '.join(diffs)}). Build the model with the matching num_classes, or pass "
                "load_head=False.",
            )
        stored = {k: entries[k] for k in head_meta["shapes"]}
        for key, _ in _match(path, "head", model_head, stored):
            targets[key] = model_head[key]
    if trained_meta:
        trained = _trained_targets(path, model, trained_meta)
        stored = {k: entries[k] for k in trained_meta["shapes"]}
        for key, _ in _match(path, "trained", trained, stored):
            targets[key] = trained[key]

    config = contents.config
    existing = adapter_configs(model)
    adapter_entries = {k: e for k, e in entries.items() if k not in contents.extra_keys()}
    if name in existing:
        if existing[name] != config:
            raise bad(
                path,
                f"the model already has an adapter {name!r} with a different config "
                f"({existing[name]}) than the file ({config}). Load it under another name "
                f"(name=...) or remove the existing one first (arc_peft.delete_adapter).",
            )
        state = _adapter_state(model, name)
        _match(path, "adapter", state, _renamed(adapter_entries, state))
        return targets, False
    planned = _planned_state(path, model, config)
    _match(
        path,
        "adapter",
        planned,
        _renamed(adapter_entries, planned),
        versus=f"its own config {config}",
    )
    return targets, True


def _renamed(found: dict[str, Any], expected: dict[str, Any]) -> dict[str, Any]:
    """``found`` under the model's key names when the model holds the same blocks under other
    names (timm ``features_only=True`` wraps or flattens them); unchanged otherwise."""
    mapping = identity.remap_keys(set(found), set(expected))
    return {mapping.get(k, k): v for k, v in found.items()}
