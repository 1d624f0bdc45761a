"""Speed and memory of arc_peft's adapters against the plain backbone, full fine-tuning and LoRA.

One entry point measures, on whatever device is present (CUDA if available, else CPU):

* inference (eval mode, no grad): plain backbone, ARC (unmerged and merged), ARC_att, AdaptMLP
  r=64 and peft LoRA r=8 on ``qkv``, as ratios to the plain backbone;
* a training step (forward + backward + AdamW step): full fine-tuning, linear probe, the *floor*
  (frozen backbone, no trainable weight but the head, gradients flowing to the input image),
  ARC, ARC_att, AdaptMLP r=64, LoRA r=8 — time and peak memory, as ratios to full fine-tuning
  and to the floor;
* how ARC's overhead scales with tokens, depth, width and rank;
* adapter files (size, save and load time) and switching the active adapter;
* a mixed batch of 8 tasks against 8 single-task passes;
* ``torch.compile`` against eager for a model with ARC.

Ratios are ratios of medians taken side by side in one run: the methods are interleaved within
every repeat (in a rotating order), so a slow spell on a shared machine hits them all alike.
Peak memory on CPU is the growth of the peak resident set size over one training step measured
in a fresh process per method (a process forked from a clean fork server), once with the default
allocator and once with glibc told to return every large block at once (``live``: the peak of
live memory, free of heap fragmentation). On CUDA it is ``torch.cuda.max_memory_allocated``.

Usage::

    python benchmarks/run.py                       # the full run (slow on a CPU)
    python benchmarks/run.py --quick --out /tmp/b  # a tiny model, seconds; what CI runs
    python benchmarks/run.py --models vit_small_patch16_224 --repeats 5 --threads 1 --timer cpu

Results go to ``<out>/results.json``, ``<out>/results.md`` and ``<out>/benchmarks.png``.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime as _dt
import json
import math
import multiprocessing as mp
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import arc_peft

# -- what is measured --------------------------------------------------------------------------

INFER_METHODS = ["plain", "arc", "arc_merged", "arc_att", "adaptmlp", "lora"]
TRAIN_METHODS = ["full", "linear", "floor", "arc", "arc_att", "adaptmlp", "lora"]
LABELS = {
    "plain": "plain backbone",
    "full": "full fine-tuning",
    "linear": "linear probe",
    "floor": "floor (frozen, grads to input)",
    "arc": "ARC r=50",
    "arc_merged": "ARC r=50, merged",
    "arc_att": "ARC_att r=50",
    "adaptmlp": "AdaptMLP r=64",
    "lora": "peft LoRA r=8 (qkv)",
}
NUM_CLASSES = 100
# A tiny ViT for --quick (same layout as tests/models.py).
TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)


@dataclass
class Settings:
    """Everything a run needs; built from the command line."""

    models: list[str]
    train_models: list[str]
    infer_batches: list[int]
    train_batch: int
    repeats: int
    warmup: int
    sections: list[str]
    out: Path
    timer: str
    memory: str
    quick: bool
    threads: int | None
    scaling_batch: int
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    img_size: int = 224
    rank: int = 50
    render: list[Path] | None = None


# -- models ------------------------------------------------------------------------------------


def create_backbone(name: str, settings: Settings, **overrides: Any) -> nn.Module:
    """A randomly initialised timm model (pretrained weights make no difference to speed)."""
    import timm

    torch.manual_seed(0)
    kwargs = {**settings.model_kwargs, **overrides}
    model = timm.create_model(name, pretrained=False, num_classes=NUM_CLASSES, **kwargs)
    return model.to(settings.device)


def _lora_modules(model: nn.Module) -> list[nn.Module]:
    from peft.tuners.lora import LoraLayer

    return [m for m in model.modules() if isinstance(m, LoraLayer)]


def apply_method(model: nn.Module, method: str, rank: int = 50) -> nn.Module:
    """Put ``method``'s adapter into ``model`` (in place, except LoRA's wrapper) and freeze."""
    if method in ("plain", "full", "linear", "floor"):
        pass
    elif method in ("arc", "arc_merged"):
        arc_peft.inject_arc(model, arc_peft.ARCConfig(rank=rank))
        if method == "arc_merged":
            _randomise_adapters(model)
            arc_peft.merge_adapter(model)
    elif method == "arc_att":
        arc_peft.inject_arc(model, arc_peft.ARCConfig(rank=rank, positions=("attn",)))
    elif method == "adaptmlp":
        arc_peft.inject_arc(model, arc_peft.AdaptMLPConfig(bottleneck=64))
    elif method == "lora":
        import peft

        # How people apply LoRA to a timm ViT: the fused qkv projection, peft's defaults.
        model = peft.inject_adapter_in_model(peft.LoraConfig(r=8, target_modules=["qkv"]), model)
    else:
        raise ValueError(f"unknown method {method!r}: expected one of {sorted(LABELS)}")
    if method != "full":
        arc_peft.freeze_backbone(model)  # head stays trainable; for ARC/AdaptMLP also the adapter
    if method == "lora":
        for layer in _lora_modules(model):
            for part in (layer.lora_A, layer.lora_B):
                for param in part.parameters():
                    param.requires_grad_(True)
    return model


def _randomise_adapters(model: nn.Module) -> None:
    """Non-zero adapter weights, so a merge really changes the backbone's weights."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in arc_peft.adapter_parameters(model).values():
            param.copy_(0.02 * torch.randn(param.shape, generator=g))


def build(name: str, method: str, settings: Settings, **overrides: Any) -> nn.Module:
    rank = overrides.pop("rank", settings.rank)
    return apply_method(create_backbone(name, settings, **overrides), method, rank)


def has_peft() -> bool:
    try:
        import peft  # noqa: F401
    except ImportError:
        return False
    return True


# -- timing ------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(
    fns: dict[str, Callable[[], Any]], settings: Settings, repeats: int | None = None
) -> dict[str, list[float]]:
    """Seconds per call of every function; all are run once per repeat, in a rotating order."""
    clock = time.process_time if settings.timer == "cpu" else time.perf_counter
    names = list(fns)
    for _ in range(settings.warmup):
        for name in names:
            fns[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(settings.repeats if repeats is None else repeats):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            _sync(settings.device)
            start = clock()
            fns[name]()
            _sync(settings.device)
            times[name].append(clock() - start)
    return times


def median(values: list[float]) -> float:
    return statistics.median(values) if values else math.nan


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else math.nan


def infer_fn(model: nn.Module, x: torch.Tensor) -> Callable[[], Any]:
    model.eval()

    def run() -> Any:
        with torch.inference_mode():
            return model(x)

    return run


def train_step_fn(model: nn.Module, method: str, x: torch.Tensor, y: torch.Tensor) -> Callable:
    """One AdamW step on the trainable parameters; the floor asks for the input's gradient."""
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)

    def run() -> None:
        inp = x.detach().requires_grad_(True) if method == "floor" else x
        loss = F.cross_entropy(model(inp), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return run


def make_batch(settings: Settings, batch: int, img_size: int | None = None) -> tuple:
    g = torch.Generator().manual_seed(1)
    size = img_size or settings.img_size
    x = torch.randn(batch, 3, size, size, generator=g).to(settings.device)
    y = torch.randint(0, NUM_CLASSES, (batch,), generator=g).to(settings.device)
    return x, y


# -- peak memory -------------------------------------------------------------------------------


def _read_status(field_name: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name):
                return int(line.split()[1]) / 1024.0
    raise OSError(f"{field_name} not in /proc/self/status")


def _use_live_allocator() -> None:
    """glibc: serve every block over 64 KiB by mmap and give it back on free, so the resident set
    follows live memory instead of the heap's high-water mark (fragmentation)."""
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD (setting it also stops glibc raising it)
    libc.mallopt(-1, 64 * 1024)  # M_TRIM_THRESHOLD


def measure_step_memory(model_name: str, method: str, settings: Settings) -> float:
    """Peak RSS growth (MiB) over two training steps of a model built in this process."""
    model = build(model_name, method, settings)
    x, y = make_batch(settings, settings.train_batch)
    step = train_step_fn(model, method, x, y)
    try:  # Linux >= 4.0: reset the peak RSS so that building the model does not count
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        reset = True
    except OSError:
        reset = False
    base = _read_status("VmRSS:")
    for _ in range(2):  # the first step also allocates the optimizer state and the gradients
        step()
    if reset:
        return _read_status("VmHWM:") - base
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0 - base


def _memory_worker(job: dict, queue: Any) -> None:
    """Runs in a fresh process forked from the fork server."""
    try:
        settings: Settings = job["settings"]
        if settings.threads:
            torch.set_num_threads(settings.threads)
        if job["allocator"] == "live":
            _use_live_allocator()
        queue.put({"ok": True, "mib": measure_step_memory(job["model"], job["method"], settings)})
    except BaseException as exc:  # report, do not leave the parent waiting
        queue.put({"ok": False, "error": f"{type(exc).__name__}: {exc}"})


_CONTEXT: Any = None


def _context() -> Any:
    """A fork server started once with torch and timm imported: clean, cheap fresh processes.

    (Forking the benchmark process itself is not an option: its heap would be inherited, and a
    child forked after OpenMP started its threads can hang.)
    """
    global _CONTEXT
    if _CONTEXT is None:
        _CONTEXT = mp.get_context("forkserver")
        _CONTEXT.set_forkserver_preload(["torch", "timm", "arc_peft"])
    return _CONTEXT


def peak_memory_mib(
    model_name: str, method: str, settings: Settings, allocator: str, fresh: bool = True
) -> float:
    """Peak memory growth (MiB) of a training step of ``method``.

    ``fresh=False`` measures in this process (what ``--quick`` does to stay fast: the figure is
    then only a smoke test, since memory freed by earlier work is reused without RSS growth).
    """
    if settings.device.type == "cuda":
        model = build(model_name, method, settings)
        x, y = make_batch(settings, settings.train_batch)
        step = train_step_fn(model, method, x, y)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        for _ in range(2):
            step()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    if not fresh:
        return measure_step_memory(model_name, method, settings)
    ctx = _context()
    queue = ctx.Queue()
    job = {"model": model_name, "method": method, "settings": settings, "allocator": allocator}
    proc = ctx.Process(target=_memory_worker, args=(job, queue))
    proc.start()
    try:
        result = queue.get(timeout=3600)
    finally:
        proc.join(timeout=60)
    if not result["ok"]:
        raise RuntimeError(f"memory worker for {method} failed: {result['error']}")
    return float(result["mib"])


def _glibc() -> bool:
    return platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


# -- sections ----------------------------------------------------------------------------------


def available(methods: list[str], notes: list[str]) -> list[str]:
    out = []
    for method in methods:
        if method == "lora" and not has_peft():
            notes.append("peft is not installed (pip install arc-peft[bench]): LoRA rows skipped")
            continue
        out.append(method)
    return out


def run_inference(settings: Settings, notes: list[str]) -> list[dict]:
    rows = []
    methods = available(INFER_METHODS, notes)
    for name in settings.models:
        models = {m: build(name, m, settings) for m in methods}
        for batch in settings.infer_batches:
            x, _ = make_batch(settings, batch)
            times = interleaved({m: infer_fn(models[m], x) for m in methods}, settings)
            base = median(times["plain"])
            for m in methods:
                rows.append(
                    {
                        "model": name,
                        "batch": batch,
                        "method": m,
                        "ms": 1e3 * median(times[m]),
                        "ratio_plain": median(times[m]) / base,
                        "times": times[m],
                    }
                )
            _log(f"inference {name} b={batch}: " + _fmt_ratios(rows[-len(methods) :]))
        del models
    return rows


def run_training(settings: Settings, notes: list[str]) -> list[dict]:
    rows = []
    methods = available(TRAIN_METHODS, notes)
    for name in settings.train_models:
        x, y = make_batch(settings, settings.train_batch)
        fns = {m: train_step_fn(build(name, m, settings), m, x, y) for m in methods}
        times = interleaved(fns, settings)
        del fns
        memory: dict[str, dict[str, float]] = {m: {} for m in methods}
        if settings.memory != "none":
            allocators = ["default"]
            fresh = settings.memory == "fresh"
            if settings.device.type == "cpu" and fresh and _glibc():
                allocators.append("live")
            if not fresh:
                notes.append("peak memory measured in-process: a smoke test, not a figure")
            for allocator in allocators:
                for m in methods:
                    memory[m][allocator] = peak_memory_mib(name, m, settings, allocator, fresh)
        full, floor = median(times["full"]), median(times["floor"])
        for m in methods:
            row = {
                "model": name,
                "batch": settings.train_batch,
                "method": m,
                "ms": 1e3 * median(times[m]),
                "ratio_full": median(times[m]) / full,
                "ratio_floor": median(times[m]) / floor,
                "times": times[m],
                "trainable": sum(
                    p.numel() for p in build(name, m, settings).parameters() if p.requires_grad
                ),
            }
            for allocator, mib in memory[m].items():
                row[f"mem_{allocator}_mib"] = mib
                row[f"mem_{allocator}_ratio_full"] = _ratio(mib, memory["full"][allocator])
                row[f"mem_{allocator}_ratio_floor"] = _ratio(mib, memory["floor"][allocator])
            rows.append(row)
        _log(f"training {name} b={settings.train_batch}: " + _fmt_ratios(rows[-len(methods) :]))
    return rows


AXIS_KEYS = {"tokens": "img_size", "depth": "depth", "width": "embed_dim", "rank": "rank"}


def scaling_grid(settings: Settings) -> list[tuple[str, str, dict[str, Any]]]:
    """(axis, value label, overrides) around a base model; each axis varies one thing."""
    if settings.quick:
        base = dict(TINY)
        grid = [
            ("tokens", [dict(img_size=s) for s in (32, 48)]),
            ("depth", [dict(depth=d) for d in (1, 2)]),
            ("width", [dict(embed_dim=w, num_heads=2) for w in (32, 64)]),
            ("rank", [dict(rank=r) for r in (4, 8)]),
        ]
    else:
        base = dict(img_size=224, depth=4)
        grid = [
            ("tokens", [dict(img_size=s) for s in (112, 224, 336)]),
            ("depth", [dict(depth=d) for d in (2, 4, 8)]),
            ("width", [dict(embed_dim=w, num_heads=w // 64) for w in (192, 384, 768)]),
            ("rank", [dict(rank=r) for r in (8, 50, 128, 256)]),
        ]
    points = []
    for axis, variants in grid:
        for v in variants:
            overrides = {**base, **v}
            key = AXIS_KEYS[axis]
            points.append((axis, f"{key}={overrides.get(key, settings.rank)}", overrides))
    return points


def run_scaling(settings: Settings, notes: list[str]) -> list[dict]:
    """ARC's cost against the plain backbone (inference) and the floor (training step)."""
    name = "vit_tiny_patch16_224" if settings.quick else settings.models[0]
    rows = []
    for axis, label, overrides in scaling_grid(settings):
        size = overrides.get("img_size", settings.img_size)
        rank = overrides.get("rank", settings.rank)
        kw = {k: v for k, v in overrides.items() if k != "rank"}
        x, y = make_batch(settings, settings.scaling_batch, size)
        fns = {
            "plain": infer_fn(build(name, "plain", settings, **kw), x),
            "arc": infer_fn(build(name, "arc", settings, rank=rank, **kw), x),
            "floor_step": train_step_fn(build(name, "floor", settings, **kw), "floor", x, y),
            "arc_step": train_step_fn(build(name, "arc", settings, rank=rank, **kw), "arc", x, y),
        }
        times = interleaved(fns, settings)
        tokens = (size // int(kw.get("patch_size", 16))) ** 2 + 1
        rows.append(
            {
                "axis": axis,
                "point": label,
                "tokens": tokens,
                "infer_ratio": median(times["arc"]) / median(times["plain"]),
                "train_ratio_floor": median(times["arc_step"]) / median(times["floor_step"]),
                "plain_ms": 1e3 * median(times["plain"]),
                "floor_step_ms": 1e3 * median(times["floor_step"]),
            }
        )
        _log(
            f"scaling {label}: infer {rows[-1]['infer_ratio']:.3f}x, "
            f"train {rows[-1]['train_ratio_floor']:.3f}x floor"
        )
    return rows


def run_files(settings: Settings, notes: list[str]) -> dict:
    """Adapter file size, save/load time; switching the active adapter."""
    name = settings.models[0]
    model = build(name, "plain", settings)
    arc_peft.inject_arc(model, arc_peft.ARCConfig(rank=settings.rank), name="task_a")
    arc_peft.inject_arc(model, arc_peft.ARCConfig(rank=settings.rank), name="task_b")
    _randomise_adapters(model)
    result: dict[str, Any] = {"model": name}
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "task_a.safetensors")
        target = build(name, "plain", settings)
        save = {"save": lambda: arc_peft.save_adapter(model, path, name="task_a")}
        save_times = interleaved(save, settings, repeats=max(3, settings.repeats))["save"]
        load_times = []
        for _ in range(max(3, settings.repeats)):
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
    switch_times = interleaved(switch, settings, repeats=50)["switch"]
    result["switch_us"] = 1e6 * median(switch_times)
    _log(
        f"files: {result['file_bytes'] / 1e3:.1f} kB, save {result['save_ms']:.1f} ms, "
        f"load {result['load_ms']:.1f} ms, switch {result['switch_us']:.0f} us"
    )
    return result


def run_multitask(settings: Settings, notes: list[str]) -> dict:
    """Issue 4: merged/unmerged ARC against plain, and 8 tasks in one mixed batch."""
    name = settings.models[0]
    tasks = [f"task{i}" for i in range(8)]
    multi = build(name, "plain", settings)
    for t in tasks:
        arc_peft.inject_arc(multi, arc_peft.ARCConfig(rank=settings.rank), name=t)
    _randomise_adapters(multi)
    multi.eval()
    x, _ = make_batch(settings, len(tasks))

    def mixed() -> Any:
        with torch.inference_mode(), arc_peft.mixed_batch(multi, tasks):
            return multi(x)

    def one_by_one() -> list:
        outs = []
        with torch.inference_mode():
            for i, t in enumerate(tasks):
                arc_peft.set_active_adapter(multi, t)
                outs.append(multi(x[i : i + 1]))
        return outs

    def single_task() -> Any:
        arc_peft.set_active_adapter(multi, tasks[0])
        with torch.inference_mode():
            return multi(x)

    plain = build(name, "plain", settings).eval()
    arc = build(name, "arc", settings).eval()
    merged = build(name, "arc_merged", settings).eval()
    times = interleaved(
        {
            "plain": infer_fn(plain, x),
            "arc": infer_fn(arc, x),
            "arc_merged": infer_fn(merged, x),
            "mixed": mixed,
            "one_by_one": one_by_one,
            "single_task": single_task,
        },
        settings,
    )
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
    _log(
        f"multitask: merged {result['merged_vs_plain']:.3f}x plain, unmerged "
        f"{result['unmerged_vs_plain']:.3f}x, mixed-8 {result['mixed_vs_one_by_one']:.3f}x of "
        f"8 single passes"
    )
    return result


def run_compile(settings: Settings, notes: list[str]) -> dict:
    """torch.compile (inductor) against eager, inference of a model with ARC."""
    name = settings.models[0]
    batch = max(settings.infer_batches)
    x, _ = make_batch(settings, batch)
    eager = build(name, "arc", settings).eval()
    compiled_model = build(name, "arc", settings).eval()
    compiled = torch.compile(compiled_model, fullgraph=True)
    start = time.perf_counter()
    with torch.inference_mode():
        compiled(x)
    first_s = time.perf_counter() - start

    def run_compiled() -> Any:
        with torch.inference_mode():
            return compiled(x)

    times = interleaved({"eager": infer_fn(eager, x), "compiled": run_compiled}, settings)
    with torch.inference_mode():
        diff = (compiled(x) - eager(x)).abs().max().item()
    result = {
        "model": name,
        "batch": batch,
        "first_call_s": first_s,
        "eager_ms": 1e3 * median(times["eager"]),
        "compiled_ms": 1e3 * median(times["compiled"]),
        "ratio": median(times["compiled"]) / median(times["eager"]),
        "max_abs_diff": diff,
    }
    _log(f"compile: first call {first_s:.1f} s, steady {result['ratio']:.3f}x eager")
    return result


# -- report ------------------------------------------------------------------------------------


def _log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", flush=True)


def _fmt_ratios(rows: list[dict]) -> str:
    key = "ratio_plain" if "ratio_plain" in rows[0] else "ratio_full"
    return ", ".join(f"{r['method']} {r[key]:.3f}" for r in rows)


def environment(settings: Settings) -> dict:
    import timm

    try:
        import peft

        peft_version = peft.__version__
    except ImportError:
        peft_version = None
    if settings.device.type == "cuda":
        device = torch.cuda.get_device_name(settings.device)
    else:
        device = f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    return {
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "machine": f"{platform.node()} ({platform.platform()})",
        "device": device,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "peft": peft_version,
        "arc_peft": arc_peft.__version__,
    }


def _r(value: float | None, digits: int = 2) -> str:
    return (
        "—"
        if value is None or (isinstance(value, float) and math.isnan(value))
        else (f"{value:.{digits}f}")
    )


def markdown(results: dict) -> str:
    env, s = results["environment"], results["settings"]
    lines = [
        "# arc_peft benchmark results",
        "",
        f"{env['date']} · {env['device']} · {env['threads']} threads · torch {env['torch']} · "
        f"timm {env['timm']} · peft {env['peft']} · arc_peft {env['arc_peft']} · {env['machine']}",
        "",
        f"Command: `{results['command']}`. "
        + (
            "Combined runs (`--render`): timer and repeats as in each command; "
            if " && " in results["command"]
            else f"Timer: {s['timer']}; {s['warmup']} warm-up + {s['repeats']} repeats per method, "
        )
        + "interleaved; medians; every ratio from one run.",
        "",
    ]
    lines += [f"> Note: {n}" for n in dict.fromkeys(results["notes"])]
    if results["notes"]:
        lines.append("")
    if results.get("inference"):
        lines += ["## Inference (eval, no grad): time relative to the plain backbone", ""]
        keys = sorted({(r["model"], r["batch"]) for r in results["inference"]})
        methods = list(dict.fromkeys(r["method"] for r in results["inference"]))
        lines.append("| model | batch | " + " | ".join(LABELS[m] for m in methods) + " |")
        lines.append("|---|---:|" + "---:|" * len(methods))
        for model, batch in keys:
            rows = {
                r["method"]: r
                for r in results["inference"]
                if (r["model"], r["batch"]) == (model, batch)
            }
            cells = [
                f"{_r(rows[m]['ratio_plain'], 3)}x"
                + (f" ({rows[m]['ms']:.0f} ms)" if m == "plain" else "")
                for m in methods
            ]
            lines.append(f"| {model} | {batch} | " + " | ".join(cells) + " |")
        lines.append("")
    if results.get("training"):
        lines += ["## Training step (forward + backward + AdamW)", ""]
        has_live = any("mem_live_mib" in r for r in results["training"])
        header = (
            "| model | batch | method | trainable | ms | time / full FT | time / floor | "
            "peak RSS growth MiB | mem / full FT | mem / floor |"
        )
        if has_live:
            header += " live peak MiB | live / full FT | live / floor |"
        lines += [
            header,
            "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"
            + ("---:|---:|---:|" if has_live else ""),
        ]
        for r in results["training"]:
            line = (
                f"| {r['model']} | {r['batch']} | {LABELS[r['method']]} | {r['trainable']:,} | "
                f"{r['ms']:.0f} | {_r(r['ratio_full'], 3)} | {_r(r['ratio_floor'], 3)} | "
                f"{_r(r.get('mem_default_mib'), 0)} | {_r(r.get('mem_default_ratio_full'))} | "
                f"{_r(r.get('mem_default_ratio_floor'))} |"
            )
            if has_live:
                line += (
                    f" {_r(r.get('mem_live_mib'), 0)} | {_r(r.get('mem_live_ratio_full'))} | "
                    f"{_r(r.get('mem_live_ratio_floor'))} |"
                )
            lines.append(line)
        lines.append("")
    if results.get("scaling"):
        lines += [
            "## Scaling of ARC's overhead",
            "",
            "| axis | point | tokens | ARC inference / plain | ARC step / floor step | "
            "plain ms | floor step ms |",
            "|---|---|---:|---:|---:|---:|---:|",
        ]
        for r in results["scaling"]:
            lines.append(
                f"| {r['axis']} | {r['point']} | {r['tokens']} | {_r(r['infer_ratio'], 3)} | "
                f"{_r(r['train_ratio_floor'], 3)} | {r['plain_ms']:.1f} | "
                f"{r['floor_step_ms']:.1f} |"
            )
        lines.append("")
    if results.get("files"):
        f = results["files"]
        lines += [
            "## Adapter files and switching",
            "",
            f"{f['model']}, ARC r={s['rank']}: {f['adapter_params']:,} adapter parameters; file "
            f"(with the {NUM_CLASSES}-class head) {f['file_bytes'] / 1e3:.1f} kB; save "
            f"{f['save_ms']:.1f} ms; load {f['load_ms']:.1f} ms; "
            f"`set_active_adapter` {f['switch_us']:.0f} µs.",
            "",
        ]
    if results.get("multitask"):
        m = results["multitask"]
        lines += [
            "## Multi-task serving (issue 4)",
            "",
            f"{m['model']}, batch {m['batch']}, eval: merged ARC {_r(m['merged_vs_plain'], 3)}x "
            f"the plain backbone; unmerged ARC {_r(m['unmerged_vs_plain'], 3)}x; one mixed batch "
            f"of 8 tasks {_r(m['mixed_vs_one_by_one'], 3)}x the time of 8 single-sample passes "
            f"(switching the adapter between them) and {_r(m['mixed_vs_single_task'], 3)}x one "
            "single-task batch of 8.",
            "",
            "| | " + " | ".join(m["ms"]) + " |",
            "|---|" + "---:|" * len(m["ms"]),
            "| ms | " + " | ".join(f"{v:.1f}" for v in m["ms"].values()) + " |",
            "",
        ]
    if results.get("compile"):
        c = results["compile"]
        lines += [
            "## torch.compile (inductor) vs eager, ARC unmerged, inference",
            "",
            f"{c['model']}, batch {c['batch']}: first call (compilation) "
            f"{c['first_call_s']:.1f} s; "
            f"then {c['compiled_ms']:.1f} ms vs {c['eager_ms']:.1f} ms eager "
            f"({_r(c['ratio'], 3)}x); max |compiled - eager| = {c['max_abs_diff']:.1e}.",
            "",
        ]
    lines.append("![benchmark ratios](benchmarks.png)")
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [k for k in ("inference", "training", "scaling") if results.get(k)]
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(6 * max(1, len(panels)), 4.5))
    axes = [axes] if not hasattr(axes, "__len__") else list(axes)
    for ax, panel in zip(axes, panels, strict=False):
        if panel == "inference":
            keys = sorted({(r["model"], r["batch"]) for r in results["inference"]})
            methods = [
                m for m in INFER_METHODS if any(r["method"] == m for r in results["inference"])
            ][1:]
            width = 0.8 / max(1, len(keys))
            for i, key in enumerate(keys):
                vals = {
                    r["method"]: r["ratio_plain"]
                    for r in results["inference"]
                    if (r["model"], r["batch"]) == key
                }
                ax.bar(
                    [j + i * width for j in range(len(methods))],
                    [vals[m] for m in methods],
                    width,
                    label=f"{key[0].replace('_patch16_224', '')} b={key[1]}",
                )
            ax.set_xticks([j + 0.4 - width / 2 for j in range(len(methods))])
            ax.set_xticklabels(
                [LABELS[m].replace(" (qkv)", "") for m in methods],
                rotation=30,
                ha="right",
                fontsize=8,
            )
            ax.axhline(1.0, color="k", lw=0.8)
            top = max(r["ratio_plain"] for r in results["inference"])
            ax.set_ylim(0.8, max(1.2, top + 0.05))  # the differences are a few percent
            ax.set_ylabel("inference time / plain backbone")
            ax.legend(fontsize=7)
        elif panel == "training":
            rows = [r for r in results["training"] if r["model"] == results["training"][0]["model"]]
            xs = range(len(rows))
            ax.bar([i - 0.2 for i in xs], [r["ratio_full"] for r in rows], 0.4, label="time")
            if any("mem_default_ratio_full" in r for r in rows):
                ax.bar(
                    [i + 0.2 for i in xs],
                    [
                        r.get("mem_live_ratio_full", r.get("mem_default_ratio_full", 0))
                        for r in rows
                    ],
                    0.4,
                    label="peak memory (live)",
                )
            ax.set_xticks(list(xs))
            ax.set_xticklabels(
                [LABELS[r["method"]].replace(" (qkv)", "") for r in rows],
                rotation=30,
                ha="right",
                fontsize=8,
            )
            ax.axhline(1.0, color="k", lw=0.8)
            ax.set_ylabel(f"training step / full fine-tuning ({rows[0]['model']})")
            ax.legend(fontsize=7)
        else:
            for axis in dict.fromkeys(r["axis"] for r in results["scaling"]):
                rows = [r for r in results["scaling"] if r["axis"] == axis]
                ax.plot(
                    range(len(rows)),
                    [r["train_ratio_floor"] for r in rows],
                    "o-",
                    label=f"{axis}: step / floor",
                )
                ax.plot(
                    range(len(rows)),
                    [r["infer_ratio"] for r in rows],
                    "x--",
                    label=f"{axis}: inference / plain",
                )
            ax.axhline(1.0, color="k", lw=0.8)
            ax.set_xlabel("grid point (small → large along each axis)")
            ax.set_ylabel("ARC time ratio")
            ax.legend(fontsize=6, ncol=2)
    env = results["environment"]
    fig.suptitle(
        f"arc_peft · {env['device']} · torch {env['torch']} · {env['date'][:10]}", fontsize=9
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- entry point -------------------------------------------------------------------------------

SECTIONS = ["inference", "training", "scaling", "files", "multitask", "compile"]


def parse_args(argv: list[str] | None) -> Settings:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--models",
        default="vit_small_patch16_224,vit_base_patch16_224",
        help="timm model names for inference (comma separated)",
    )
    p.add_argument(
        "--train-models",
        default=None,
        help="timm model names for the training step (default: --models)",
    )
    p.add_argument("--batch", default="1,32", help="inference batch sizes (comma separated)")
    p.add_argument("--train-batch", type=int, default=32)
    p.add_argument("--scaling-batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument(
        "--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {SECTIONS}"
    )
    p.add_argument(
        "--timer",
        choices=["wall", "cpu"],
        default="wall",
        help="wall clock, or process CPU time (steadier on a shared machine; use with --threads 1)",
    )
    p.add_argument(
        "--memory",
        choices=["fresh", "inprocess", "none"],
        default=None,
        help="training peak memory: in a fresh process per method (default), in this "
        "process (default with --quick; a smoke test, not a figure) or not at all",
    )
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument(
        "--quick",
        action="store_true",
        help="a tiny model, batch 2, 2 repeats, no torch.compile: seconds",
    )
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    p.add_argument(
        "--render",
        nargs="+",
        type=Path,
        default=None,
        metavar="JSON",
        help="measure nothing: combine the sections of earlier results.json files (runs made "
        "side by side) and write the table and plot",
    )
    a = p.parse_args(argv)
    sections = [s for s in a.sections.split(",") if s]
    bad = sorted(set(sections) - set(SECTIONS))
    if bad:
        p.error(f"unknown section(s) {bad}: expected a subset of {SECTIONS}")
    settings = Settings(
        models=a.models.split(","),
        train_models=(a.train_models or a.models).split(","),
        infer_batches=[int(b) for b in a.batch.split(",")],
        train_batch=a.train_batch,
        repeats=a.repeats,
        warmup=a.warmup,
        sections=sections,
        out=a.out,
        timer=a.timer,
        memory=a.memory or ("inprocess" if a.quick else "fresh"),
        quick=a.quick,
        threads=a.threads,
        scaling_batch=a.scaling_batch,
        render=a.render,
    )
    if torch.cuda.is_available():
        settings.device = torch.device("cuda")
    if a.quick:
        settings.models = settings.train_models = ["vit_tiny_patch16_224"]
        settings.model_kwargs = dict(TINY)
        settings.img_size = TINY["img_size"]
        settings.infer_batches, settings.train_batch, settings.scaling_batch = [1, 4], 4, 2
        settings.repeats, settings.warmup, settings.rank = min(a.repeats, 2), 1, 8
        if "compile" in sections and a.sections == p.get_default("sections"):
            settings.sections = [s for s in sections if s != "compile"]
    return settings


def render(paths: list[Path], out: Path) -> dict:
    """Combine the sections of several results.json files into one table and plot (rows of a
    section measured in several runs are concatenated; each row's ratios come from its own run)."""
    parts = [json.loads(Path(p).read_text()) for p in paths]
    results = dict(parts[0])
    results["command"] = " && ".join(p["command"] for p in parts)
    results["notes"] = [n for p in parts for n in p["notes"]]
    for part in parts[1:]:
        for key in SECTIONS:
            if key not in part:
                continue
            if isinstance(part[key], list) and isinstance(results.get(key), list):
                results[key] = results[key] + part[key]  # e.g. more models or batch sizes
            else:
                results[key] = part[key]
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "results.md").write_text(markdown(results))
    plot(results, out / "benchmarks.png")
    return results


def main(argv: list[str] | None = None) -> dict:
    settings = parse_args(argv)
    if settings.render:
        return render(settings.render, settings.out)
    if settings.threads:
        torch.set_num_threads(settings.threads)
    settings.out.mkdir(parents=True, exist_ok=True)
    notes: list[str] = []
    command = "python benchmarks/run.py " + " ".join(sys.argv[1:] if argv is None else argv)
    results: dict[str, Any] = {
        "command": command.strip(),
        "environment": environment(settings),
        "settings": {
            k: (str(v) if isinstance(v, (Path, torch.device)) else v)
            for k, v in vars(settings).items()
        },
        "notes": notes,
    }
    runners = {
        "inference": run_inference,
        "training": run_training,
        "scaling": run_scaling,
        "files": run_files,
        "multitask": run_multitask,
        "compile": run_compile,
    }
    for section in settings.sections:
        _log(f"section {section}")
        results[section] = runners[section](settings, notes)
        # Written after every section: a long run that is interrupted keeps what it measured.
        (settings.out / "results.json").write_text(json.dumps(results, indent=1))
    (settings.out / "results.md").write_text(markdown(results))
    plot(results, settings.out / "benchmarks.png")
    _log(f"wrote {settings.out / 'results.md'} and {settings.out / 'benchmarks.png'}")
    return results


if __name__ == "__main__":
    main()
