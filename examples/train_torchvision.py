"""Fine-tune a torchvision vision transformer on an image folder with ARC, ARC_att or AdaptMLP.

The same recipe as ``train_timm.py`` (the official ARC recipe: AdamW, lr 0.01, weight decay 0,
cosine schedule with warm-up, gradient clipping at 1.0, zero-initialised head, AMP on a GPU),
with a torchvision model (``vit_b_16``, ``vit_l_16``, ``swin_t``, ``swin_v2_t``, ...)::

    python examples/train_torchvision.py --data PATH --model vit_b_16 --weights DEFAULT \\
        --method arc --out runs/tv_arc

``PATH`` is an ``ImageFolder`` root with ``train/`` and ``val/`` sub-folders. Load the result::

    model = torchvision.models.get_model("vit_b_16", weights="DEFAULT")
    model.heads.head = torch.nn.Linear(768, NUM_CLASSES)  # the same shape as when training
    arc_peft.load_adapter(model, "runs/tv_arc/adapter.safetensors")
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torchvision
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
from torch import nn
from torchvision import transforms as T

import arc_peft

# --tiny: a 2-layer torchvision ViT on 32x32 images, for smoke tests (random weights).
TINY_VIT = dict(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, required=True, help="ImageFolder root (train/, val/)")
    parser.add_argument("--model", default="vit_b_16", help="a torchvision.models name")
    parser.add_argument(
        "--weights", default=None, help="torchvision weights: DEFAULT, IMAGENET1K_V1, ... (none)"
    )
    add_run_arguments(parser, out="runs/tv_arc")
    add_recipe_arguments(parser)
    return parser


def replace_head(model: nn.Module, num_classes: int) -> None:
    """Swap the classifier for a zero-initialised ``nn.Linear`` with ``num_classes`` outputs.

    torchvision keeps it at ``model.heads.head`` (ViT) or ``model.head`` (Swin).
    """
    if isinstance(getattr(model, "heads", None), nn.Sequential):
        parent = model.heads
    elif isinstance(getattr(model, "head", None), nn.Linear):
        parent = model
    else:
        raise ValueError(
            f"{type(model).__name__} has neither heads.head (ViT) nor head (Swin): "
            "replace its classifier yourself before calling arc_peft.freeze_backbone"
        )
    parent.head = nn.Linear(parent.head.in_features, num_classes)
    zero_init_head(model)


def build_model(args: argparse.Namespace, num_classes: int) -> nn.Module:
    if args.tiny:
        from torchvision.models.vision_transformer import VisionTransformer

        model = VisionTransformer(num_classes=num_classes, **TINY_VIT)
    else:
        model = torchvision.models.get_model(args.model, weights=args.weights)
    replace_head(model, num_classes)
    config = method_config(args.method, args.rank, args.bottleneck, args.dropout)
    return prepare(model, args.method, config)


def transforms(args: argparse.Namespace) -> tuple:
    """Random-resized-crop training / resize-and-centre-crop evaluation, ImageNet statistics
    (what the pretrained weights expect; their own ``transforms()`` gives the crop size)."""
    if args.tiny:
        resize = crop = TINY_VIT["image_size"]
    elif args.weights:
        preset = torchvision.models.get_model_weights(args.model)[args.weights].transforms()
        resize, crop = preset.resize_size[0], preset.crop_size[0]
    else:
        resize, crop = 256, 224
    normalize = [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    train = T.Compose([T.RandomResizedCrop(crop), T.RandomHorizontalFlip(), *normalize])
    val = T.Compose([T.Resize(resize), T.CenterCrop(crop), *normalize])
    return train, val


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    seed_everything(args.seed)
    device = default_device(args.device)
    num_classes = len(image_folder_classes(args.data))
    model = build_model(args, num_classes).to(device)
    train, val, classes = image_folder_loaders(
        args.data, *transforms(args), args.batch_size, args.workers, args.seed
    )
    name = "tiny VisionTransformer" if args.tiny else args.model
    print(f"{name} + {args.method}: {arc_peft.count_parameters(model)}")

    result = fit_with_recipe(model, train, args, device=device)
    return evaluate_and_save(model, val, args, device, result, name, classes)


if __name__ == "__main__":
    torch.backends.cudnn.benchmark = True
    main()
