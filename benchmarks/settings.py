"""What a run measures: the command line, as one :class:`Settings`."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

SECTIONS = ["inference", "training", "scaling", "files", "multitask", "compile", "ops"]
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
    train_methods = _list(a.methods) if a.methods else list(TRAIN_METHODS)
    infer_methods = _list(a.infer_methods) if a.infer_methods else list(INFER_METHODS)
    for given, known, flag in (
        (train_methods, TRAIN_METHODS, "--methods"),
        (infer_methods, INFER_METHODS, "--infer-methods"),
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
    )
    if cuda:
        settings.device = torch.device("cuda")
    if a.quick:
        settings.models = settings.train_models = ["vit_tiny_patch16_224"]
        settings.model_kwargs = dict(TINY)
        settings.img_size = TINY["img_size"]
        settings.infer_batches, settings.train_batch, settings.scaling_batch = [1, 4], 4, 2
        settings.repeats, settings.warmup, settings.rank = min(a.repeats, 2), 1, 8
        if a.sections == p.get_default("sections"):
            settings.sections = [s for s in sections if s != "compile"]
    return settings
