"""The ``arc-peft`` command line (also ``python -m arc_peft``)::

    arc-peft inspect cifar100.safetensors            # readable summary of an adapter file
    arc-peft inspect a.safetensors b.safetensors --json
    arc-peft inspect cifar100.safetensors --verify   # also check the data against its checksum
    arc-peft compare a.safetensors b.safetensors     # several files side by side
    arc-peft check cifar100.safetensors --model vit_base_patch16_224

``inspect`` and ``compare`` read only the files' JSON headers (``inspect --verify`` also hashes
the tensor data): they import neither torch nor timm, so they answer in a fraction of a second.
``check`` builds the named timm model (random weights, nothing downloaded) and loads the file
into it. A bad file exits with status 1 and a one-line message on stderr (no traceback).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from .errors import AdapterFileError, printable
from .io.format import about
from .io.info import read_adapter_info
from .state import __version__

__all__ = ["main"]


def _compact_json(value: Any, indent: int = 0) -> str:
    """JSON with objects indented and lists of numbers or strings on one line, so per-block
    widths of a 24-block model take one line each, not 24."""
    pad, inner = " " * indent, " " * (indent + 2)
    if isinstance(value, dict) and value:
        items = [
            f"{inner}{json.dumps(str(k))}: {_compact_json(v, indent + 2)}"
            for k, v in sorted(value.items())
        ]
        return "{\n" + ",\n".join(items) + f"\n{pad}}}"
    if isinstance(value, (list, tuple)) and any(isinstance(v, (dict, list)) for v in value):
        items = [f"{inner}{_compact_json(v, indent + 2)}" for v in value]
        return "[\n" + ",\n".join(items) + f"\n{pad}]"
    return json.dumps(value)  # ensure_ascii: lone surrogates come out as \udcxx escapes


def _printable_lines(text: str) -> str:
    return "\n".join(printable(line) for line in text.splitlines())


def _error(command: str, exc: BaseException | str) -> None:
    # One line: a message may quote file content (newlines, escapes, lone surrogates).
    message = printable(" ".join(str(exc).split()))
    print(f"arc-peft {command}: error: {message}", file=sys.stderr)


def _infos(command: str, files: Sequence[str], verify: bool = False) -> tuple[list[Any], bool]:
    """The files that read, and whether any did not: a shell glob (``*.safetensors``) picks up
    other safetensors files too; each gets an error line and the rest are still described."""
    infos, failed = [], False
    for f in files:
        try:
            infos.append(read_adapter_info(f, verify=verify))
        except (AdapterFileError, OSError, ValueError) as exc:
            if isinstance(exc, BrokenPipeError):
                raise
            _error(command, exc)
            failed = True
    return infos, failed


def _inspect(args: argparse.Namespace) -> int:
    infos, failed = _infos("inspect", args.files, verify=args.verify)
    if args.json and infos:
        data = [info.to_dict() for info in infos]
        print(_compact_json(data[0] if len(data) == 1 and len(args.files) == 1 else data))
    elif infos:
        print("\n\n".join(_printable_lines(str(info)) for info in infos))
    return 1 if failed else 0


def _classes(info: Any) -> int | None:
    if info.head is None:
        return None
    weights = [s for k, s in info.head["shapes"].items() if k.endswith("weight")]
    return weights[-1][0] if weights and weights[-1] else None


def _values(info: Any) -> dict[str, Any]:
    """One file's row of ``compare``, as JSON values (numbers as numbers, ``None`` if absent)."""
    model = info.model or {}
    arch = model.get("architecture") or str(info.backbone.get("architecture", "?")).rsplit(".")[-1]
    metrics = info.metadata.get("metrics")
    blocks = info.backbone.get("num_blocks")
    return {
        "file": info.path,
        "method": info.method,
        "config": ", ".join(
            f"{k}={v}" for k, v in info.config.to_dict().items() if k in ("rank", "bottleneck")
        ),
        "positions": ",".join(info.config.positions),
        "adapter params": info.adapter_parameters,
        "classes": _classes(info),
        "head params": info.head_parameters,
        "trained modules": list(info.trained["modules"]) if info.trained else None,
        "model": arch,
        "tag": model.get("tag") or model.get("name_or_path"),
        "blocks": blocks if isinstance(blocks, int) else None,
        "dataset": info.metadata.get("dataset"),
        "metrics": metrics if isinstance(metrics, dict) else None,
        "size": info.file_size,
        "arc_peft": info.arc_peft_version,
    }


def _text(label: str, value: Any) -> str:
    """A table cell of ``compare``: counts with thousands separators, ``-`` for nothing."""
    if value is None:
        return "-"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,} B" if label == "size" else f"{value:,}"
    if isinstance(value, list):
        return ", ".join(str(v) for v in value)
    if isinstance(value, dict):
        return ", ".join(f"{k}={v}" for k, v in value.items())
    return str(value)


def _compare(args: argparse.Namespace) -> int:
    infos, failed = _infos("compare", args.files)
    values = [_values(info) for info in infos]
    if args.json:
        if values:
            print(_compact_json(values))
        return 1 if failed else 0
    if not values:
        return 1
    tables = [{label: _text(label, v) for label, v in row.items()} for row in values]
    labels = list(tables[0])
    width = max(len(label) for label in labels)
    columns = [[printable(t[label]) for label in labels] for t in tables]
    sizes = [max(len(cell) for cell in column) for column in columns]
    for i, label in enumerate(labels):
        cells = [column[i].ljust(size) for column, size in zip(columns, sizes, strict=True)]
        differs = len({t[label] for t in tables}) > 1 and label != "file"
        marker = "*" if differs else " "
        print(f"{marker} {label:<{width}}  " + "  ".join(cells).rstrip())
    print("(* differs between the files)")
    return 1 if failed else 0


def _check(args: argparse.Namespace) -> int:
    import warnings

    import torch

    # torch, timm and the loader only for the command that builds a model: inspect and compare
    # answer without importing torch.
    from .io.hub import build_timm
    from .io.loading import load_adapter

    info = read_adapter_info(args.file)
    kwargs = json.loads(args.model_kwargs) if args.model_kwargs else {}
    if not isinstance(kwargs, dict):
        raise ValueError(f"--model-kwargs must be a JSON object, got {args.model_kwargs!r}")
    _check_model_name(args.model)
    with torch.device("cpu"), about(info.path):  # the head's classes checked before it is built
        model = build_timm(args.model, info, pretrained=False, **kwargs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_adapter(model, args.file, check_model=not args.no_check_model)
    for warning in caught:
        print(f"warning: {printable(str(warning.message))}", file=sys.stderr)
    print(printable(f"{args.file}: fits {args.model}"))
    return 0


def _check_model_name(name: str) -> None:
    """A model name timm does not know, with the registered names closest to it."""
    import difflib

    import timm

    if timm.is_model(name):
        return
    base = name.split(".", 1)[0]  # "arch.tag": the tag is checked when the model is built
    if timm.is_model(base):
        return
    close = difflib.get_close_matches(base, timm.list_models(), n=5, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else " (timm.list_models() lists them)"
    raise ValueError(f"--model {name!r} is not a timm model{hint}")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="arc-peft", description="Tools for arc_peft adapter files."
    )
    parser.add_argument("--version", action="version", version=f"arc-peft {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    inspect = commands.add_parser(
        "inspect",
        help="describe adapter files (method, config, counts, backbone, metadata, versions)",
        description="Describe adapter files without loading a model.",
    )
    inspect.add_argument("files", nargs="+", metavar="FILE", help="adapter file(s)")
    inspect.add_argument("--json", action="store_true", help="print JSON instead of text")
    inspect.add_argument(
        "--verify",
        action="store_true",
        help="also read the tensor data and check it against the file's checksum (a damaged "
        "file then fails here, not at load time)",
    )
    inspect.set_defaults(run=_inspect)
    compare = commands.add_parser(
        "compare",
        help="several adapter files side by side",
        description="A table of several adapter files, one column each; * marks differences.",
    )
    compare.add_argument("files", nargs="+", metavar="FILE", help="adapter files")
    compare.add_argument("--json", action="store_true", help="print JSON instead of a table")
    compare.set_defaults(run=_compare)
    check = commands.add_parser(
        "check",
        help="check that a file fits a named timm model",
        description="Build the timm model (random weights, nothing downloaded) and load the "
        "file into it; exit status 0 if it fits, 1 with the reason if not.",
    )
    check.add_argument("file", help="an adapter file")
    check.add_argument("--model", required=True, help="timm model name, e.g. vit_base_patch16_224")
    check.add_argument(
        "--model-kwargs", default="", help="JSON keyword arguments, e.g. '{\"img_size\": 384}'"
    )
    check.add_argument(
        "--no-check-model",
        action="store_true",
        help="load even if the file records another backbone architecture (the widths must "
        "still agree): check_model=False",
    )
    check.set_defaults(run=_check)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line with ``argv`` (default: ``sys.argv[1:]``); returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return args.run(args)
    except BrokenPipeError:
        # The reader went away (`arc-peft inspect f | head`): not an error worth a message.
        # Point stdout at /dev/null so that Python's own flush at exit does not fail again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    except (AdapterFileError, OSError, ValueError, RuntimeError) as exc:
        # OSError covers a missing or unreadable file; its message already names the path.
        if "check_model=False" in str(exc) and args.command == "check":
            _error(args.command, f"{exc} (on the command line: --no-check-model)")
        else:
            _error(args.command, exc)
        return 1


if __name__ == "__main__":
    sys.exit(main())
