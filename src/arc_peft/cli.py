"""The ``arc-peft`` command line (also ``python -m arc_peft``)::

    arc-peft inspect cifar100.safetensors            # readable summary of an adapter file
    arc-peft inspect a.safetensors b.safetensors --json
    arc-peft compare a.safetensors b.safetensors     # several files side by side
    arc-peft check cifar100.safetensors --model vit_base_patch16_224

``inspect`` and ``compare`` read only the files' JSON headers: they import neither torch nor
timm, so they answer in a fraction of a second. ``check`` builds the named timm model (random
weights, nothing downloaded) and loads the file into it. A bad file exits with status 1 and a
one-line message on stderr (no traceback).
"""

from __future__ import annotations

import argparse
import json
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


def _infos(files: Sequence[str]) -> list[Any]:
    return [read_adapter_info(f) for f in files]


def _inspect(args: argparse.Namespace) -> int:
    infos = _infos(args.files)
    if args.json:
        data = [info.to_dict() for info in infos]
        print(_compact_json(data[0] if len(data) == 1 else data))
    else:
        print("\n\n".join(_printable_lines(str(info)) for info in infos))
    return 0


def _classes(info: Any) -> str:
    if info.head is None:
        return "-"
    weights = [s for k, s in info.head["shapes"].items() if k.endswith("weight")]
    return str(weights[-1][0]) if weights and weights[-1] else "?"


def _rows(info: Any) -> dict[str, str]:
    model = info.model or {}
    arch = model.get("architecture") or str(info.backbone.get("architecture", "?")).rsplit(".")[-1]
    metrics = info.metadata.get("metrics")
    return {
        "file": info.path,
        "method": info.method,
        "config": ", ".join(
            f"{k}={v}" for k, v in info.config.to_dict().items() if k in ("rank", "bottleneck")
        ),
        "positions": ",".join(info.config.positions),
        "adapter params": f"{info.adapter_parameters:,}",
        "classes": _classes(info),
        "head params": f"{info.head_parameters:,}",
        "trained modules": ", ".join(info.trained["modules"]) if info.trained else "-",
        "model": arch,
        "tag": str(model.get("tag") or model.get("name_or_path") or "-"),
        "blocks": str(info.backbone.get("num_blocks", "?")),
        "dataset": str(info.metadata.get("dataset", "-")),
        "metrics": ", ".join(f"{k}={v}" for k, v in metrics.items())
        if isinstance(metrics, dict)
        else "-",
        "size": f"{info.file_size:,} B",
        "arc_peft": info.arc_peft_version,
    }


def _compare(args: argparse.Namespace) -> int:
    tables = [_rows(info) for info in _infos(args.files)]
    if args.json:
        print(_compact_json(tables))
        return 0
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
    return 0


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
    with torch.device("cpu"), about(info.path):  # the head's classes checked before it is built
        model = build_timm(args.model, info, pretrained=False, **kwargs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_adapter(model, args.file)
    for warning in caught:
        print(f"warning: {printable(str(warning.message))}", file=sys.stderr)
    print(printable(f"{args.file}: fits {args.model}"))
    return 0


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
    except (AdapterFileError, OSError, ValueError, RuntimeError) as exc:
        # OSError covers a missing or unreadable file; its message already names the path.
        # One line: a message may quote file content (newlines, escapes, lone surrogates).
        message = printable(" ".join(str(exc).split()))
        print(f"arc-peft {args.command}: error: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
