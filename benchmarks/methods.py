"""The methods compared: how each one's model is built and what it trains.

Every builder returns a model in which exactly the method's parameters (and the classifier head)
require gradients. Peers come from their own packages — peft (LoRA, VeRA), ``adapter-plus``
(Adapter+) — and the official ARC code is imported from a snapshot of its repository given at run
time (``--official-arc``), never copied into this one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import importlib.util
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

import arc_peft

NUM_CLASSES = 100


@dataclass(frozen=True)
class Method:
    """One row of the tables."""

    key: str
    label: str
    build: Callable[[str, dict[str, Any]], nn.Module]
    grads_to_input: bool = False  # the floor: the image itself requires a gradient
    lean: bool = True  # False: ARC through plain autograd (what arc_peft did before)


def timm_model(name: str, kwargs: dict[str, Any]) -> nn.Module:
    """A randomly initialised timm model (pretrained weights make no difference to speed)."""
    import timm

    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, num_classes=NUM_CLASSES, **kwargs)


def _frozen(
    model: nn.Module, trainable: Callable[[str, nn.Module], bool] | None = None
) -> nn.Module:
    """Freeze all but the head and the modules ``trainable`` selects."""
    arc_peft.freeze_backbone(model)
    if trainable is not None:
        for name, module in model.named_modules():
            if trainable(name, module):
                module.requires_grad_(True)
    return model


def randomise_adapters(model: nn.Module) -> None:
    """Non-zero adapter weights, so a merge really changes the backbone's weights."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in arc_peft.adapter_parameters(model).values():
            param.copy_(0.02 * torch.randn(param.shape, generator=g))


def _arc(config: arc_peft.AdapterConfig, merged: bool = False) -> Callable:
    def build(name: str, kwargs: dict[str, Any]) -> nn.Module:
        kwargs = dict(kwargs)
        rank = kwargs.pop("rank", None)
        if rank is not None and isinstance(config, arc_peft.ARCConfig):
            cfg = arc_peft.ARCConfig(rank=rank, positions=config.positions)
        elif rank is not None and isinstance(config, arc_peft.AdaptMLPConfig):
            # The tiny --quick model is narrower than AdaptMLP's 64: its size, scaled like ARC's.
            cfg = dataclasses.replace(config, bottleneck=rank)
        else:
            cfg = config
        model = timm_model(name, kwargs)
        arc_peft.inject_arc(model, cfg)
        if merged:
            randomise_adapters(model)
            arc_peft.merge_adapter(model)
        return _frozen(model)

    return build


def _backbone(trainable: bool) -> Callable:
    def build(name: str, kwargs: dict[str, Any]) -> nn.Module:
        kwargs = {k: v for k, v in kwargs.items() if k != "rank"}
        model = timm_model(name, kwargs)
        return model if trainable else _frozen(model)

    return build


def lora_layers(model: nn.Module) -> list[nn.Module]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


def _peft(kind: str) -> Callable:
    def build(name: str, kwargs: dict[str, Any]) -> nn.Module:
        import peft

        kwargs = {k: v for k, v in kwargs.items() if k != "rank"}
        model = timm_model(name, kwargs)
        # How people apply them to a timm ViT: the fused qkv projection, peft's defaults.
        if kind == "lora":
            model = peft.inject_adapter_in_model(
                peft.LoraConfig(r=8, target_modules=["qkv"]), model
            )
            layers = {id(m) for m in lora_layers(model)}
            _frozen(model)
            for module in model.modules():
                if id(module) in layers:
                    for pname, param in module.named_parameters():
                        param.requires_grad_("base_layer" not in pname)
            return model
        # VeRA keeps its shared random projections on the tuner: it needs peft's wrapper, which
        # freezes the base model and leaves the scaling vectors trainable.
        model = peft.get_peft_model(model, peft.VeraConfig(r=256, target_modules=["qkv"]))
        model.get_base_model().get_classifier().requires_grad_(True)
        return model

    return build


@contextlib.contextmanager
def _timm_unpatched() -> Iterator[Any]:
    """Import adapter_plus, which replaces timm's ViT factory on import, and put timm's own
    back afterwards so that every other model is built by timm itself."""
    import timm.models.vision_transformer as vt

    original = vt._create_vision_transformer
    module = importlib.import_module("adapter_plus")
    vt._create_vision_transformer = original
    yield module


def _adapter_plus(name: str, kwargs: dict[str, Any]) -> nn.Module:
    from omegaconf import OmegaConf

    kwargs = {k: v for k, v in kwargs.items() if k != "rank"}
    with _timm_unpatched() as ap:
        # Adapter+ as its README configures it (dim 8, post-adapter, channel-wise scaling).
        conf = OmegaConf.create(
            dict(
                config="post", act_layer=True, norm_layer=False, bias=True, init="houlsby",
                scaling="channel", dim=8, attn_adapter=False, dropout=0, drop_path=0.0,
            )
        )  # fmt: skip
        torch.manual_seed(0)
        model = _current_timm_vit(ap.VisionTransformerAdapter)(
            block_fn=_current_timm_block(ap.AdapterBlock),
            adapter_config=conf,
            num_classes=NUM_CLASSES,
            **{**_timm_vit_args(name), **kwargs},
        )
        return _frozen(model, lambda _, m: isinstance(m, ap.Adapter))


def _current_timm_vit(vit: type) -> type:
    """adapter-plus 0.1.0's model predates timm 1.0's ``forward(x, attn_mask=...)``."""

    class VisionTransformer(vit):  # type: ignore[misc, valid-type]
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.forward_head(self.forward_features(x))

    return VisionTransformer


def _current_timm_block(block: type) -> type:
    """adapter-plus 0.1.0 predates arguments that timm 1.0 passes to every block (e.g.
    ``scale_attn_norm``); drop the ones its block does not take, all left at their defaults."""
    import inspect

    accepted = set(inspect.signature(block.__init__).parameters)

    class Block(block):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **{k: v for k, v in kwargs.items() if k in accepted})

    return Block


def _timm_vit_args(name: str) -> dict[str, Any]:
    """The architecture arguments timm's entrypoint ``name`` passes to its factory."""
    sizes = {
        "vit_tiny": dict(patch_size=16, embed_dim=192, depth=12, num_heads=3),
        "vit_small": dict(patch_size=16, embed_dim=384, depth=12, num_heads=6),
        "vit_base": dict(patch_size=16, embed_dim=768, depth=12, num_heads=12),
        "vit_large": dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16),
    }
    for prefix, args in sizes.items():
        if name.startswith(prefix):
            return args
    raise ValueError(f"no Adapter+ architecture arguments for {name!r}: expected a vit_* model")


# -- the official ARC code -----------------------------------------------------------------------

_OFFICIAL: dict[str, Any] = {}
OFFICIAL_SOURCE: list[str] = []  # the snapshot given on the command line


def official_arc_module(source: str | None) -> Any:
    """``Model.ARC_ViT`` of the official repository (github DavidYanAnDe/ARC), imported from a
    checkout or a bare git directory (extracted to a temporary directory at run time)."""
    if source is None:
        raise FileNotFoundError("no --official-arc snapshot given")
    if source in _OFFICIAL:
        return _OFFICIAL[source]
    path = Path(source)
    if not (path / "Model" / "ARC_ViT.py").is_file():
        if not (path / "HEAD").is_file():
            raise FileNotFoundError(f"{source} is neither a checkout nor a git directory of ARC")
        tmp = tempfile.mkdtemp(prefix="official_arc_")
        archive = subprocess.run(
            ["git", f"--git-dir={path}", "archive", "HEAD"], check=True, capture_output=True
        ).stdout
        subprocess.run(["tar", "-x", "-C", tmp], input=archive, check=True)
        path = Path(tmp)
    sys.path.insert(0, str(path))
    try:
        module = importlib.import_module("Model.ARC_ViT")
    finally:
        sys.path.remove(str(path))
    _OFFICIAL[source] = module
    return module


class _Config(dict):
    """The attribute-and-item access of the ml_collections config the official code reads."""

    __getattr__ = dict.__getitem__


def _official(mode: str) -> Callable:
    def build(name: str, kwargs: dict[str, Any]) -> nn.Module:
        module = official_arc_module(OFFICIAL_SOURCE[0] if OFFICIAL_SOURCE else None)
        args = {**_timm_vit_args(name), **kwargs}
        dim = args["embed_dim"]
        config = _Config(
            patches={"size": (args["patch_size"],) * 2},
            hidden_size=dim,
            transformer=_Config(
                mlp_dim=4 * dim,
                num_heads=args["num_heads"],
                num_layers=args["depth"],
                attention_drop_rate=0.0,
                mlp_drop_rate=0.0,
            ),
            classifier="token",
            adapter_dim=args.get("rank", 50),
            adapter_dropout=0.1,  # the paper's setting (the config file says 0.0)
        )
        torch.manual_seed(0)
        model = module.ARCVisionTransformer(
            config, img_size=args.get("img_size", 224), num_classes=NUM_CLASSES, tuning_mode=mode
        )
        # The official training script's freeze filter does not match its own parameter names
        # (official issue #2); this is what it intends: adapters, projections and the head.
        for pname, param in model.named_parameters():
            param.requires_grad_("adapter" in pname or "projection" in pname or "head" in pname)
        model.embedding.projective.requires_grad_(False)
        return model

    return build


METHODS = {
    m.key: m
    for m in [
        Method("plain", "plain backbone", _backbone(trainable=False)),
        Method("full", "full fine-tuning", _backbone(trainable=True)),
        Method("linear", "linear probe", _backbone(trainable=False)),
        Method("floor", "floor (frozen, grads to input)", _backbone(False), grads_to_input=True),
        Method("arc", "ARC r=50", _arc(arc_peft.ARCConfig())),
        Method("arc_plain", "ARC r=50, plain autograd", _arc(arc_peft.ARCConfig()), lean=False),
        Method("arc_merged", "ARC r=50, merged", _arc(arc_peft.ARCConfig(), merged=True)),
        Method("arc_att", "ARC_att r=50", _arc(arc_peft.ARCConfig(positions=("attn",)))),
        Method("adaptmlp", "AdaptMLP r=64", _arc(arc_peft.AdaptMLPConfig(bottleneck=64))),
        Method("lora", "peft LoRA r=8 (qkv)", _peft("lora")),
        Method("vera", "peft VeRA r=256 (qkv)", _peft("vera")),
        Method("adapter_plus", "Adapter+ dim 8 (adapter-plus)", _adapter_plus),
        Method("official_arc", "official ARC code", _official("ARC")),
        Method("official_floor", "official code's floor", _official("none"), grads_to_input=True),
    ]
}


def missing(key: str) -> str | None:
    """Why ``key`` cannot run here, or ``None``."""
    package = {"lora": "peft", "vera": "peft", "adapter_plus": "adapter_plus"}.get(key)
    if package is not None and importlib.util.find_spec(package) is None:
        return f"{package.replace('_', '-')} is not installed (pip install arc-peft[bench])"
    if key.startswith("official"):
        try:
            official_arc_module(OFFICIAL_SOURCE[0] if OFFICIAL_SOURCE else None)
        except (FileNotFoundError, subprocess.CalledProcessError, ImportError) as exc:
            return f"official ARC code not available ({exc}); pass --official-arc PATH"
    return None
