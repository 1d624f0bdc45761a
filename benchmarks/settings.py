"""What a run measures: the command line, as one :class:`Settings`."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

SECTIONS = [
    "inference", "training", "scaling", "files", "multitask", "compile", "ops", "compiled_memory",
    "compiled_training",
]  # fmt: skip
# --gpu: the one prepared command for a CUDA machine (docs/benchmarks.md, benchmarks/README.md),
# its sections in the order run: the cheap, deterministic ones first, compilation (the slow
# part, cut off by --time-limit) last.
GPU_SECTIONS = ["ops", "training", "inference", "compiled_training"]
GPU_TRAIN_METHODS = ["full", "floor", "arc", "arc_plain", "arc_att", "adaptmlp", "lora", "vera"]
GPU_INFER_METHODS = ["plain", "arc", "arc_merged"]
COMPILE_METHODS = ["floor", "arc", "lora", "arc_att", "adaptmlp"]
INFER_METHODS = [
    "plain", "arc", "arc_merged", "arc_att", "adaptmlp", "lora", "vera", "adapter_plus",
    "official_arc",
]  # fmt: skip
TRAIN_METHODS = [
    "full", "linear", "floor", "arc", "arc_plain", "arc_att", "adaptmlp", "lora", "vera",
    "adapter_plus", "official_arc", "official_floor",
]  # fmt: skip
# A tiny ViT for --quick (same layout as tests/models.py).
TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)


@dataclass
class Settings:
    """Everything a run needs; built from the command line by :func:`parse_args`."""

    models: list[str]
    train_models: list[str]
    infer_batches: list[int]
    train_batch: int
    dtypes: list[str]
    infer_methods: list[str]
    train_methods: list[str]
    repeats: int
    warmup: int
    sections: list[str]
    out: Path
    timer: str
    memory: bool
    quick: bool
    threads: int
    scaling_batch: int
    official_arc: str | None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    img_size: int = 224
    rank: int = 50
    render: list[Path] | None = None
    compile_methods: list[str] = field(default_factory=lambda: list(COMPILE_METHODS))
    time_limit: float | None = None  # seconds for the whole run; later work is skipped
    deadline: float | None = None  # time.monotonic() when the time limit runs out
    gpu: bool = False


def _list(text: str) -> list[str]:
    return [s for s in text.split(",") if s]


def parse_args(argv: list[str] | None) -> Settings:
    p = argparse.ArgumentParser(
        prog="python benchmarks/run.py",
        description="Speed and memory of arc_peft's adapters against the floor and peers.",
    )
    p.add_argument("--models", default="vit_small_patch16_224,vit_base_patch16_224")
    p.add_argument("--train-models", default=None, help="default: --models")
    p.add_argument("--batch", default="1,16", help="inference batch sizes")
    p.add_argument("--train-batch", type=int, default=None, help="default 16 (CPU), 64 (CUDA)")
    p.add_argument("--dtypes", default="fp32,bf16", help="fp32 and/or bf16 (autocast)")
    p.add_argument("--methods", default=None, help="training methods (default: all)")
    p.add_argument("--infer-methods", default=None, help="inference methods (default: all)")
    p.add_argument("--scaling-batch", type=int, default=4)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"a subset of {SECTIONS}")
    p.add_argument(
        "--timer",
        choices=["cpu", "wall"],
        default="cpu",
        help="on a CPU: process CPU time (default; steady on a shared machine) or wall clock",
    )
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (CPU)")
    p.add_argument(
        "--memory",
        choices=["on", "off"],
        default=None,
        help="measure peak memory growth (a fresh process per method on CPU); default on, "
        "off with --quick",
    )
    p.add_argument(
        "--official-arc",
        default=None,
        metavar="PATH",
        help="a checkout or bare git directory of github.com/DavidYanAnDe/ARC, imported at run "
        "time for the official-code rows",
    )
    p.add_argument("--quick", action="store_true", help="a tiny model, 1 repeat: seconds")
    p.add_argument(
        "--gpu",
        action="store_true",
        help="the prepared CUDA run: ViT-B/16, training batch 64, inference batch 256, fp32 and "
        f"bf16, sections {GPU_SECTIONS}, under --time-limit (default 240 s); with --quick, the "
        "same on the tiny model (a CPU smoke test)",
    )
    p.add_argument(
        "--compile-methods",
        default=None,
        help=f"methods of the compiled_training section, in order (default {COMPILE_METHODS})",
    )
    p.add_argument(
        "--time-limit",
        type=float,
        default=None,
        metavar="S",
        help="stop starting new measurements after S seconds (what was measured is written)",
    )
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    p.add_argument(
        "--render",
        nargs="+",
        type=Path,
        default=None,
        metavar="JSON",
        help="measure nothing: combine earlier results.json files into one table and plot",
    )
    a = p.parse_args(argv)
    sections = _list(a.sections)
    bad = sorted(set(sections) - set(SECTIONS))
    if bad:
        p.error(f"unknown section(s) {bad}: expected a subset of {SECTIONS}")
    dtypes = _list(a.dtypes)
    if not dtypes or set(dtypes) - {"fp32", "bf16"}:
        p.error(f"--dtypes {a.dtypes!r}: expected fp32 and/or bf16, comma separated")
    default_train = GPU_TRAIN_METHODS if a.gpu else TRAIN_METHODS
    default_infer = GPU_INFER_METHODS if a.gpu else INFER_METHODS
    train_methods = _list(a.methods) if a.methods else list(default_train)
    infer_methods = _list(a.infer_methods) if a.infer_methods else list(default_infer)
    compile_methods = _list(a.compile_methods) if a.compile_methods else list(COMPILE_METHODS)
    for given, known, flag in (
        (train_methods, TRAIN_METHODS, "--methods"),
        (infer_methods, INFER_METHODS, "--infer-methods"),
        (compile_methods, TRAIN_METHODS, "--compile-methods"),
    ):
        if set(given) - set(known):
            p.error(f"{flag}: unknown {sorted(set(given) - set(known))}, expected from {known}")
    cuda = torch.cuda.is_available()
    settings = Settings(
        models=_list(a.models),
        train_models=_list(a.train_models or a.models),
        infer_batches=[int(b) for b in _list(a.batch)],
        train_batch=a.train_batch or (64 if cuda else 16),
        dtypes=dtypes,
        infer_methods=infer_methods,
        train_methods=train_methods,
        repeats=a.repeats,
        warmup=a.warmup,
        sections=sections,
        out=a.out,
        timer=a.timer,
        memory=a.memory == "on" or (a.memory is None and not a.quick),
        quick=a.quick,
        threads=a.threads,
        scaling_batch=a.scaling_batch,
        official_arc=a.official_arc,
        render=a.render,
        compile_methods=compile_methods,
        time_limit=a.time_limit,
        gpu=a.gpu,
    )
    if cuda:
        settings.device = torch.device("cuda")
    default_sections = a.sections == p.get_default("sections")
    if a.gpu:
        if a.models == p.get_default("models"):
            settings.models = settings.train_models = ["vit_base_patch16_224"]
        settings.train_batch = a.train_batch or 64
        if a.batch == p.get_default("batch"):
            settings.infer_batches = [256]
        if default_sections:
            settings.sections = list(GPU_SECTIONS)
        if a.repeats == p.get_default("repeats"):
            settings.repeats = 15
        settings.warmup = max(settings.warmup, 2)
        if a.time_limit is None:
            settings.time_limit = 240.0
    if a.quick:
        settings.models = settings.train_models = ["vit_tiny_patch16_224"]
        settings.model_kwargs = dict(TINY)
        settings.img_size = TINY["img_size"]
        settings.infer_batches, settings.train_batch, settings.scaling_batch = [1, 4], 4, 2
        settings.repeats, settings.warmup, settings.rank = min(a.repeats, 2), 1, 8
        if default_sections and not a.gpu:
            settings.sections = [s for s in sections if s not in ("compile", "compiled_training")]
        if a.gpu and a.compile_methods is None:
            settings.compile_methods = ["floor", "arc"]
    return settings
