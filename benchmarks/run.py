"""Speed and memory of arc_peft's adapters against the frozen backbone and their peers.

    python benchmarks/run.py --quick --out /tmp/bench      # a tiny model, seconds
    python benchmarks/run.py --official-arc PATH           # everything (long on a CPU)

The package: ``settings`` (the command line), ``methods`` (how each compared model is built),
``measure`` (clocks and memory), ``sections`` (what is measured), ``report`` (tables, plot).
Results go to ``<out>/results.json``, ``results.md`` and ``benchmarks.png``.
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make ``benchmarks`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from benchmarks import methods, report
from benchmarks.sections import RUNNERS, log, out_of_time
from benchmarks.settings import parse_args


def main(argv: list[str] | None = None) -> dict:
    settings = parse_args(argv)
    if settings.render:
        return report.render(settings.render, settings.out)
    if settings.device.type == "cpu":
        torch.set_num_threads(settings.threads)
    methods.OFFICIAL_SOURCE[:] = [settings.official_arc] if settings.official_arc else []
    notes: list[str] = []
    args = sys.argv[1:] if argv is None else argv
    results: dict[str, Any] = {
        "command": ("python benchmarks/run.py " + " ".join(args)).strip(),
        "environment": report.environment(settings.device),
        "settings": {
            k: (str(v) if isinstance(v, (Path, torch.device)) else v)
            for k, v in vars(settings).items()
        },
        "notes": notes,
    }
    settings.out.mkdir(parents=True, exist_ok=True)
    if settings.time_limit is not None:
        settings.deadline = time.monotonic() + settings.time_limit
    for section in settings.sections:
        if out_of_time(settings):
            notes.append(f"section {section} skipped: --time-limit {settings.time_limit:g} s")
            continue
        log(f"section {section}")
        try:
            results[section] = RUNNERS[section](settings, notes)
        except Exception as exc:  # one failed section must not lose the others
            if settings.quick and not settings.gpu:
                raise  # the smoke test (CI) must see it
            where = traceback.extract_tb(exc.__traceback__)[-1]
            notes.append(
                f"section {section} failed: {type(exc).__name__}: {exc} "
                f"({where.filename}:{where.lineno})"
            )
            log(notes[-1])
        # Written after every section: an interrupted long run keeps what it measured.
        (settings.out / "results.json").write_text(json.dumps(results, indent=1, default=str))
        report.write(results, settings.out, plot=False)
    report.write(results, settings.out)
    log(f"wrote {settings.out / 'results.md'} and {settings.out / 'results.json'}")
    return results


if __name__ == "__main__":
    main()
