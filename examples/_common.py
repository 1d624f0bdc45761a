"""Helpers shared by the examples: the adaptation methods, the official ARC training recipe, an
image-folder loader and the train / predict loops.

The examples import this file as a sibling module (``from _common import ...``): Python puts a
script's own folder on ``sys.path``, so ``python examples/train_timm.py`` finds it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import random
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

import arc_peft

# The methods compared in the papers' tables, by the names used on the command line.
METHODS = ("linear", "full", "arc", "arc_att", "adaptmlp")
ADAPTER_METHODS = ("arc", "arc_att", "adaptmlp")
METHOD_LABELS = {
    "linear": "Linear probe",
    "full": "Full fine-tuning",
    "arc": "ARC",
    "arc_att": "ARC_att",
    "adaptmlp": "AdaptMLP",
}


def seed_everything(seed: int) -> None:
    """Seed Python's and torch's generators (CPU and every GPU)."""
    random.seed(seed)
    torch.manual_seed(seed)


def method_config(
    method: str, rank: int = 50, bottleneck: int = 64, dropout: float = 0.1
) -> arc_peft.ARCConfig | arc_peft.AdaptMLPConfig | None:
    """The adapter config of ``method`` (``None`` for the linear probe and full fine-tuning)."""
    if method == "arc":
        return arc_peft.ARCConfig(rank=rank, positions=("attn", "mlp"), dropout=dropout)
    if method == "arc_att":
        return arc_peft.ARCConfig(rank=rank, positions=("attn",), dropout=dropout)
    if method == "adaptmlp":
        return arc_peft.AdaptMLPConfig(bottleneck=bottleneck, dropout=dropout)
    if method in ("linear", "full"):
        return None
    raise ValueError(f"unknown method {method!r}: expected one of {', '.join(METHODS)}")


def zero_init_head(model: nn.Module) -> None:
    """Zero the classifier head (the official ARC recipe starts every task from a zero head)."""
    head = arc_peft.get_head(model)
    if head is None:
        raise ValueError(f"cannot find the classifier head of {type(model).__name__}")
    with torch.no_grad():
        for param in head.parameters():
            param.zero_()


def prepare(model: nn.Module, method: str, config: arc_peft.AdapterConfig | None) -> nn.Module:
    """Make ``model`` ready to train with ``method``: inject the adapter and freeze the rest.

    ``full`` leaves every parameter trainable; ``linear`` trains the head alone.
    """
    if method == "full":
        for param in model.parameters():
            param.requires_grad_(True)
        return model
    if config is not None:
        arc_peft.inject_arc(model, config)
    return arc_peft.freeze_backbone(model)


def cosine_with_warmup(
    optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up from 0 to the base rate over ``warmup_steps``, then a cosine decay to 0."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def add_run_arguments(parser: argparse.ArgumentParser, out: str) -> None:
    """Method, output and device options shared by the training examples."""
    parser.add_argument("--tiny", action="store_true", help="a tiny random ViT (smoke tests)")
    parser.add_argument("--method", choices=ADAPTER_METHODS, default="arc")
    parser.add_argument("--rank", type=int, default=50, help="ARC bottleneck")
    parser.add_argument("--bottleneck", type=int, default=64, help="AdaptMLP bottleneck")
    parser.add_argument("--out", type=Path, default=Path(out), help="output folder")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument(
        "--amp",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="mixed precision on a GPU (ignored on CPU)",
    )
    parser.add_argument("--workers", type=int, default=4, help="data-loading processes")


def add_recipe_arguments(parser: argparse.ArgumentParser, epochs: int = 100) -> None:
    """The official ARC VTAB recipe as command-line defaults (see docs/getting-started.md)."""
    group = parser.add_argument_group("training recipe (defaults: the official ARC recipe)")
    group.add_argument("--epochs", type=int, default=epochs)
    group.add_argument("--warmup-epochs", type=float, default=10)
    group.add_argument("--batch-size", type=int, default=32)
    group.add_argument("--lr", type=float, default=1e-2, help="AdamW learning rate")
    group.add_argument("--weight-decay", type=float, default=0.0)
    group.add_argument("--clip-grad", type=float, default=1.0, help="max gradient norm (0: off)")
    group.add_argument("--dropout", type=float, default=0.1, help="adapter dropout")
    group.add_argument("--max-steps", type=int, default=None, help="stop after this many steps")
    group.add_argument("--seed", type=int, default=0)


def autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    """bfloat16 autocast on a GPU that supports it, float16 otherwise; nothing on CPU."""
    if not enabled or device.type != "cuda":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype)


@dataclass
class FitResult:
    """What :func:`fit` reports."""

    steps: int
    seconds: float
    last_loss: float


def fit(
    model: nn.Module,
    loader: Iterable[tuple[Tensor, Tensor]],
    *,
    epochs: int,
    lr: float,
    weight_decay: float = 0.0,
    warmup_epochs: float = 0.0,
    clip_grad: float = 1.0,
    device: torch.device | str = "cpu",
    amp: bool = True,
    max_steps: int | None = None,
    desc: str = "train",
    progress: bool | None = None,
) -> FitResult:
    """Train the parameters of ``model`` that require grad: AdamW, cosine schedule with warm-up,
    gradient clipping, cross-entropy loss; AMP on a GPU.

    ``loader`` is re-iterated every epoch and needs a ``len()``; if it has a ``sampler`` with
    ``set_epoch`` (a ``DistributedSampler``) that is called, so each epoch is shuffled anew.
    ``model`` may be a ``DistributedDataParallel`` wrapper.
    """
    from tqdm.auto import tqdm

    device = torch.device(device)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("fit: the model has no trainable parameter")
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    steps_per_epoch = len(loader)  # type: ignore[arg-type]
    total = (
        epochs * steps_per_epoch if max_steps is None else min(max_steps, epochs * steps_per_epoch)
    )
    scheduler = cosine_with_warmup(optimizer, round(warmup_epochs * steps_per_epoch), total)
    # float16 needs loss scaling; bfloat16 and float32 do not.
    use_scaler = amp and device.type == "cuda" and not torch.cuda.is_bf16_supported()
    scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)
    loss_fn = nn.CrossEntropyLoss()

    model.train()
    step, loss_value, start = 0, float("nan"), time.perf_counter()
    # progress=None: show bars only on a terminal, so CI logs stay readable. A finished bar
    # stays on screen (leave=True): it shows each phase's steps, time and last loss.
    bar = tqdm(
        total=total, desc=desc, leave=True, disable=None if progress is None else not progress
    )
    sampler = getattr(loader, "sampler", None)
    for epoch in range(epochs):
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        for images, labels in loader:
            if step >= total:
                break
            images, labels = images.to(device), labels.to(device)
            with autocast(device, amp):
                loss = loss_fn(model(images), labels)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if clip_grad > 0:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(params, clip_grad)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            step += 1
            loss_value = loss.item()
            bar.set_postfix(loss=f"{loss_value:.3f}", refresh=False)
            bar.update()
    bar.close()
    model.eval()
    return FitResult(steps=step, seconds=time.perf_counter() - start, last_loss=loss_value)


def fit_with_recipe(
    model: nn.Module, loader: Iterable[tuple[Tensor, Tensor]], args: argparse.Namespace, **kw
) -> FitResult:
    """:func:`fit` with the recipe options of :func:`add_recipe_arguments` (plus ``args.amp``)."""
    return fit(
        model,
        loader,
        epochs=args.epochs,
        lr=args.lr,
        weight_decay=args.weight_decay,
        warmup_epochs=args.warmup_epochs,
        clip_grad=args.clip_grad,
        amp=args.amp,
        max_steps=args.max_steps,
        **kw,
    )


def evaluate_and_save(
    model: nn.Module,
    val: Iterable[tuple[Tensor, Tensor]],
    args: argparse.Namespace,
    device: torch.device,
    result: FitResult,
    model_name: str,
    classes: list[str],
) -> dict:
    """Validate, write ``adapter.safetensors`` and ``summary.json`` to ``args.out``, report."""
    import arc_peft

    logits, labels = predict(model, val, device, amp=args.amp)
    top1 = accuracy(logits, labels)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "adapter.safetensors"
    arc_peft.save_adapter(model, path)
    summary = {
        "model": model_name,
        "method": args.method,
        "classes": classes,
        "steps": result.steps,
        "train_seconds": round(result.seconds, 2),
        "val_top1": top1,
        "adapter_file": str(path),
    }
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"{result.steps} steps in {result.seconds:.0f} s; val top-1 {top1:.2f}%; saved {path}")
    return summary


@torch.no_grad()
def predict(
    model: nn.Module,
    loader: Iterable[tuple[Tensor, Tensor]],
    device: torch.device | str = "cpu",
    amp: bool = False,
) -> tuple[Tensor, Tensor]:
    """``(logits, labels)`` of the whole ``loader`` in eval mode, on the CPU."""
    device = torch.device(device)
    model.eval()
    logits, labels = [], []
    for images, target in loader:
        with autocast(device, amp):
            out = model(images.to(device))
        logits.append(out.float().cpu())
        labels.append(target)
    return torch.cat(logits), torch.cat(labels)


def accuracy(logits: Tensor, labels: Tensor) -> float:
    """Top-1 accuracy in percent."""
    return 100.0 * (logits.argmax(dim=1) == labels).float().mean().item()


class TensorLoader:
    """Batches of in-memory tensors, reshuffled each epoch from a seeded generator.

    Faster than a ``DataLoader`` for a few thousand small images held in memory.

    Args:
        images: ``(N, C, H, W)`` float tensor.
        labels: ``(N,)`` int64 tensor.
        batch_size: Samples per batch (the last batch may be smaller).
        shuffle: Draw a new order every epoch.
        seed: Seed of the shuffling (and augmentation) generator.
        augment: Called on each training batch (e.g. :func:`random_shift`).
    """

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        batch_size: int,
        shuffle: bool = False,
        seed: int = 0,
        augment: Callable[[Tensor, torch.Generator], Tensor] | None = None,
    ) -> None:
        self.images, self.labels = images, labels
        self.batch_size, self.shuffle, self.augment = batch_size, shuffle, augment
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return math.ceil(len(self.labels) / self.batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        n = len(self.labels)
        order = torch.randperm(n, generator=self.generator) if self.shuffle else torch.arange(n)
        for start in range(0, n, self.batch_size):
            idx = order[start : start + self.batch_size]
            images = self.images[idx]
            if self.augment is not None:
                images = self.augment(images, self.generator)
            yield images, self.labels[idx]


def random_shift(images: Tensor, generator: torch.Generator, pixels: int = 2) -> Tensor:
    """Shift each image by up to ``pixels`` in x and y (zero padding): cheap augmentation."""
    n, _, h, w = images.shape
    padded = nn.functional.pad(images, (pixels,) * 4)
    offsets = torch.randint(0, 2 * pixels + 1, (n, 2), generator=generator)
    return torch.stack(
        [padded[i, :, dy : dy + h, dx : dx + w] for i, (dy, dx) in enumerate(offsets.tolist())]
    )


def image_folder_classes(root: str | Path) -> list[str]:
    """The class names of an ImageFolder root (its ``train/`` sub-folders), checking the layout."""
    root = Path(root)
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise FileNotFoundError(
                f"{root / split} is not a folder: --data expects an ImageFolder root with "
                "train/ and val/ sub-folders, each holding one folder of images per class"
            )
    return sorted(entry.name for entry in (root / "train").iterdir() if entry.is_dir())


def image_folder_loaders(
    root: str | Path,
    train_transform: Callable,
    val_transform: Callable,
    batch_size: int,
    workers: int = 4,
    seed: int = 0,
    distributed: bool = False,
) -> tuple[torch.utils.data.DataLoader, torch.utils.data.DataLoader, list[str]]:
    """Loaders for ``root/train`` and ``root/val`` (torchvision ``ImageFolder`` layout:
    one sub-folder per class) and the class names.

    With ``distributed=True`` the training set is split over the ranks by a
    ``DistributedSampler`` (the validation set is not split).
    """
    from torchvision.datasets import ImageFolder

    root = Path(root)
    image_folder_classes(root)
    train_set = ImageFolder(root / "train", transform=train_transform)
    val_set = ImageFolder(root / "val", transform=val_transform)
    if train_set.classes != val_set.classes:
        raise ValueError(
            f"{root}: train/ has classes {train_set.classes} but val/ has {val_set.classes}; "
            "both need the same class folders"
        )
    sampler = None
    if distributed:
        sampler = torch.utils.data.distributed.DistributedSampler(train_set, seed=seed)
    train = torch.utils.data.DataLoader(
        train_set,
        batch_size=batch_size,
        shuffle=sampler is None,
        sampler=sampler,
        num_workers=workers,
        generator=torch.Generator().manual_seed(seed),
        drop_last=False,
    )
    val = torch.utils.data.DataLoader(val_set, batch_size=batch_size, num_workers=workers)
    return train, val, train_set.classes


def default_device(requested: str | None = None) -> torch.device:
    """``requested``, else the GPU if there is one, else the CPU."""
    if requested:
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def human_bytes(size: int) -> str:
    """``1536`` -> ``'1.5 KB'`` (powers of 1000, as file managers show)."""
    value = float(size)
    if value < 1000:
        return f"{size} B"
    for unit in ("KB", "MB"):
        value /= 1000
        if value < 1000:
            return f"{value:.1f} {unit}"
    return f"{value / 1000:.1f} GB"
