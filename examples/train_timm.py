"""Fine-tune a timm vision transformer on an image folder with ARC, ARC_att or AdaptMLP.

The defaults are the official ARC recipe (VTAB-1k): AdamW, lr 0.01, weight decay 0, 100 epochs
with a cosine schedule and 10 warm-up epochs, batch 32, gradient clipping at 1.0, adapter dropout
0.1, a zero-initialised head, everything but the adapter and the head frozen; mixed precision on
a GPU. Only the adapter and the head are saved (an ``arc_peft`` adapter file of a few hundred KB)::

    python examples/train_timm.py --data PATH --model vit_base_patch16_224.augreg_in21k \\
        --pretrained --method arc --out runs/arc

``PATH`` is a torchvision ``ImageFolder`` root: ``PATH/train/<class>/*.jpg`` and
``PATH/val/<class>/*.jpg``. Load the result later with one call (it builds the backbone the
file records, pretrained, with the trained number of classes)::

    model = arc_peft.create_model("runs/arc/adapter.safetensors")

or build the model yourself (``num_classes`` as trained; another number of classes works too: the
stored head then becomes the adapter's own)::

    model = timm.create_model("vit_base_patch16_224.augreg_in21k", pretrained=True, num_classes=N)
    arc_peft.load_adapter(model, "runs/arc/adapter.safetensors")  # also restores the head
"""

from __future__ import annotations

import argparse
from pathlib import Path

import timm
from _common import (
    add_recipe_arguments,
    add_run_arguments,
    default_device,
    evaluate_and_save,
    fit_with_recipe,
    image_folder_classes,
    image_folder_loaders,
    method_config,
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
    add_run_arguments(parser, out="runs/arc")
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

    result = fit_with_recipe(model, train, args, device=device)
    return evaluate_and_save(model, val, args, device, result, args.model, classes)


if __name__ == "__main__":
    main()
