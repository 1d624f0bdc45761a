"""Describing an adapter file from its header alone: ``AdapterInfo`` and
``read_adapter_info``.

Nothing here imports torch (nor does anything it imports), so ``import arc_peft`` followed by
``arc_peft.read_adapter_info`` and the ``arc-peft inspect`` command line answer in a fraction
of a second.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Any

from ..errors import printable
from ..methods import AdapterConfig
from ..state import DEFAULT_ADAPTER
from . import identity
from .format import (
    DIGEST_FIELD,
    FileProblem,
    Header,
    about,
    check_metadata,
    open_regular,
    parse_metadata,
    read_header,
    runs,
    verify_data,
)
from .sources import resolve

__all__ = ["AdapterInfo", "identity_fields", "read_adapter_info"]


@dataclass(frozen=True)
class AdapterInfo:
    """What an adapter file holds, read from its header alone (no model, no tensor data).

    ``str(info)`` is a readable summary; ``to_dict`` is JSON-ready.

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
        trained: ``{"modules": [path, ...], "shapes": {key: shape}}`` of backbone modules
            trained with ``freeze_backbone(also=...)``, or ``None``.
        trained_parameters: Parameters (and buffers) of those modules.
        model: Identity of the backbone (``library``, ``architecture``, and ``tag`` /
            ``hub_id`` / ``name_or_path`` where known); ``{}`` if unknown.
        metadata: The free-form metadata given to ``save_adapter``.
        data_sha256: The SHA-256 checksum of the tensor data stored in the header, or ``None``
            (files written before arc_peft stored one).
        data_verified: Whether the data was read and found to match ``data_sha256``
            (``read_adapter_info(..., verify=True)``); ``False`` when it was not checked.
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
    trained: dict[str, Any] | None = None
    trained_parameters: int = 0
    model: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)
    data_sha256: str | None = None
    data_verified: bool = False

    @property
    def method(self) -> str:
        return self.config.method

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (the config as ``ARCConfig.to_dict`` gives it)."""
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        data["config"] = self.config.to_dict()
        data["method"] = self.method
        return data

    def __str__(self) -> str:
        try:
            return self._summary()
        except Exception:  # a hand-built AdapterInfo may hold anything; str() must not fail
            return f"{self.path!s}: an arc_peft adapter file (unreadable description)"

    def _summary(self) -> str:
        backbone = self.backbone if isinstance(self.backbone, dict) else {}
        widths = backbone.get("widths")
        widths = widths if isinstance(widths, dict) else {}
        width_text = "; ".join(f"{p} {runs(w)}" for p, w in widths.items() if isinstance(w, list))
        blocks = backbone.get("num_blocks")
        if self.head is None:
            head_text = "not stored"
        else:
            shapes = ", ".join(f"{k} {v}" for k, v in self.head["shapes"].items())
            head_text = f"{self.head_parameters:,} parameters ({shapes})"
        rows = [
            ("method", f"{self.method}: {self.config}"),
            ("adapter", f"{self.adapter_parameters:,} parameters (saved as {self.name!r})"),
            ("head", head_text),
            ("backbone", f"{backbone.get('architecture')}, {blocks} blocks"),
            ("widths", width_text),
            ("tensors", f"{self.num_tensors} {self.dtype}, {self.file_size:,} bytes"),
            ("data", self._data_text()),
            ("written by", f"arc_peft {self.arc_peft_version}, file format {self.format_version}"),
        ]
        if self.trained:
            modules = ", ".join(self.trained["modules"])
            rows.insert(3, ("trained", f"{self.trained_parameters:,} values in {modules}"))
        rows[3:3] = identity.describe(self.model, self.metadata)
        # Every value may be a file's text: escaped, so that it cannot start rows of its own
        # (a forged "model ... (tag VERIFIED)") or send terminal escapes.
        lines = [printable(self.path)]
        lines += [f"  {printable(label):<11} {printable(text)}" for label, text in rows]
        return "\n".join(lines)

    def _data_text(self) -> str:
        if self.data_sha256 is None:
            return "no checksum stored (written before arc_peft stored one)"
        if self.data_verified:
            return f"sha256 {self.data_sha256[:16]}..., verified"
        return f"sha256 {self.data_sha256[:16]}..., not checked (arc-peft inspect --verify)"


def identity_fields(header: Header) -> tuple[dict[str, Any], dict[str, Any]]:
    """The file's model identity and user metadata (``{}`` when absent)."""
    try:
        meta = header.metadata
        return identity.json_object(meta, "model"), identity.json_object(meta, "user")
    except ValueError as exc:
        raise FileProblem(f"corrupt metadata: {exc}") from None


def read_adapter_info(path: str | os.PathLike[str], *, verify: bool = False) -> AdapterInfo:
    """Describe an adapter file without a model: config, counts, backbone, versions.

    Only the header is read and checked (structure, sizes, metadata); tensor values are checked
    by ``load_adapter``.

    Args:
        path: The file (or a Hub reference, as ``load_adapter`` takes it).
        verify: Also read the tensor data and check it against the checksum the file was
            written with (still without torch), so that a file damaged after it was saved is
            refused here rather than at ``load_adapter``. ``info.data_verified`` says whether
            it was checked (a file written before checksums were stored has none to check).

    Raises:
        AdapterFileError: the file is not a (readable, current) arc_peft adapter file, or, with
            ``verify=True``, its data does not match its checksum.
        OSError: the file cannot be opened.
    """
    path = resolve(path)
    with about(path):
        with open_regular(path) as handle:
            header = read_header(handle)
            check_metadata(header)
            verified = verify_data(handle, header) if verify else False
        contents = parse_metadata(header)
        model_id, user = identity_fields(header)
    counts = {k: math.prod(e["shape"]) for k, e in header.entries.items()}

    def total(group: dict[str, Any] | None) -> int:
        return sum(counts[k] for k in group["shapes"]) if group else 0

    meta = header.metadata
    head_params, trained_params = total(contents.head), total(contents.trained)
    return AdapterInfo(
        path=path,
        format_version=int(meta["format_version"]),
        arc_peft_version=meta["arc_peft_version"],
        name=meta.get("name", DEFAULT_ADAPTER),
        config=contents.config,
        backbone=contents.backbone,
        head=contents.head,
        dtype=meta.get("dtype", ""),
        num_tensors=len(counts),
        adapter_parameters=sum(counts.values()) - head_params - trained_params,
        head_parameters=head_params,
        file_size=header.file_size,
        trained=contents.trained,
        trained_parameters=trained_params,
        model=model_id,
        metadata=user,
        data_sha256=meta.get(DIGEST_FIELD),
        data_verified=verified,
    )
