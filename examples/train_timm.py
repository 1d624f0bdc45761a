"""Fine-tune a timm vision transformer on an image folder with ARC, ARC_att or AdaptMLP.

The defaults are the official ARC recipe (VTAB-1k): AdamW, lr 0.01, weight decay 0, 100 epochs
with a cosine schedule and 10 warm-up epochs, batch 32, gradient clipping at 1.0, adapter dropout
0.1, a zero-initialised head, everything but the adapter and the head frozen; mixed precision on
a GPU. Only the adapter and the head are saved (an ``arc_peft`` adapter file of a few hundred KB)::

    python examples/train_timm.py --data PATH --model vit_base_patch16_224.augreg_in21k \\
        --pretrained --method arc --out runs/arc

``PATH`` is a torchvision ``ImageFolder`` root: ``PATH/train/<class>/*.jpg`` and
``PATH/val/<class>/*.jpg``. Load the result later with::

    model = timm.create_model("vit_base_patch16_224.augreg_in21k", pretrained=True)
    arc_peft.load_adapter(model, "runs/arc/adapter.safetensors")  # also restores the head
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import timm
from _common import (
    ADAPTER_METHODS,
    accuracy,
    add_recipe_arguments,
    default_device,
    fit,
    image_folder_classes,
    image_folder_loaders,
    method_config,
    predict,
    prepare,
    seed_everything,
    zero_init_head,
)
from timm.data import create_transform, resolve_data_config
from torch import nn

import arc_peft

# --tiny: a 2-block ViT on 32x32 images, for smoke tests (seconds on a CPU, random weights).
TINY_VIT = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)


def build_parser(description: str = __doc__) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, required=True, help="ImageFolder root (train/, val/)")
    parser.add_argument("--model", default="vit_base_patch16_224.augreg_in21k")
    parser.add_argument("--pretrained", action="store_true", help="load the hub weights")
    parser.add_argument("--tiny", action="store_true", help="a tiny random ViT (smoke tests)")
    parser.add_argument("--method", choices=ADAPTER_METHODS, default="arc")
    parser.add_argument("--rank", type=int, default=50, help="ARC bottleneck")
    parser.add_argument("--bottleneck", type=int, default=64, help="AdaptMLP bottleneck")
    parser.add_argument("--out", type=Path, default=Path("runs/arc"), help="output folder")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument(
        "--amp",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="mixed precision on a GPU (ignored on CPU)",
    )
    parser.add_argument("--workers", type=int, default=4, help="data-loading processes")
    add_recipe_arguments(parser)
    return parser


def build_model(args: argparse.Namespace, num_classes: int) -> nn.Module:
    """The timm model with a zero head, the adapter injected and the rest frozen."""
    kwargs = TINY_VIT if args.tiny else {}
    model = timm.create_model(
        args.model, pretrained=args.pretrained, num_classes=num_classes, **kwargs
    )
    zero_init_head(model)
    config = method_config(args.method, args.rank, args.bottleneck, args.dropout)
    return prepare(model, args.method, config)


def transforms(args: argparse.Namespace, model: nn.Module) -> tuple:
    """timm's train / eval transforms for the model's pretrained input size and normalisation."""
    overrides = {"input_size": (3, TINY_VIT["img_size"], TINY_VIT["img_size"])} if args.tiny else {}
    config = resolve_data_config(overrides, model=model)
    return create_transform(**config, is_training=True), create_transform(**config)


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    seed_everything(args.seed)
    device = default_device(args.device)
    # The loaders need the model's transforms and the model needs the class count.
    num_classes = len(image_folder_classes(args.data))
    model = build_model(args, num_classes).to(device)
    train_tf, val_tf = transforms(args, model)
    train, val, classes = image_folder_loaders(
        args.data, train_tf, val_tf, args.batch_size, args.workers, args.seed
    )
    print(f"{args.model} + {args.method}: {arc_peft.count_parameters(model)}")

    result = fit(
        model,
        train,
        epochs=args.epochs,
        lr=args.lr,
        weight_decay=args.weight_decay,
        warmup_epochs=args.warmup_epochs,
        clip_grad=args.clip_grad,
        device=device,
        amp=args.amp,
        max_steps=args.max_steps,
    )
    logits, labels = predict(model, val, device, amp=args.amp)
    top1 = accuracy(logits, labels)

    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "adapter.safetensors"
    arc_peft.save_adapter(model, path)
    summary = {
        "model": args.model,
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


if __name__ == "__main__":
    main()
