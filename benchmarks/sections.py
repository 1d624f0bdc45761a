"""The sections of a run; each returns plain rows (dicts) for the report."""

from __future__ import annotations

import functools
import math
import os
import tempfile
import time
from typing import Any

import torch
from torch import nn

import arc_peft

from . import methods, opcount
from .measure import (
    compiled_saved_bytes,
    fresh_peak_mib,
    infer_fn,
    interleaved,
    median,
    saved_bytes,
    spread,
    step_peak_mib,
    sync,
    train_step_fn,
)
from .methods import METHODS, NUM_CLASSES, missing, randomise_adapters, timm_model
from .settings import Settings


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", flush=True)


def out_of_time(settings: Settings) -> bool:
    """Whether ``--time-limit`` has run out: what is left is skipped, with a note."""
    return settings.deadline is not None and time.monotonic() > settings.deadline


def make_batch(settings: Settings, batch: int, img_size: int | None = None) -> tuple:
    g = torch.Generator().manual_seed(1)
    size = img_size or settings.img_size
    x = torch.randn(batch, 3, size, size, generator=g).to(settings.device)
    y = torch.randint(0, NUM_CLASSES, (batch,), generator=g).to(settings.device)
    return x, y


def build(name: str, method: str, settings: Settings, **overrides: Any) -> nn.Module:
    kwargs = {**settings.model_kwargs, "rank": settings.rank, **overrides}
    return METHODS[method].build(name, kwargs).to(settings.device)


def available(methods: list[str], notes: list[str]) -> list[str]:
    out = []
    for method in methods:
        why = missing(method)
        if why is None:
            out.append(method)
        else:
            notes.append(f"{METHODS[method].label} skipped: {why}")
    return out


def _timed_rows(times: dict[str, list[float]], base: str, **fields: Any) -> list[dict]:
    ref = median(times[base])
    return [
        {
            **fields,
            "method": m,
            "ms": 1e3 * median(t),
            "spread": spread(t),
            f"time_ratio_{base}": median(t) / ref,
            "times": t,
        }
        for m, t in times.items()
    ]


def run_inference(settings: Settings, notes: list[str]) -> list[dict]:
    rows = []
    methods = available(settings.infer_methods, notes)
    for name in settings.models:
        models = {m: build(name, m, settings) for m in methods}
        for dtype in settings.dtypes:
            for batch in settings.infer_batches:
                x, _ = make_batch(settings, batch)
                fns = {m: infer_fn(models[m], x, dtype) for m in methods}
                times = interleaved(
                    fns, settings.repeats, settings.warmup, settings.device, settings.timer
                )
                rows += _timed_rows(times, "plain", model=name, dtype=dtype, batch=batch)
                log(f"inference {name} {dtype} b={batch}: " + _fmt(rows[-len(methods) :]))
        del models
    return rows


def _step_for_memory(
    name: str, method: str, settings: Settings, dtype: str
) -> Any:  # top level: pickled into the fresh process
    methods.OFFICIAL_SOURCE[:] = [settings.official_arc] if settings.official_arc else []
    model = build(name, method, settings)
    x, y = make_batch(settings, settings.train_batch)
    spec = METHODS[method]
    return train_step_fn(model, x, y, dtype, spec.grads_to_input, spec.lean)


def run_training(settings: Settings, notes: list[str]) -> list[dict]:
    rows = []
    methods = available(settings.train_methods, notes)
    for name in settings.train_models:
        x, y = make_batch(settings, settings.train_batch)
        models = {m: build(name, m, settings) for m in methods}
        for dtype in settings.dtypes:
            if out_of_time(settings):
                notes.append(f"training {name} {dtype} skipped: --time-limit")
                continue
            fns = {
                m: train_step_fn(models[m], x, y, dtype, METHODS[m].grads_to_input, METHODS[m].lean)
                for m in methods
            }
            times = interleaved(
                fns, settings.repeats, settings.warmup, settings.device, settings.timer
            )
            del fns
            part = _timed_rows(times, "floor", model=name, dtype=dtype, batch=settings.train_batch)
            for row in part:
                spec, model = METHODS[row["method"]], models[row["method"]]
                row["trainable"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
                row["images_per_s"] = settings.train_batch / (row["ms"] / 1e3)
                row["saved_mib"] = (
                    saved_bytes(model, x, dtype, spec.grads_to_input, spec.lean) / 2**20
                )
                model.zero_grad(set_to_none=True)
                if settings.memory:
                    try:
                        row["peak_mib"] = _peak(name, row["method"], settings, dtype)
                    except RuntimeError as exc:  # one failed measure must not end the run
                        row["peak_mib"] = math.nan
                        notes.append(f"peak memory of {row['method']} {dtype}: {exc}")
            floor = {k: v for k, v in next(r for r in part if r["method"] == "floor").items()}
            full = next((r for r in part if r["method"] == "full"), None)
            for row in part:
                for key in ("saved_mib", "peak_mib"):
                    if key in row:
                        row[f"{key}_ratio_floor"] = row[key] / floor[key]
                if full is not None:
                    row["time_ratio_full"] = row["ms"] / full["ms"]
            rows += part
            log(f"training {name} {dtype}: " + _fmt(part))
        del models
    return rows


def _peak(name: str, method: str, settings: Settings, dtype: str) -> float:
    make = functools.partial(_step_for_memory, name, method, settings, dtype)
    if settings.device.type == "cuda":
        return step_peak_mib(make(), settings.device)
    return fresh_peak_mib(make, settings.threads)


AXES = {"tokens": "img_size", "depth": "depth", "width": "embed_dim", "rank": "rank"}


def scaling_grid(settings: Settings) -> list[tuple[str, str, dict[str, Any]]]:
    """(axis, label, overrides) around a base model; each axis varies one thing."""
    if settings.quick:
        base: dict[str, Any] = dict(settings.model_kwargs)
        grid = [
            ("tokens", [dict(img_size=s) for s in (32, 48)]),
            ("depth", [dict(depth=d) for d in (1, 2)]),
            ("width", [dict(embed_dim=w, num_heads=2) for w in (32, 64)]),
            ("rank", [dict(rank=r) for r in (4, 8)]),
        ]
    else:
        base = dict(img_size=224, depth=4)
        grid = [
            ("tokens", [dict(img_size=s) for s in (112, 224, 448)]),
            ("depth", [dict(depth=d) for d in (2, 4, 8)]),
            ("width", [dict(embed_dim=w, num_heads=w // 64) for w in (384, 768, 1024, 1280)]),
            ("rank", [dict(rank=r) for r in (8, 50, 128, 256)]),
        ]
    return [
        (axis, f"{AXES[axis]}={ {**base, **v}.get(AXES[axis], settings.rank)}", {**base, **v})
        for axis, variants in grid
        for v in variants
    ]


def run_scaling(settings: Settings, notes: list[str]) -> list[dict]:
    """ARC against the floor (training step: time, saved bytes) and the plain backbone
    (inference time) as width, depth, tokens and rank grow."""
    name = settings.models[0]
    rows = []
    for axis, label, overrides in scaling_grid(settings):
        size = overrides.get("img_size", settings.img_size)
        x, y = make_batch(settings, settings.scaling_batch, size)
        models = {m: build(name, m, settings, **overrides) for m in ("plain", "floor", "arc")}
        fns = {
            "plain": infer_fn(models["plain"], x),
            "arc_infer": infer_fn(models["arc"], x),
            "floor": train_step_fn(models["floor"], x, y, grads_to_input=True),
            "arc": train_step_fn(models["arc"], x, y),
        }
        times = interleaved(fns, settings.repeats, settings.warmup, settings.device, settings.timer)
        saved = {
            m: saved_bytes(models[m], x, "fp32", grads_to_input=m == "floor")
            for m in ("floor", "arc")
        }
        patch = int(overrides.get("patch_size", 16))
        rows.append(
            {
                "axis": axis,
                "point": label,
                "tokens": (size // patch) ** 2 + 1,
                "infer_ratio": median(times["arc_infer"]) / median(times["plain"]),
                "train_ratio_floor": median(times["arc"]) / median(times["floor"]),
                "train_spread": max(spread(times["arc"]), spread(times["floor"])),
                "saved_ratio_floor": saved["arc"] / saved["floor"],
                "floor_step_ms": 1e3 * median(times["floor"]),
            }
        )
        r = rows[-1]
        log(
            f"scaling {label}: step {r['train_ratio_floor']:.3f}x floor, saved "
            f"{r['saved_ratio_floor']:.3f}x, inference {r['infer_ratio']:.3f}x"
        )
    return rows


def run_files(settings: Settings, notes: list[str]) -> dict:
    """Adapter file size, save/load time; switching the active adapter."""
    name = settings.models[0]
    model = timm_model(name, settings.model_kwargs)
    for task in ("task_a", "task_b"):
        arc_peft.inject_arc(model, arc_peft.ARCConfig(rank=settings.rank), name=task)
    randomise_adapters(model)
    result: dict[str, Any] = {"model": name}
    repeats = max(3, settings.repeats)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "task_a.safetensors")
        target = timm_model(name, settings.model_kwargs)
        save = {"save": lambda: arc_peft.save_adapter(model, path, name="task_a")}
        save_times = interleaved(save, repeats, 1, settings.device, settings.timer)["save"]
        load_times = []
        for _ in range(repeats):
            if arc_peft.adapter_configs(target):
                arc_peft.remove_arc(target)
            start = time.perf_counter()
            arc_peft.load_adapter(target, path, name="task_a")
            load_times.append(time.perf_counter() - start)
        result.update(
            file_bytes=os.path.getsize(path),
            adapter_params=sum(
                p.numel() for p in arc_peft.adapter_parameters(model, "task_a").values()
            ),
            save_ms=1e3 * median(save_times),
            load_ms=1e3 * median(load_times),
        )
    names = iter(["task_a", "task_b"] * 1000)
    switch = {"switch": lambda: arc_peft.set_active_adapter(model, next(names))}
    result["switch_us"] = 1e6 * median(
        interleaved(switch, 50, 1, settings.device, "wall")["switch"]
    )
    log(f"files: {result['file_bytes'] / 1e3:.1f} kB, switch {result['switch_us']:.0f} us")
    return result


def run_multitask(settings: Settings, notes: list[str]) -> dict:
    """Merged and unmerged ARC against plain, and 8 tasks in one mixed batch."""
    name = settings.models[0]
    tasks = [f"task{i}" for i in range(8)]
    multi = timm_model(name, settings.model_kwargs)
    for t in tasks:
        arc_peft.inject_arc(multi, arc_peft.ARCConfig(rank=settings.rank), name=t)
    randomise_adapters(multi)
    multi = multi.to(settings.device).eval()
    x, _ = make_batch(settings, len(tasks))

    def mixed() -> Any:
        with torch.inference_mode(), arc_peft.mixed_batch(multi, tasks):
            return multi(x)

    def one_by_one() -> list:
        with torch.inference_mode():
            outs = []
            for i, t in enumerate(tasks):
                arc_peft.set_active_adapter(multi, t)
                outs.append(multi(x[i : i + 1]))
            return outs

    def single_task() -> Any:
        arc_peft.set_active_adapter(multi, tasks[0])
        with torch.inference_mode():
            return multi(x)

    fns = {
        "plain": infer_fn(build(name, "plain", settings), x),
        "arc": infer_fn(build(name, "arc", settings), x),
        "arc_merged": infer_fn(build(name, "arc_merged", settings), x),
        "mixed": mixed,
        "one_by_one": one_by_one,
        "single_task": single_task,
    }
    times = interleaved(fns, settings.repeats, settings.warmup, settings.device, settings.timer)
    med = {k: median(v) for k, v in times.items()}
    result = {
        "model": name,
        "batch": len(tasks),
        "ms": {k: 1e3 * v for k, v in med.items()},
        "merged_vs_plain": med["arc_merged"] / med["plain"],
        "unmerged_vs_plain": med["arc"] / med["plain"],
        "mixed_vs_one_by_one": med["mixed"] / med["one_by_one"],
        "mixed_vs_single_task": med["mixed"] / med["single_task"],
    }
    log(f"multitask: unmerged {result['unmerged_vs_plain']:.3f}x plain")
    return result


def run_compile(settings: Settings, notes: list[str]) -> dict:
    """torch.compile (inductor) against eager, inference of a model with ARC."""
    name = settings.models[0]
    batch = max(settings.infer_batches)
    x, _ = make_batch(settings, batch)
    eager = build(name, "arc", settings).eval()
    compiled = torch.compile(build(name, "arc", settings).eval(), fullgraph=True)
    start = time.perf_counter()
    with torch.inference_mode():
        compiled(x)
    first_s = time.perf_counter() - start

    def run_compiled() -> Any:
        with torch.inference_mode():
            return compiled(x)

    times = interleaved(
        {"eager": infer_fn(eager, x), "compiled": run_compiled},
        settings.repeats,
        settings.warmup,
        settings.device,
        settings.timer,
    )
    with torch.inference_mode():
        diff = (compiled(x) - eager(x)).abs().max().item()
    return {
        "model": name,
        "batch": batch,
        "first_call_s": first_s,
        "eager_ms": 1e3 * median(times["eager"]),
        "compiled_ms": 1e3 * median(times["compiled"]),
        "ratio": median(times["compiled"]) / median(times["eager"]),
        "max_abs_diff": diff,
    }


# The methods whose ops per site are counted (the others adapt no sites, or all of them).
OPS_METHODS = ["arc", "arc_plain", "arc_att", "adaptmlp", "lora", "vera"]
OPS_BATCH = 2  # the count does not depend on the batch: the smallest that is a batch


def run_ops(settings: Settings, notes: list[str]) -> list[dict]:
    """Kernel ops per adapted site of one training forward + backward (opcount), over the floor;
    on CUDA also the CUDA kernels the profiler sees in one step, over the floor's."""
    rows = []
    wanted = [m for m in OPS_METHODS if m in settings.train_methods]
    for name in settings.train_models:
        x, y = make_batch(settings, OPS_BATCH)
        models = {m: build(name, m, settings) for m in ["floor", *available(wanted, notes)]}
        for dtype in settings.dtypes:
            counts = {
                m: opcount.count_step(
                    model, x, y, dtype, METHODS[m].grads_to_input, METHODS[m].lean
                )
                for m, model in models.items()
            }
            kernels = {}
            if settings.device.type == "cuda":
                for m, model in models.items():
                    try:
                        kernels[m] = opcount.cuda_kernels(
                            model, x, y, dtype, METHODS[m].grads_to_input, METHODS[m].lean
                        )
                    except Exception as exc:  # a profiler failure must not lose the op counts
                        notes.append(f"kernel count of {m} {dtype}: {type(exc).__name__}: {exc}")
            floor = counts["floor"]
            for m, ops in counts.items():
                if m == "floor":
                    continue
                sites = opcount.adapted_sites(models[m]) or 1
                by_op = opcount.per_site(ops, floor, sites)
                row = {
                    "model": name,
                    "dtype": dtype,
                    "method": m,
                    "sites": sites,
                    "ops": sum(ops.values()),
                    "floor_ops": sum(floor.values()),
                    "ops_per_site": sum(by_op.values()),
                    "by_op": by_op,
                }
                if m in kernels and "floor" in kernels:
                    row["kernels"], row["floor_kernels"] = kernels[m], kernels["floor"]
                    row["kernels_per_site"] = (kernels[m] - kernels["floor"]) / sites
                rows.append(row)
            log(
                f"ops per site {name} {dtype}: "
                + ", ".join(
                    f"{r['method']} {r['ops_per_site']:.1f}" for r in rows[-len(counts) + 1 :]
                )
            )
        del models
    return rows


COMPILED_MEMORY_METHODS = ["arc", "arc_plain", "arc_att", "adaptmlp", "lora"]


def run_compiled_memory(settings: Settings, notes: list[str]) -> list[dict]:
    """Bytes of activations a compiled training step keeps for its backward pass, as inductor's
    partitioner chooses them (``compiled_saved_bytes``: no code generated, deterministic), over
    the compiled floor's; batch ``--train-batch``."""
    name = settings.train_models[0]
    x, _ = make_batch(settings, settings.train_batch)
    wanted = available([m for m in COMPILED_MEMORY_METHODS if m in settings.train_methods], notes)
    rows = []
    for dtype in settings.dtypes:
        saved = {}
        for m in ["floor", *wanted]:
            spec = METHODS[m]
            try:
                saved[m] = compiled_saved_bytes(
                    build(name, m, settings), x, dtype, spec.grads_to_input, spec.lean
                )
            except Exception as exc:  # a peer's graph dynamo cannot trace whole
                notes.append(f"compiled memory {m} {dtype}: {type(exc).__name__}: {exc}")
        if "floor" not in saved:
            continue
        for m, value in saved.items():
            rows.append(
                {
                    "model": name,
                    "dtype": dtype,
                    "batch": settings.train_batch,
                    "method": m,
                    "saved_mib": value / 2**20,
                    "saved_ratio_floor": value / saved["floor"],
                }
            )
        log(f"compiled memory {name} {dtype}: " + _fmt(rows[-len(saved) :], "saved_ratio_"))
    return rows


def run_compiled_training(settings: Settings, notes: list[str]) -> list[dict]:
    """The training step under ``torch.compile`` (inductor), timed against the compiled floor:
    the floor and ARC in every dtype first (bf16 first), then the other ``--compile-methods``.
    Compilation is most of this section's time, so under ``--time-limit`` a measurement starts
    only while the time left exceeds the longest one so far (the run ends near the limit)."""
    name = settings.train_models[0]
    x, y = make_batch(settings, settings.train_batch)
    wanted = available(["floor", *(m for m in settings.compile_methods if m != "floor")], notes)
    dtypes = sorted(settings.dtypes, key=lambda d: d != "bf16")
    first = [(d, m) for d in dtypes for m in wanted if m in ("floor", "arc")]
    order = first + [(d, m) for d in dtypes for m in wanted if (d, m) not in first]
    rows: list[dict] = []
    longest = 0.0
    for dtype, method in order:
        left = math.inf if settings.deadline is None else settings.deadline - time.monotonic()
        if left < longest:
            notes.append(f"compiled training {method} {dtype} skipped: --time-limit")
            continue
        began = time.monotonic()
        try:
            rows.append(_compiled_row(settings, name, method, dtype, x, y))
            log(f"compiled training {name} {dtype} {method}: {rows[-1]['ms']:.1f} ms")
        except Exception as exc:  # e.g. a peer's graph inductor cannot compile
            notes.append(f"compiled training {method} {dtype}: {type(exc).__name__}: {exc}")
        finally:
            torch._dynamo.reset()  # each model compiles afresh, and its graphs are freed
        longest = max(longest, time.monotonic() - began)
    for dtype in dtypes:
        part = [r for r in rows if r["dtype"] == dtype]
        floor = next((r for r in part if r["method"] == "floor"), None)
        for row in part if floor is not None else []:
            row["time_ratio_floor"] = row["ms"] / floor["ms"]
            if "peak_mib" in row:
                row["peak_mib_ratio_floor"] = row["peak_mib"] / floor["peak_mib"]
    return rows


def _compiled_row(
    settings: Settings, name: str, method: str, dtype: str, x: torch.Tensor, y: torch.Tensor
) -> dict:
    spec = METHODS[method]
    model = build(name, method, settings)
    eager = train_step_fn(model, x, y, dtype, spec.grads_to_input, spec.lean)
    compiled = train_step_fn(torch.compile(model), x, y, dtype, spec.grads_to_input, spec.lean)
    start = time.perf_counter()
    compiled()  # compiles the forward and, at its first backward, the backward graph
    sync(settings.device)
    compile_s = time.perf_counter() - start
    times = interleaved(
        {"eager": eager, "compiled": compiled},
        settings.repeats,
        settings.warmup,
        settings.device,
        settings.timer,
    )
    row = {
        "model": name,
        "dtype": dtype,
        "batch": settings.train_batch,
        "method": method,
        "compile_s": compile_s,
        "ms": 1e3 * median(times["compiled"]),
        "spread": spread(times["compiled"]),
        "eager_ms": 1e3 * median(times["eager"]),
        "times": times["compiled"],
    }
    row["compiled_vs_eager"] = row["ms"] / row["eager_ms"]
    if settings.device.type == "cuda":
        row["peak_mib"] = step_peak_mib(compiled, settings.device)
        row["eager_peak_mib"] = step_peak_mib(eager, settings.device)
    return row


def _fmt(rows: list[dict], ratio: str = "time_ratio_") -> str:
    key = next(k for k in rows[0] if k.startswith(ratio))
    return ", ".join(f"{r['method']} {r[key]:.3f}" for r in rows)


RUNNERS = {
    "inference": run_inference,
    "training": run_training,
    "scaling": run_scaling,
    "files": run_files,
    "multitask": run_multitask,
    "compile": run_compile,
    "ops": run_ops,
    "compiled_memory": run_compiled_memory,
    "compiled_training": run_compiled_training,
}
