"""Tables (markdown), the plot, and combining runs."""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
from pathlib import Path
from typing import Any

import torch

import arc_peft

from .methods import METHODS
from .settings import SECTIONS


def environment(device: torch.device) -> dict:
    import timm

    versions = {}
    for package in ("peft", "adapter_plus"):
        try:
            from importlib.metadata import version

            versions[package] = version(package.replace("_", "-"))
        except Exception:
            versions[package] = None
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    return {
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "machine": platform.platform(),
        "device": name,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        **versions,
        "arc_peft": arc_peft.__version__,
    }


def _f(value: Any, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{value:.{digits}f}"


def _label(method: str) -> str:
    return METHODS[method].label


def _inference(rows: list[dict]) -> list[str]:
    lines = ["## Inference (eval, no grad): time / plain backbone (± spread)", ""]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    lines.append("| model | dtype | batch | " + " | ".join(_label(m) for m in methods) + " |")
    lines.append("|---|---|---:|" + "---:|" * len(methods))
    for key in dict.fromkeys((r["model"], r["dtype"], r["batch"]) for r in rows):
        got = {r["method"]: r for r in rows if (r["model"], r["dtype"], r["batch"]) == key}
        cells = [
            f"{_f(got[m]['time_ratio_plain'], 3)} ±{_f(got[m]['spread'], 2)}"
            + (f" ({got[m]['ms']:.0f} ms)" if m == "plain" else "")
            if m in got
            else "—"
            for m in methods
        ]
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def _training(rows: list[dict]) -> list[str]:
    lines = [
        "## Training step (forward + backward + AdamW): ratios to the floor",
        "",
        "| model | dtype | batch | method | trainable | ms | ± | images/s | time / floor | "
        "saved MiB | saved / floor | peak MiB | peak / floor |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['dtype']} | {r['batch']} | {_label(r['method'])} | "
            f"{r['trainable']:,} | {r['ms']:.0f} | {_f(r['spread'])} | "
            f"{_f(r['images_per_s'], 1)} | {_f(r['time_ratio_floor'], 3)} | "
            f"{_f(r['saved_mib'], 1)} | {_f(r.get('saved_mib_ratio_floor'), 3)} | "
            f"{_f(r.get('peak_mib'), 0)} | {_f(r.get('peak_mib_ratio_floor'), 3)} |"
        )
    return [*lines, ""]


def _scaling(rows: list[dict]) -> list[str]:
    lines = [
        "## Scaling: ARC against the floor (training) and the plain backbone (inference)",
        "",
        "| axis | point | tokens | step / floor | ± | saved / floor | inference / plain | "
        "floor step ms |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['axis']} | {r['point']} | {r['tokens']} | {_f(r['train_ratio_floor'], 3)} | "
            f"{_f(r['train_spread'])} | {_f(r['saved_ratio_floor'], 3)} | "
            f"{_f(r['infer_ratio'], 3)} | {r['floor_step_ms']:.1f} |"
        )
    return [*lines, ""]


def markdown(results: dict) -> str:
    env, s = results["environment"], results["settings"]
    lines = [
        "# arc_peft benchmark results",
        "",
        " · ".join(f"{k} {v}" for k, v in env.items()),
        "",
        f"Command: `{results['command']}`. Timer: {s['timer']} time on CPU, wall time on CUDA; "
        f"{s['warmup']} warm-up + {s['repeats']} interleaved repeats per method; medians; "
        "± is half the range of the repeats over the median; every ratio from one run.",
        "",
    ]
    lines += [f"> Note: {n}" for n in dict.fromkeys(results["notes"])]
    lines += [""] if results["notes"] else []
    if results.get("inference"):
        lines += _inference(results["inference"])
    if results.get("training"):
        lines += _training(results["training"])
    if results.get("scaling"):
        lines += _scaling(results["scaling"])
    if results.get("files"):
        f = results["files"]
        lines += [
            "## Adapter files and switching",
            "",
            f"{f['model']}, ARC r={s['rank']}: {f['adapter_params']:,} adapter parameters; file "
            f"{f['file_bytes'] / 1e3:.1f} kB (with the head); save {f['save_ms']:.1f} ms; load "
            f"{f['load_ms']:.1f} ms; `set_active_adapter` {f['switch_us']:.0f} µs.",
            "",
        ]
    if results.get("multitask"):
        m = results["multitask"]
        lines += [
            "## Multi-task serving",
            "",
            f"{m['model']}, batch {m['batch']}, eval: merged ARC {_f(m['merged_vs_plain'], 3)}x "
            f"the plain backbone; unmerged {_f(m['unmerged_vs_plain'], 3)}x; one mixed batch of "
            f"8 tasks {_f(m['mixed_vs_one_by_one'], 3)}x eight single-sample passes, "
            f"{_f(m['mixed_vs_single_task'], 3)}x one single-task batch of 8.",
            "",
        ]
    if results.get("compile"):
        c = results["compile"]
        lines += [
            "## torch.compile (inductor) vs eager, ARC unmerged, inference",
            "",
            f"{c['model']}, batch {c['batch']}: compilation {c['first_call_s']:.1f} s; then "
            f"{c['compiled_ms']:.1f} ms vs {c['eager_ms']:.1f} ms eager ({_f(c['ratio'], 3)}x); "
            f"max |compiled - eager| = {c['max_abs_diff']:.1e}.",
            "",
        ]
    if results.get("ops"):
        lines += _ops(results["ops"])
    if results.get("compiled_memory"):
        lines += _compiled_memory(results["compiled_memory"])
    if results.get("compiled_training"):
        lines += _compiled_training(results["compiled_training"])
    lines.append("![benchmark ratios](benchmarks.png)")
    return "\n".join(lines) + "\n"


def _compiled_training(rows: list[dict]) -> list[str]:
    lines = [
        "## Training step under torch.compile (inductor): ratios to the compiled floor",
        "",
        "Peak memory here: the growth over two steps after the warm-up (gradients and optimizer "
        "state already allocated), eager and compiled measured the same way.",
        "",
        "| model | dtype | batch | method | compile s | compiled ms | ± | time / floor | "
        "eager ms | compiled / eager | peak MiB | peak / floor | eager peak MiB |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        cells = [r["model"], r["dtype"], str(r["batch"]), _label(r["method"])]
        cells += [_f(r.get("compile_s"), 1), _f(r.get("ms"), 1), _f(r.get("spread"))]
        cells += [_f(r.get("time_ratio_floor"), 3), _f(r.get("eager_ms"), 1)]
        cells += [_f(r.get("compiled_vs_eager"), 3), _f(r.get("peak_mib"), 0)]
        cells += [_f(r.get("peak_mib_ratio_floor"), 3), _f(r.get("eager_peak_mib"), 0)]
        lines.append("| " + " | ".join(cells) + " |")
    return [*lines, ""]


def _compiled_memory(rows: list[dict]) -> list[str]:
    lines = [
        "## Activations a compiled training step keeps (torch.compile, inductor's partitioner)",
        "",
        "Bytes of the tensors the compiled forward hands its backward, as inductor's min-cut "
        "partitioner chooses them (no code generated: deterministic, the same on every device).",
        "",
        "| model | dtype | batch | method | saved MiB | saved / floor |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['dtype']} | {r['batch']} | {_label(r['method'])} | "
            f"{r['saved_mib']:.1f} | {_f(r['saved_ratio_floor'], 3)} |"
        )
    return [*lines, ""]


def _ops(rows: list[dict]) -> list[str]:
    kernels = any("kernels_per_site" in r for r in rows)
    lines = [
        "## Kernel ops per adapted site (one forward + backward, over the floor)",
        "",
        "aten ops that compute (views and bare allocations left out), counted with a "
        "TorchDispatchMode: deterministic. The biggest contributors per site follow.",
        "",
        "| model | dtype | method | sites | ops / site | "
        + ("CUDA kernels / site | " if kernels else "")
        + "largest contributors per site |",
        "|---|---|---|---:|---:|" + ("---:|" if kernels else "") + "---|",
    ]
    for r in rows:
        top = ", ".join(f"`{k}` {v:+.1f}" for k, v in list(r["by_op"].items())[:6])
        cells = [r["model"], r["dtype"], _label(r["method"]), str(r["sites"])]
        cells.append(_f(r["ops_per_site"], 1))
        if kernels:
            cells.append(_f(r.get("kernels_per_site"), 1))
        cells.append(top)
        lines.append("| " + " | ".join(cells) + " |")
    return [*lines, ""]


def draw(results: dict, path: Path) -> None:
    """One figure: training time and saved memory over the floor per method (first model),
    and ARC's step / floor along each scaling axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    training = results.get("training") or []
    if training:
        model = training[0]["model"]
        ax = axes[0]
        dtypes = list(dict.fromkeys(r["dtype"] for r in training))
        methods = list(dict.fromkeys(r["method"] for r in training if r["method"] != "full"))
        width = 0.8 / (2 * len(dtypes))
        for i, dtype in enumerate(dtypes):
            got = {r["method"]: r for r in training if (r["model"], r["dtype"]) == (model, dtype)}
            for j, (key, kind) in enumerate(
                (("time_ratio_floor", "time"), ("saved_mib_ratio_floor", "saved"))
            ):
                offset = (2 * i + j) * width
                ax.bar(
                    [k + offset for k in range(len(methods))],
                    [got[m].get(key, math.nan) if m in got else math.nan for m in methods],
                    width,
                    label=f"{kind}, {dtype}",
                )
        ax.set_xticks([k + 0.4 - width / 2 for k in range(len(methods))])
        ax.set_xticklabels([_label(m) for m in methods], rotation=35, ha="right", fontsize=7)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_ylim(0.0, 2.0)
        ax.set_ylabel(f"training step / floor ({model})")
        ax.legend(fontsize=7)
    scaling = results.get("scaling") or []
    ax = axes[1]
    for axis in dict.fromkeys(r["axis"] for r in scaling):
        rows = [r for r in scaling if r["axis"] == axis]
        ax.plot(
            range(len(rows)), [r["train_ratio_floor"] for r in rows], "o-", label=f"{axis}: time"
        )
        ax.plot(
            range(len(rows)), [r["saved_ratio_floor"] for r in rows], "x--", label=f"{axis}: saved"
        )
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xlabel("grid point (small → large along each axis)")
    ax.set_ylabel("ARC training step / floor")
    if scaling:
        ax.legend(fontsize=6, ncol=2)
    env = results["environment"]
    fig.suptitle(
        f"arc_peft · {env['device']} · torch {env['torch']} · {env['date'][:10]}", fontsize=9
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(results: dict, out: Path, plot: bool = True) -> None:
    """``results.json`` and ``results.md`` (and, with ``plot``, ``benchmarks.png``: a figure that
    cannot be drawn, e.g. without matplotlib, is reported and skipped, not fatal)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    (out / "results.md").write_text(markdown(results))
    if plot:
        try:
            draw(results, out / "benchmarks.png")
        except Exception as exc:  # the tables are what matters; say why the figure is missing
            print(f"[bench] no figure: {type(exc).__name__}: {exc}", flush=True)


def render(paths: list[Path], out: Path) -> dict:
    """Combine several results.json files (runs made side by side) into one table and plot;
    rows of a section measured in several runs are concatenated, each keeping its own ratios."""
    parts = [json.loads(Path(p).read_text()) for p in paths]
    results = dict(parts[0])
    results["command"] = " && ".join(p["command"] for p in parts)
    results["notes"] = [n for p in parts for n in p["notes"]]
    for part in parts[1:]:
        for key in SECTIONS:
            if key in part:
                if isinstance(part[key], list) and isinstance(results.get(key), list):
                    results[key] = results[key] + part[key]
                else:
                    results[key] = part[key]
    write(results, out)
    return results
