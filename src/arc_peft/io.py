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
import dataclasses
import json
import math
import os
import uuid
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import safetensors.torch
import torch
from torch import Tensor, nn

from . import heads, identity
from .config import AdapterConfig, config_from_dict
from .errors import AdapterFileError
from .inject import (
    DEFAULT_ADAPTER,
    _check_name,
    adapter_configs,
    delete_adapter,
    inject_arc,
    site_plan,
)
from .multitask import active_adapter, set_active_adapter
from .params import find_head
from .slots import iter_slots

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "AdapterInfo",
    "load_adapter",
    "read_adapter_info",
    "save_adapter",
]

FORMAT_NAME = "arc_peft.adapter"
FORMAT_VERSION = 1

# safetensors' own limit; a larger "header" means the file is not what it claims to be.
_MAX_HEADER = 100 * 1024 * 1024
_ITEMSIZE = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1,
}  # fmt: skip
_REQUIRED_METADATA = ("format_version", "arc_peft_version", "method", "config", "backbone")


# -- fingerprints ------------------------------------------------------------------------------


def _backbone_fingerprint(model: nn.Module) -> dict[str, Any]:
    """What an adapter file must agree with: architecture, block count and every site's width.

    Computed from the model's sites (see :func:`arc_peft.site_plan`), so it is the same before
    and after injection and for any model built the same way (pretrained or not).
    """
    plan = site_plan(model)
    widths = {p: [s.width for s in plan.sites if s.position == p] for p in ("attn", "mlp")}
    cls = type(model)
    return {
        "architecture": f"{cls.__module__}.{cls.__qualname__}",
        "num_blocks": plan.num_blocks,
        "widths": widths,
    }


def _adapter_state(model: nn.Module, name: str) -> dict[str, Tensor]:
    """``{file key: parameter or buffer}`` of adapter ``name``: the model's names with the
    adapter-name component dropped (``blocks.0.arc_peft.attn.scale``), so a file loads under any
    name. A shared ARC projection is listed once, at its owner (only the owner registers it)."""
    state: dict[str, Tensor] = {}
    for slot_path, _, slot in iter_slots(model):
        if name in slot:
            for key, value in slot[name].state_dict(keep_vars=True).items():
                state[f"{slot_path}.{key}"] = value
    return state


def _first_non_finite(tensors: dict[str, Tensor]) -> str | None:
    """The first key holding a NaN or infinity, or ``None``.

    One check per dtype over all tensors concatenated: per-tensor checks cost a kernel launch
    each, which dominated save/load time for the ~50 small tensors of a ViT-B adapter.
    """
    by_dtype: dict[torch.dtype, list[str]] = {}
    for key, value in tensors.items():
        if value.is_floating_point():
            by_dtype.setdefault(value.dtype, []).append(key)
    for keys in by_dtype.values():
        flat = torch.cat([tensors[k].detach().reshape(-1) for k in keys])
        if not bool(torch.isfinite(flat).all()):
            return next(k for k in keys if not bool(torch.isfinite(tensors[k]).all()))
    return None


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _runs(values: list[int]) -> str:
    """``[768, 768, 384]`` -> ``"768×2, 384"``: widths per block, readable for 24-block Swins."""
    parts: list[str] = []
    i = 0
    while i < len(values):
        j = i
        while j < len(values) and values[j] == values[i]:
            j += 1
        parts.append(f"{values[i]}×{j - i}" if j - i > 1 else str(values[i]))
        i = j
    return ", ".join(parts) if parts else "none"


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
            shown = _runs(want) if isinstance(want, list) else repr(want)
            diffs.append(f"{position} widths per block [{shown}] vs [{_runs(have)}]")
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


def _write_atomic(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never a mix.

    The temporary file lives in the destination folder (``os.replace`` is atomic only within
    one file system) and is removed on any failure, including KeyboardInterrupt.
    """
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
    # O_EXCL: never follow or reuse someone else's file; mode 0o666 lets the umask apply as for
    # any ordinary file (mkstemp would force 0o600).
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    # Make the rename itself durable; not every platform can open a directory (Windows).
    with contextlib.suppress(OSError):
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


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
    The same weights always give the same bytes.

    Args:
        model: A model holding the adapter.
        path: Destination file (conventionally ``*.safetensors``).
        name: The adapter to save; default: the active adapter, or the only one if none is
            active.
        include_head: Also store the classifier head that runs while the adapter is active
            (its own, see :func:`arc_peft.add_head`, or the model's).
        metadata: Free-form JSON-serialisable facts to keep in the file (class names, dataset,
            metrics); :func:`read_adapter_info` and ``arc-peft inspect`` show them.

    Besides the adapter and head, the file carries the modules the adapter owns and, if it is
    active, every backbone module left trainable (``freeze_backbone(also=...)``), and the
    backbone's identity where its library records one (timm model name and pretrained tag,
    torchvision builder, Hugging Face ``name_or_path``).

    Raises:
        KeyError: the model has no adapter called ``name``.
        ValueError: ``name`` is ``None`` and no single adapter can be chosen, or a weight is
            NaN or infinite (such a file could not be loaded back).
    """
    from . import __version__  # here, not at import time: the package imports this module

    name = _resolve_name(model, name)
    config = adapter_configs(model)[name]
    tensors = {k: v.detach() for k, v in _adapter_state(model, name).items()}
    head_path, head_state = heads.head_state(model, name) if include_head else ("", {})
    carried = heads.carried_state(model, name)
    extra = {k: v for state in carried.values() for k, v in state.items()}
    clash = sorted((set(tensors) | set(extra)) & set(head_state))
    if clash:
        raise ValueError(f"save_adapter: head keys {clash} collide with adapter keys")
    tensors.update({k: v.detach() for k, v in head_state.items()})
    tensors.update({k: v.detach() for k, v in extra.items()})
    user = _user_metadata(metadata)
    key = _first_non_finite(tensors)
    if key is not None:
        raise ValueError(
            f"save_adapter: {key} holds NaN or infinite values; the file could not be "
            "loaded back. Check the training run (learning rate, AMP overflow)."
        )
    dtypes = sorted({_dtype_name(v.dtype) for v in tensors.values()})
    head_meta = (
        {"module": head_path, "shapes": {k: list(v.shape) for k, v in sorted(head_state.items())}}
        if head_state
        else None
    )
    metadata = {
        "format": FORMAT_NAME,
        "format_version": str(FORMAT_VERSION),
        "arc_peft_version": __version__,
        "name": name,
        "method": config.method,
        "config": config.to_json(),
        "backbone": json.dumps(_backbone_fingerprint(model), sort_keys=True),
        "head": json.dumps(head_meta, sort_keys=True),
        "dtype": ",".join(dtypes),
        "model": json.dumps(identity.model_identity(model), sort_keys=True),
    }
    if carried:
        metadata["modules"] = json.dumps(
            {p: {k: list(v.shape) for k, v in st.items()} for p, st in carried.items()},
            sort_keys=True,
        )
    if user is not None:
        metadata["user"] = user
    # Own contiguous CPU copies: safetensors refuses views and tensors sharing storage.
    cpu = {k: v.to("cpu", copy=True).contiguous() for k, v in tensors.items()}
    _write_atomic(os.fspath(path), _serialize(cpu, metadata))


def _user_metadata(metadata: Mapping[str, Any] | None) -> str | None:
    if metadata is None:
        return None
    if not isinstance(metadata, Mapping):
        raise TypeError(f"save_adapter: metadata must be a dict, got {type(metadata).__name__}")
    try:
        return json.dumps(dict(metadata), sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(
            f"save_adapter: metadata must be JSON-serialisable (str, numbers, lists, dicts; no "
            f"NaN): {exc}"
        ) from None


def _json_field(path: str, meta: dict[str, str], key: str) -> dict[str, Any]:
    """The optional JSON-object metadata field ``key`` (``{}`` when absent)."""
    if key not in meta:
        return {}
    try:
        value = json.loads(meta[key])
    except (ValueError, RecursionError) as exc:
        raise _bad(path, f"corrupt metadata ({key} is not valid JSON: {exc})") from None
    if not isinstance(value, dict):
        raise _bad(path, f"corrupt metadata: {key} must be a JSON object")
    return value


def _carried_meta(path: str, header: _Header) -> dict[str, dict[str, list[int]]]:
    """``{module path: {key: shape}}`` of the carried modules, checked against the data."""
    modules = _json_field(path, header.metadata, "modules")
    for module_path, shapes in modules.items():
        if not isinstance(shapes, dict):
            raise _bad(path, f"corrupt metadata: modules[{module_path!r}] must be an object")
        for key, shape in shapes.items():
            entry = header.entries.get(key)
            if not key.startswith(f"{module_path}.") or entry is None or entry["shape"] != shape:
                raise _bad(path, f"corrupt metadata: module tensor {key!r} does not match the data")
    return modules


# -- reading -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Header:
    metadata: dict[str, str]
    entries: dict[str, dict[str, Any]]  # key -> {"dtype", "shape", "data_offsets"}
    file_size: int


def _bad(path: str, problem: str) -> AdapterFileError:
    return AdapterFileError(f"{path}: {problem}")


def _parse_header(path: str, head: bytes, file_size: int) -> tuple[_Header, int]:
    """Validate the safetensors header in ``head`` (the file's first bytes, at least the header).

    Returns the header and the offset where the tensor data starts.
    """
    if file_size == 0:
        raise _bad(path, "the file is empty (truncated, or the save never finished)")
    if file_size < 8:
        raise _bad(path, f"only {file_size} bytes: truncated, or not a safetensors file")
    if head[:4] == b"PK\x03\x04" or (head[:1] == b"\x80" and head[8:9] != b"{"):
        raise _bad(
            path,
            "not a safetensors file: it looks like a torch.save / pickle checkpoint. arc_peft "
            "never unpickles files; save adapters with arc_peft.save_adapter",
        )
    size = int.from_bytes(head[:8], "little")
    if size == 0 or size > _MAX_HEADER:
        raise _bad(path, "not a safetensors file (its first 8 bytes are not a header length)")
    if len(head) > 8 and head[8:9] != b"{":
        raise _bad(path, "not a safetensors file (no JSON header after the length prefix)")
    if 8 + size > file_size:
        raise _bad(
            path,
            f"truncated or corrupt: the header needs {8 + size} bytes but the file has "
            f"{file_size}. Re-save or re-download it.",
        )
    try:
        header = json.loads(head[8 : 8 + size].decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise _bad(path, f"corrupt header (not valid JSON: {exc})") from None
    if not isinstance(header, dict):
        raise _bad(path, "corrupt header (expected a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise _bad(path, "corrupt header (__metadata__ must map strings to strings)")
    data_size = file_size - 8 - size
    spans = []
    for key, entry in header.items():
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise _bad(path, f"corrupt header entry for {key!r}")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        valid_shape = isinstance(shape, list) and all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
        )
        valid_offsets = (
            isinstance(offsets, list)
            and len(offsets) == 2
            and all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
        )
        if dtype not in _ITEMSIZE or not valid_shape or not valid_offsets:
            raise _bad(path, f"corrupt header entry for {key!r}: {entry}")
        begin, end = offsets
        if not 0 <= begin <= end or end - begin != math.prod(shape) * _ITEMSIZE[dtype]:
            raise _bad(
                path,
                f"corrupt header: {key!r} has shape {shape} ({dtype}) but spans bytes "
                f"[{begin}, {end}) of the data",
            )
        spans.append((begin, end, key))
    spans.sort()
    expected = 0
    for begin, end, key in spans:
        if begin != expected:
            raise _bad(path, f"corrupt header: tensor data is not contiguous at {key!r}")
        expected = end
    if expected > data_size:
        raise _bad(
            path,
            f"truncated: the tensors need {expected} bytes of data but only {data_size} "
            "follow the header. Re-save or re-download the file.",
        )
    if expected < data_size:
        raise _bad(path, f"corrupt: {data_size - expected} unexpected bytes after the tensor data")
    return _Header(metadata, header, file_size), 8 + size


def _check_metadata(path: str, header: _Header) -> None:
    meta = header.metadata
    if meta.get("format") != FORMAT_NAME:
        keys = sorted(header.entries)
        raise _bad(
            path,
            "a safetensors file, but not an arc_peft adapter file (no arc_peft metadata; it "
            f"holds {len(keys)} tensors, e.g. {keys[:3]}). Adapter files are written by "
            "arc_peft.save_adapter.",
        )
    version = meta.get("format_version", "")
    if not version.isdigit():
        raise _bad(path, f"corrupt metadata: format_version={version!r} is not a number")
    if int(version) > FORMAT_VERSION:
        from . import __version__

        raise _bad(
            path,
            f"written by arc_peft {meta.get('arc_peft_version', '?')} with file-format version "
            f"{version}; this arc_peft ({__version__}) reads versions up to {FORMAT_VERSION}. "
            "Upgrade: pip install -U arc-peft",
        )
    missing = [k for k in _REQUIRED_METADATA if k not in meta]
    if missing:
        raise _bad(path, f"corrupt metadata: missing field(s) {missing}")


def _parse_metadata(
    path: str, header: _Header
) -> tuple[AdapterConfig, dict[str, Any], dict[str, Any] | None]:
    """``(config, backbone fingerprint, head info or None)`` from checked metadata."""
    meta = header.metadata
    try:
        config = config_from_dict(json.loads(meta["config"]))
    except (ValueError, TypeError, RecursionError) as exc:
        raise _bad(path, f"unusable method config {meta['config']!r}: {exc}") from None
    if config.method != meta["method"]:
        raise _bad(path, f"corrupt metadata: method {meta['method']!r} but config {config}")
    try:
        backbone = json.loads(meta["backbone"])
        head = json.loads(meta.get("head", "null"))
    except (ValueError, RecursionError) as exc:
        raise _bad(path, f"corrupt metadata (backbone/head is not valid JSON: {exc})") from None
    if not isinstance(backbone, dict):
        raise _bad(path, "corrupt metadata: backbone must be a JSON object")
    if head is not None:
        shapes = head.get("shapes") if isinstance(head, dict) else None
        if not isinstance(shapes, dict) or not isinstance(head.get("module"), str):
            raise _bad(path, "corrupt metadata: head must be null or {module, shapes}")
        for key, shape in shapes.items():
            entry = header.entries.get(key)
            if entry is None or entry["shape"] != shape:
                raise _bad(path, f"corrupt metadata: head tensor {key!r} does not match the data")
    return config, backbone, head


def _open_header(path: str) -> tuple[_Header, int]:
    """Read and validate only the header (cheap even for a large wrong file)."""
    with open(path, "rb") as handle:
        file_size = os.fstat(handle.fileno()).st_size
        prefix = handle.read(9)
        size = int.from_bytes(prefix[:8], "little") if len(prefix) >= 8 else 0
        rest = handle.read(size - 1) if 0 < size <= _MAX_HEADER else b""
    return _parse_header(path, prefix + rest, file_size)


def _read_file(path: str) -> tuple[_Header, dict[str, Tensor]]:
    """The validated header and every tensor (on the CPU), or :class:`AdapterFileError`."""
    with open(path, "rb") as handle:
        data = handle.read()
    header, _ = _parse_header(path, data, len(data))
    _check_metadata(path, header)
    try:
        tensors = safetensors.torch.load(data)
    except Exception as exc:  # the Rust reader raises its own SafetensorError type
        raise _bad(path, f"corrupt safetensors data ({exc})") from None
    if set(tensors) != set(header.entries):
        raise _bad(path, "corrupt: the tensors do not match the header")
    return header, tensors


# -- the file description ------------------------------------------------------------------------


@dataclass(frozen=True)
class AdapterInfo:
    """What an adapter file holds, read from its header alone (no model, no tensor data).

    ``str(info)`` is a readable summary; :meth:`to_dict` is JSON-ready.

    Attributes:
        path: The file.
        format_version: File-format version it was written with.
        arc_peft_version: arc_peft version that wrote it.
        name: Name the adapter had when it was saved (it can be loaded under any name).
        config: The method configuration.
        backbone: Fingerprint of the backbone it was trained on: ``architecture`` (class),
            ``num_blocks`` and per-block input ``widths`` of the ``attn`` and ``mlp`` sites.
        head: ``{"module": path, "shapes": {key: shape}}`` of the stored classifier head, or
            ``None``.
        dtype: Dtype(s) of the stored tensors (comma-separated if several).
        num_tensors: Number of tensors in the file.
        adapter_parameters: Adapter parameters (a shared ARC projection counted once).
        head_parameters: Classifier-head parameters (0 without a head).
        file_size: Size of the file in bytes.
        model: Identity of the backbone (``library``, ``architecture``, and ``tag`` /
            ``hub_id`` / ``name_or_path`` where known); ``{}`` if unknown.
        metadata: The free-form metadata given to :func:`save_adapter`.
        modules: ``{path: {key: shape}}`` of the modules carried besides the head.
    """

    path: str
    format_version: int
    arc_peft_version: str
    name: str
    config: AdapterConfig
    backbone: dict[str, Any]
    head: dict[str, Any] | None
    dtype: str
    num_tensors: int
    adapter_parameters: int
    head_parameters: int
    file_size: int
    model: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)
    modules: dict[str, Any] = field(default_factory=dict)

    @property
    def method(self) -> str:
        return self.config.method

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (the config as :meth:`ARCConfig.to_dict` gives it)."""
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        data["config"] = self.config.to_dict()
        data["method"] = self.method
        return data

    def __str__(self) -> str:
        widths = self.backbone.get("widths") or {}
        width_text = "; ".join(f"{p} {_runs(w)}" for p, w in widths.items() if isinstance(w, list))
        blocks = self.backbone.get("num_blocks")
        if self.head is None:
            head_text = "not stored"
        else:
            shapes = ", ".join(f"{k} {v}" for k, v in self.head["shapes"].items())
            head_text = f"{self.head_parameters:,} parameters ({shapes})"
        rows = [
            ("method", f"{self.method}: {self.config}"),
            ("adapter", f"{self.adapter_parameters:,} parameters (saved as {self.name!r})"),
            ("head", head_text),
            ("backbone", f"{self.backbone.get('architecture')}, {blocks} blocks"),
            ("widths", width_text),
            ("tensors", f"{self.num_tensors} {self.dtype}, {self.file_size:,} bytes"),
            ("written by", f"arc_peft {self.arc_peft_version}, file format {self.format_version}"),
        ]
        rows[3:3] = identity.describe(self.model, self.modules, self.metadata)
        return "\n".join([self.path] + [f"  {label:<11} {text}" for label, text in rows])


def _resolve(source: str | os.PathLike[str]) -> str:
    """A local file for ``source``: a path, a folder holding ``adapter.safetensors`` (a Hub
    repo's layout) or ``"hf-hub:user/repo"`` (see :mod:`arc_peft.hub`)."""
    from .hub import resolve  # imports huggingface_hub only for "hf-hub:" sources

    return resolve(source)


def read_adapter_info(path: str | os.PathLike[str]) -> AdapterInfo:
    """Describe an adapter file without a model: config, counts, backbone, versions.

    Only the header is read and checked (structure, sizes, metadata); tensor values are checked
    by :func:`load_adapter`.

    Raises:
        AdapterFileError: the file is not a (readable, current) arc_peft adapter file.
        OSError: the file cannot be opened.
    """
    path = _resolve(path)
    header, _ = _open_header(path)
    _check_metadata(path, header)
    config, backbone, head = _parse_metadata(path, header)
    counts = {k: math.prod(e["shape"]) for k, e in header.entries.items()}
    head_keys = set(head["shapes"]) if head else set()
    modules = _carried_meta(path, header)
    carried_keys = {k for shapes in modules.values() for k in shapes}
    head_params = sum(n for k, n in counts.items() if k in head_keys)
    carried_params = sum(n for k, n in counts.items() if k in carried_keys)
    meta = header.metadata
    return AdapterInfo(
        path=path,
        format_version=int(meta["format_version"]),
        arc_peft_version=meta["arc_peft_version"],
        name=meta.get("name", DEFAULT_ADAPTER),
        config=config,
        backbone=backbone,
        head=head,
        dtype=meta.get("dtype", ""),
        num_tensors=len(counts),
        adapter_parameters=sum(counts.values()) - head_params - carried_params,
        head_parameters=head_params,
        file_size=header.file_size,
        model=_json_field(path, meta, "model"),
        metadata=_json_field(path, meta, "user"),
        modules=modules,
    )


# -- loading -----------------------------------------------------------------------------------


def _describe_keys(keys: set[str], limit: int = 5) -> str:
    listed = sorted(keys)
    more = f" and {len(listed) - limit} more" if len(listed) > limit else ""
    return ", ".join(listed[:limit]) + more


def _match(
    path: str, what: str, expected: dict[str, Tensor], found: dict[str, Tensor]
) -> list[tuple[Tensor, Tensor]]:
    """Pair every expected tensor with the file's, or raise naming what does not fit."""
    missing, unexpected = set(expected) - set(found), set(found) - set(expected)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {what} key(s): {_describe_keys(missing)}")
        if unexpected:
            parts.append(f"unexpected {what} key(s): {_describe_keys(unexpected)}")
        raise _bad(
            path,
            "; ".join(parts) + ". The file was made for a differently structured model or "
            "adapter (or edited).",
        )
    pairs = []
    for key, target in expected.items():
        source = found[key]
        if source.shape != target.shape:
            raise _bad(
                path,
                f"shape mismatch for {key}: file {list(source.shape)}, model {list(target.shape)}",
            )
        pairs.append((target, source))
    return pairs


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
    device and dtype of the model's parameters they replace.

    The classifier head stored in the file (if any, with any number of classes) becomes the
    adapter's own head: it runs whenever ``name`` is active, and each sample of a
    :func:`arc_peft.mixed_batch` gets its own task's head, so several tasks share one backbone
    without overwriting each other's heads (see :func:`arc_peft.add_head`). Modules the file
    carries besides the head (``freeze_backbone(also=...)`` at training) are loaded the same
    way.

    The file's backbone identity must match the model's: another architecture is refused,
    another pretrained tag or hub id gives a warning. A model built with timm's
    ``features_only=True`` takes the adapter of the same network's classifier (without the
    head).

    Args:
        model: A plain backbone built like the one the adapter was trained on, or one that
            already holds adapters.
        path: The adapter file (from :func:`save_adapter`), a folder holding
            ``adapter.safetensors``, or ``"hf-hub:user/repo"`` (see
            :func:`arc_peft.push_adapter_to_hub`).
        name: Name to load the adapter under.
        activate: ``True``: make it the active adapter; ``False``: leave the active adapter as
            it was before the call (none, if there was none); ``None`` (default): as
            :func:`arc_peft.inject_arc` does, a newly injected adapter becomes active only if
            no other adapter is active.
        load_head: Give the adapter the stored classifier head (``False``: it runs the
            model's own head).
        check_model: Refuse a file whose recorded architecture differs from the model's.

    Returns:
        ``model`` itself.

    Raises:
        AdapterFileError: the file is unreadable, corrupt, from a newer format, or does not fit
            ``model`` (other backbone, other head, other config under ``name``).
        ValueError: ``name`` is not a valid adapter name.
        OSError: the file cannot be opened.
    """
    path = _resolve(path)
    header, tensors = _read_file(path)
    config, backbone, head_meta = _parse_metadata(path, header)
    carried_meta = _carried_meta(path, header)
    stored_id = _json_field(path, header.metadata, "model")
    refusal, warning, same = identity.check_identity(stored_id, identity.model_identity(model))
    actual = _backbone_fingerprint(model)
    if same or not check_model or identity.wraps(model, backbone.get("architecture")):
        # The same network built another way (timm features_only=True wraps or flattens it):
        # the blocks and widths below decide.
        actual["architecture"] = backbone.get("architecture")
    diffs = _fingerprint_differences(backbone, actual)
    if diffs:
        raise _bad(
            path,
            f"made for another backbone (file vs model: {'; '.join(diffs)}). Build the model "
            "the adapter was trained on.",
        )
    if refusal and check_model:
        raise _bad(path, f"made for another model: {refusal}")
    if warning:
        warnings.warn(f"{path}: {warning}", stacklevel=2)
    key = _first_non_finite(tensors)
    if key is not None:
        raise _bad(path, f"{key} holds NaN or infinite values; the adapter is unusable")

    head_keys = set(head_meta["shapes"]) if head_meta else set()
    carried_keys = {k for shapes in carried_meta.values() for k in shapes}
    adapter_found = {k: v for k, v in tensors.items() if k not in head_keys | carried_keys}
    pairs: list[tuple[Tensor, Tensor]] = []
    # Modules the adapter will own (its head...): built and filled before the model changes.
    own: dict[str, nn.Module] = {}
    wanted = {p: (p, shapes) for p, shapes in carried_meta.items()}
    if load_head and head_keys and find_head(model) is not None:
        # The stored head is "the classifier": it goes where this model keeps its own.
        wanted[heads.head_path(model)] = (head_meta["module"], head_meta["shapes"])
    alone = not set(adapter_configs(model)) - {name}
    for module_path, (file_path, shapes) in wanted.items():
        prefix = f"{file_path}." if file_path else ""
        state = {k[len(prefix) :]: tensors[k] for k in shapes}
        base = heads.running(model, None, module_path) if alone else None
        if base is not None and {k: list(v.shape) for k, v in base.state_dict().items()} == {
            k: list(v.shape) for k, v in state.items()
        }:
            # The only adapter, and the model's module fits: copied in, as in a one-task model.
            target = heads.prefixed(module_path, base)
            pairs += _match(path, "head", target, {f"{prefix}{k}": v for k, v in state.items()})
            continue
        try:
            own[module_path] = heads.module_like(model, module_path, state)
        except ValueError as exc:
            raise _bad(path, f"the stored {module_path or 'module'} does not fit: {exc}") from None

    existing = adapter_configs(model)
    injected = False
    previous_active = active_adapter(model)
    if name in existing:
        if existing[name] != config:
            raise _bad(
                path,
                f"the model already has an adapter {name!r} with a different config "
                f"({existing[name]}) than the file ({config}). Load it under another name "
                f"(name=...) or remove the existing one first (arc_peft.delete_adapter).",
            )
    else:
        _check_name(name)
        with _rng_untouched(model):
            inject_arc(model, config, name=name)
        injected = True
    try:
        expected = _adapter_state(model, name)
        mapping = identity.remap_keys(set(adapter_found), set(expected))
        if mapping:  # e.g. features_only=True: the same blocks under other module names
            adapter_found = {mapping[k]: v for k, v in adapter_found.items()}
        pairs += _match(path, "adapter", expected, adapter_found)
        # Convert everything first (the step that can run out of memory), then copy: the copies
        # themselves cannot fail once shapes match, so the model never ends up half-loaded.
        staged = [(t, s.to(device=t.device, dtype=t.dtype)) for t, s in pairs]
        with torch.no_grad():
            for target, source in staged:
                target.copy_(source)
    except BaseException:
        if injected:
            delete_adapter(model, name)
            if previous_active is not None and active_adapter(model) != previous_active:
                set_active_adapter(model, previous_active)
        raise
    for module_path, module in own.items():
        heads.set_task_module(model, name, module_path, module)
    if activate is True:
        set_active_adapter(model, name)
    elif activate is False and active_adapter(model) != previous_active:
        set_active_adapter(model, previous_active)
    return model
