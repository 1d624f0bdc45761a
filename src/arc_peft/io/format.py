"""Reading adapter files defensively: every way a file can be wrong is an
``AdapterFileError``, found in time and memory bounded by small limits.

The order matters for the bounds: the file is checked to be a regular file before it is read
(a FIFO or ``/dev/zero`` would block or never end); the 8-byte length prefix and the header are
read and validated (size, tensor count, every entry, the metadata) before the tensor data is
read; and ``arc_peft.load_adapter`` compares the header's claims with the model before it
reads the data or builds anything. The format itself is described in ``docs/file-format.md``.
"""

from __future__ import annotations

import bisect
import contextlib
import hashlib
import itertools
import json
import math
import os
import re
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, BinaryIO

from ..errors import AdapterFileError, printable
from ..methods import AdapterConfig, config_from_dict
from ..state import __version__

if TYPE_CHECKING:  # torch is imported only to read the tensors: describing a file needs none
    from torch import Tensor

FORMAT_NAME = "arc_peft.adapter"
FORMAT_VERSION = 1

# Limits on what a reader accepts. A ViT-B/16 ARC file has a 5.4 KB header and 52 tensors; a
# 48-block model with AdaptMLP about 300 tensors. The limits are far above any real adapter but
# keep a hostile header's parse well under a second (see "Limits" in docs/file-format.md).
MAX_HEADER_BYTES = 4 * 1024 * 1024
MAX_TENSORS = 20_000
# JSON nesting the metadata may have (a config or fingerprint has 3 levels; free-form user
# metadata a few): deeper values hit Python's recursion limit in whatever prints them.
MAX_DEPTH = 64

_ITEMSIZE = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1,
}  # fmt: skip
_REQUIRED_METADATA = ("format_version", "arc_peft_version", "method", "config", "backbone")
# SHA-256 of the tensor data (everything after the header), hex; earlier files have none.
DIGEST_FIELD = "data_sha256"
_DIGEST = re.compile(r"[0-9a-f]{64}")
_VERSION = re.compile(r"[0-9]{1,6}")  # ASCII digits only: "²".isdigit() is True, int("²") fails


@dataclass(frozen=True)
class Header:
    """A validated header: string metadata, tensor entries and the file's size."""

    metadata: dict[str, str]
    entries: dict[str, dict[str, Any]]  # key -> {"dtype", "shape", "data_offsets"}
    file_size: int
    data_start: int
    raw: bytes = b""  # the prefix and header as read: the data is read with them once more


@dataclass(frozen=True)
class Contents:
    """The checked meaning of the metadata.

    ``head`` and ``trained`` are ``{"module"/"modules": ..., "shapes": {key: shape}}`` or
    ``None``: the classifier head, and the backbone modules trained with
    ``freeze_backbone(also=...)``.
    """

    config: AdapterConfig
    backbone: dict[str, Any]
    head: dict[str, Any] | None
    trained: dict[str, Any] | None
    # Computed once: callers test every file key against it, which rebuilding the set per test
    # made quadratic in the number of keys (19,000 head entries took 48 s).
    extra: frozenset[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        keys = set(self.head["shapes"]) if self.head else set()
        keys |= set(self.trained["shapes"]) if self.trained else set()
        object.__setattr__(self, "extra", frozenset(keys))

    def extra_keys(self) -> frozenset[str]:
        """File keys that are not adapter tensors."""
        return self.extra


def key_prefix(module_path: str) -> str:
    """The prefix of a module's keys in a state dict (``""`` for the model itself)."""
    return f"{module_path}." if module_path else ""


def nested_pair(paths: Iterable[str]) -> tuple[str, str] | None:
    """Two module paths of which one contains the other (or a repeated path), or ``None``.

    Sorted, a path's key prefix is followed directly by the prefixes it contains (every string
    between a prefix and one that starts with it starts with it too), so comparing neighbours
    finds any such pair in ``O(n log n)``."""
    ordered = sorted((key_prefix(p), p) for p in paths)
    for (prefix, path), (following, other) in itertools.pairwise(ordered):
        if following.startswith(prefix):
            return path, other
    return None


def outermost(paths: Iterable[str]) -> list[str]:
    """``paths`` in their order without repeats and without paths inside another of them (whose
    keys the outer module's state holds anyway): the form a file lists modules in."""
    paths = list(dict.fromkeys(paths))
    kept: list[str] = []
    for prefix, path in sorted((key_prefix(p), p) for p in paths):
        if not kept or not prefix.startswith(key_prefix(kept[-1])):
            kept.append(path)
    keep = set(kept)
    return [p for p in paths if p in keep]


def group_by_module(paths: Iterable[str], keys: Iterable[str]) -> dict[str, list[str]] | None:
    """``{module path: [its keys]}`` for disjoint module ``paths`` (see ``nested_pair``), or
    ``None`` if a key lies under none of them. ``O((paths + keys) log paths)``: the one prefix
    that can contain a key is the greatest one not after it (same argument as ``nested_pair``)."""
    ordered = sorted((key_prefix(p), p) for p in paths)
    prefixes = [prefix for prefix, _ in ordered]
    groups: dict[str, list[str]] = {p: [] for _, p in ordered}
    for key in keys:
        i = bisect.bisect_right(prefixes, key) - 1
        if i < 0 or not key.startswith(prefixes[i]) or key == prefixes[i]:
            return None
        groups[ordered[i][1]].append(key)
    return groups


class FileProblem(ValueError):
    """What is wrong with a file, said without its path: the checks here and in ``layout.py``
    raise it, and the verb reading the file (``load_adapter``, ``read_adapter_info``) turns it
    into one ``AdapterFileError`` naming the path (``about``)."""


@contextlib.contextmanager
def about(path: str) -> Iterator[None]:
    """Report every ``FileProblem`` raised inside as an ``AdapterFileError`` naming ``path``;
    the message quotes the file's text escaped (``printable``), so that printing it (a
    traceback, a log) cannot forge lines or send terminal escapes."""
    try:
        yield
    except FileProblem as exc:
        shown = path if path.isprintable() else repr(path)
        raise AdapterFileError(printable(f"{shown}: {exc}")) from None


def json_depth(value: Any) -> int:
    """How deeply ``value`` nests lists and dicts (0 for a scalar), without recursion."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, depth + 1)
            values = item.values() if isinstance(item, dict) else item
            stack.extend((v, depth + 1) for v in values)
    return deepest


def open_regular(path: str) -> BinaryIO:
    """Open ``path`` for reading, refusing anything but a regular file.

    ``O_NONBLOCK`` keeps opening a FIFO from waiting for a writer forever; a directory, device
    or FIFO is then refused by its ``fstat`` mode (their sizes say nothing about their length).
    """
    if "\0" in path:
        raise FileProblem("the path contains a NUL character")
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
    fd = os.open(path, flags)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = (
                "a directory"
                if stat.S_ISDIR(mode)
                else "a FIFO"
                if stat.S_ISFIFO(mode)
                else "a device or socket"
            )
            raise FileProblem(f"not a regular file ({kind}); adapter files are regular files")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_header(handle: BinaryIO) -> Header:
    """Read and validate only the length prefix and the header (bounded by ``MAX_HEADER_BYTES``)."""
    file_size = os.fstat(handle.fileno()).st_size
    prefix = handle.read(9)
    size = int.from_bytes(prefix[:8], "little") if len(prefix) >= 8 else 0
    rest = handle.read(size - 1) if 0 < size <= MAX_HEADER_BYTES and size < file_size else b""
    return parse_header(prefix + rest, file_size)


def _printable_json(value: Any) -> bool:
    """Whether every string in ``value`` can be encoded (JSON lets a file carry a lone
    surrogate such as ``"\\ud800"``, which later fails when printed or written)."""
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except (UnicodeEncodeError, ValueError, RecursionError):
        return False
    return True


def parse_header(head: bytes, file_size: int) -> Header:
    """Validate the safetensors header in ``head`` (the file's first bytes, at least the header)."""
    if file_size == 0:
        raise FileProblem("the file is empty (truncated, or the save never finished)")
    if file_size < 8:
        raise FileProblem(f"only {file_size} bytes: truncated, or not a safetensors file")
    if head[:4] == b"PK\x03\x04" or (head[:1] == b"\x80" and head[8:9] != b"{"):
        raise FileProblem(
            "not a safetensors file: it looks like a torch.save / pickle checkpoint. arc_peft "
            "never unpickles files; save adapters with arc_peft.save_adapter",
        )
    size = int.from_bytes(head[:8], "little")
    if size == 0 or size > 100 * 1024 * 1024:  # safetensors' own limit
        raise FileProblem("not a safetensors file (its first 8 bytes are not a header length)")
    if len(head) > 8 and head[8:9] != b"{":
        raise FileProblem("not a safetensors file (no JSON header after the length prefix)")
    if size > MAX_HEADER_BYTES:
        raise FileProblem(
            f"its header claims {size:,} bytes; adapter files have headers of a few KB and this "
            f"reader accepts at most {MAX_HEADER_BYTES:,}",
        )
    if 8 + size > file_size:
        raise FileProblem(
            f"truncated or corrupt: the header needs {8 + size} bytes but the file has "
            f"{file_size}. Re-save or re-download it.",
        )
    try:
        header = json.loads(head[8 : 8 + size].decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise FileProblem(f"corrupt header (not valid JSON: {exc})") from None
    if not isinstance(header, dict):
        raise FileProblem("corrupt header (expected a JSON object)")
    count = len(header) - ("__metadata__" in header)
    if count > MAX_TENSORS:
        raise FileProblem(f"{count:,} tensors; this reader accepts at most {MAX_TENSORS:,}")
    if not _printable_json(header):
        raise FileProblem("corrupt header (a string holds an unpaired UTF-16 surrogate)")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise FileProblem("corrupt header (__metadata__ must map strings to strings)")
    data_size = file_size - 8 - size
    spans = []
    for key, entry in header.items():
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise FileProblem(f"corrupt header entry for {key!r}")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        valid_shape = isinstance(shape, list) and all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
        )
        valid_offsets = (
            isinstance(offsets, list)
            and len(offsets) == 2
            and all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
        )
        if not isinstance(dtype, str) or dtype not in _ITEMSIZE or not valid_shape:
            raise FileProblem(f"corrupt header entry for {key!r}: {str(entry)[:200]}")
        if not valid_offsets:
            raise FileProblem(f"corrupt header entry for {key!r}: {str(entry)[:200]}")
        begin, end = offsets
        if not 0 <= begin <= end or end - begin != math.prod(shape) * _ITEMSIZE[dtype]:
            raise FileProblem(
                f"corrupt header: {key!r} has shape {str(shape)[:100]} ({dtype}) but spans "
                f"bytes [{begin}, {end}) of the data",
            )
        spans.append((begin, end, key))
    spans.sort()
    expected = 0
    for begin, end, key in spans:
        if begin != expected:
            raise FileProblem(f"corrupt header: tensor data is not contiguous at {key!r}")
        expected = end
    if expected > data_size:
        raise FileProblem(
            f"truncated: the tensors need {expected} bytes of data but only {data_size} "
            "follow the header. Re-save or re-download the file.",
        )
    if expected < data_size:
        raise FileProblem(f"corrupt: {data_size - expected} unexpected bytes after the tensor data")
    return Header(metadata, header, file_size, 8 + size, bytes(head[: 8 + size]))


def check_metadata(header: Header) -> None:
    """The file is an arc_peft adapter file of a version this reader knows."""
    meta = header.metadata
    if meta.get("format") != FORMAT_NAME:
        keys = sorted(header.entries)
        raise FileProblem(
            "a safetensors file, but not an arc_peft adapter file (no arc_peft metadata; it "
            f"holds {len(keys)} tensors, e.g. {keys[:3]}). Adapter files are written by "
            "arc_peft.save_adapter.",
        )
    version = meta.get("format_version", "")
    if not _VERSION.fullmatch(version):
        raise FileProblem(f"corrupt metadata: format_version={version[:20]!r} is not a number")
    if int(version) > FORMAT_VERSION:
        raise FileProblem(
            f"written by arc_peft {meta.get('arc_peft_version', '?')[:40]} with file-format "
            f"version {version}; this arc_peft ({__version__}) reads versions up to "
            f"{FORMAT_VERSION}. Update arc-peft (git pull, then pip install -e .) to read it",
        )
    missing = [k for k in _REQUIRED_METADATA if k not in meta]
    if missing:
        raise FileProblem(f"corrupt metadata: missing field(s) {missing}")
    digest = meta.get(DIGEST_FIELD)
    if digest is not None and not _DIGEST.fullmatch(digest):
        raise FileProblem(
            f"corrupt metadata: {DIGEST_FIELD}={digest[:80]!r} is not a SHA-256 hex digest"
        )


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_backbone(backbone: Any) -> None:
    widths = backbone.get("widths") if isinstance(backbone, dict) else None
    valid = (
        isinstance(backbone, dict)
        and isinstance(backbone.get("architecture"), str)
        and _is_count(backbone.get("num_blocks"))
        and isinstance(widths, dict)
        and all(isinstance(w, list) and all(_is_count(v) for v in w) for w in widths.values())
        and (
            "contains" not in backbone
            or (
                isinstance(backbone["contains"], list)
                and all(isinstance(c, str) for c in backbone["contains"])
            )
        )
    )
    if not valid:
        raise FileProblem(
            "corrupt metadata: backbone must be a JSON object {architecture: str, num_blocks: "
            "int, widths: {position: [int, ...]}, contains (optional): [str, ...]}, got "
            f"{str(backbone)[:200]}",
        )


def _tensor_group(header: Header, value: Any, field: str, where: str) -> Any:
    """Check a ``{where: ..., "shapes": {key: shape}}`` group of stored tensors (or ``None``)."""
    if value is None:
        return None
    shapes = value.get("shapes") if isinstance(value, dict) else None
    located = value.get(where) if isinstance(value, dict) else None
    where_ok = isinstance(located, str) or (
        isinstance(located, list) and all(isinstance(m, str) for m in located)
    )
    if not isinstance(shapes, dict) or not where_ok:
        raise FileProblem(f"corrupt metadata: {field} must be null or {{{where}, shapes}}")
    for key, shape in shapes.items():
        entry = header.entries.get(key)
        if entry is None or entry["shape"] != shape:
            raise FileProblem(f"corrupt metadata: {field} tensor {key!r} does not match the data")
    # Each stored tensor belongs to exactly one listed module: what lets a load sort them in
    # linear time (a path listed 20,000 times cost paths × keys before: 0.8 MB took 51 s).
    modules = [located] if isinstance(located, str) else located
    pair = nested_pair(modules)
    if pair is not None:
        raise FileProblem(
            f"corrupt metadata: {field} lists the module {pair[0][:100]!r} twice, or with "
            f"{pair[1][:100]!r} inside it"
        )
    if group_by_module(modules, shapes) is None:
        raise FileProblem(f"corrupt metadata: a {field} tensor lies outside the {field} modules")
    return value


def check_depth(meta: dict[str, str], key: str) -> None:
    """The JSON metadata field ``key`` (if present and valid JSON) nests at most ``MAX_DEPTH``
    levels."""
    try:
        value = json.loads(meta[key]) if key in meta else None
    except (ValueError, RecursionError):
        return  # reported as invalid JSON where the field is read
    if json_depth(value) > MAX_DEPTH:
        raise FileProblem(
            f"corrupt metadata: {key} nests deeper than {MAX_DEPTH} levels (arc_peft writes "
            "and reads at most that)"
        )


def parse_metadata(header: Header) -> Contents:
    """The config, backbone fingerprint, head and trained modules, each checked for shape."""
    meta = header.metadata
    for key in ("config", "backbone", "head", "trained", "model", "user"):
        check_depth(meta, key)
    try:
        config = config_from_dict(json.loads(meta["config"]))
    except (ValueError, TypeError, KeyError, AttributeError, RecursionError) as exc:
        raise FileProblem(f"unusable method config {meta['config'][:300]!r}: {exc}") from None
    if config.method != meta["method"]:
        raise FileProblem(f"corrupt metadata: method {meta['method'][:40]!r} but config {config}")
    try:
        backbone = json.loads(meta["backbone"])
        head = json.loads(meta.get("head", "null"))
        trained = json.loads(meta.get("trained", "null"))
    except (ValueError, RecursionError) as exc:
        raise FileProblem(f"corrupt metadata (backbone/head is not valid JSON: {exc})") from None
    if not _printable_json([backbone, head, trained]):
        raise FileProblem("corrupt metadata (a string holds an unpaired UTF-16 surrogate)")
    _check_backbone(backbone)
    head = _tensor_group(header, head, "head", "module")
    trained = _tensor_group(header, trained, "trained", "modules")
    if head and trained and set(head["shapes"]) & set(trained["shapes"]):
        raise FileProblem("corrupt metadata: a tensor is listed both as head and as trained")
    return Contents(config, backbone, head, trained)


def _pieces(handle: BinaryIO, offset: int, size: int, piece: int) -> Iterator[bytes]:
    """Up to ``size`` bytes from ``offset``, ``piece`` bytes at a time, from the file itself:
    not from the buffer the header was read through, which would hide a change made since.
    Stops early at the end of the file."""
    end = offset + size
    while offset < end:
        length = min(end - offset, piece)
        if hasattr(os, "pread"):
            chunk = os.pread(handle.fileno(), length, offset)
        else:  # Windows
            handle.seek(offset)
            chunk = handle.read(length)
        if not chunk:
            return
        yield chunk
        offset += len(chunk)


def _read_from_start(handle: BinaryIO, size: int) -> bytes:
    """Up to ``size`` bytes from the file's start (one read returns at most ~2 GB on Linux)."""
    return b"".join(_pieces(handle, 0, size, 1 << 30))


def _check_digest(digest: str, actual: str) -> None:
    if actual != digest:
        raise FileProblem(
            f"corrupt: the tensor data does not match the checksum the file was written with "
            f"({DIGEST_FIELD} {digest[:12]}..., the data hashes to {actual[:12]}...). The "
            "file was damaged after it was saved (an interrupted copy or download, a disk "
            "error); save it again or fetch a fresh copy"
        )


def verify_data(handle: BinaryIO, header: Header) -> bool:
    """Check the tensor data against the checksum stored in the header, without parsing it
    (no torch): ``True`` when it matches, ``False`` when the file stores none (written before
    arc_peft stored one). Read in 1 MiB pieces, so memory stays bounded whatever the size."""
    digest = header.metadata.get(DIGEST_FIELD)
    if digest is None:
        return False
    sha, read, size = hashlib.sha256(), 0, header.file_size - header.data_start
    # One byte past the end: a file that grew since its header was read is refused too.
    for chunk in _pieces(handle, header.data_start, size + 1, 1 << 20):
        sha.update(chunk[: max(0, size - read)])
        read += len(chunk)
    if read != size:
        raise FileProblem("the file changed while it was being read; read it again")
    _check_digest(digest, sha.hexdigest())
    return True


def read_tensors(handle: BinaryIO, header: Header) -> dict[str, Tensor]:
    """Every tensor of a validated header (on the CPU): reads the data only now.

    The file is read once more from its start, one byte past its size: the bytes must be the
    header that was checked followed by exactly the data it describes. A writer appending to
    the file or rewriting it in place meanwhile is refused, not half-believed."""
    raw = _read_from_start(handle, header.file_size + 1)
    if len(raw) != header.file_size or (header.raw and raw[: header.data_start] != header.raw):
        raise FileProblem("the file changed while it was being read; load it again")
    digest = header.metadata.get(DIGEST_FIELD)
    if digest is not None:
        _check_digest(digest, hashlib.sha256(memoryview(raw)[header.data_start :]).hexdigest())
    try:
        import safetensors.torch

        tensors = safetensors.torch.load(raw)
    except Exception as exc:  # the Rust reader raises its own SafetensorError type
        raise FileProblem(f"corrupt safetensors data ({exc})") from None
    if set(tensors) != set(header.entries) or any(
        list(t.shape) != header.entries[k]["shape"] for k, t in tensors.items()
    ):
        raise FileProblem("corrupt: the tensors do not match the header (changed while read?)")
    return tensors


def runs(values: list[int]) -> str:
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
