"""The ``arc-peft`` command line.

    arc-peft inspect cifar100.safetensors           # readable summary of an adapter file
    arc-peft inspect cifar100.safetensors --json    # the same as JSON

A bad file exits with status 1 and the error message on stderr (no traceback).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from .errors import AdapterFileError
from .io import read_adapter_info

__all__ = ["main"]


def _inspect(args: argparse.Namespace) -> int:
    info = read_adapter_info(args.file)
    if args.json:
        print(json.dumps(info.to_dict(), indent=2, sort_keys=True))
    else:
        print(info)
    return 0


def _parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="arc-peft", description="Tools for arc_peft adapter files."
    )
    parser.add_argument("--version", action="version", version=f"arc-peft {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    inspect = commands.add_parser(
        "inspect",
        help="describe an adapter file (method, config, counts, backbone, versions)",
        description="Describe an adapter file without loading a model.",
    )
    inspect.add_argument("file", help="an adapter file written by arc_peft.save_adapter")
    inspect.add_argument("--json", action="store_true", help="print JSON instead of text")
    inspect.set_defaults(run=_inspect)
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
    except (AdapterFileError, OSError) as exc:
        # OSError covers a missing or unreadable file; its message already names the path.
        print(f"arc-peft {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
