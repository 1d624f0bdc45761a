"""Hugging Face ``transformers`` and ``open_clip`` vision models: discovery finds every
self-attention and MLP, leaves attention pooling out on purpose, and ARC / AdaptMLP behave on
them as on timm (identity at init, trainable alone, save/load bit for bit, ARC merges exactly).

The models are tiny random-init configurations (``ecosystems.py``); nothing is downloaded.
"""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import torch
from torch import nn

import arc_peft
from arc_peft.discovery.inputs import example_input, image_layout
from arc_peft.runtime.slots import iter_slots

from ecosystems import ECOSYSTEMS, Eco
from models import method_configs

# float32 rounding of the fold only (the random adapters move the outputs by far more).
MERGE_TOL = dict(rtol=1e-4, atol=1e-5)

METHODS = {
    **method_configs(dropout=0.0),
    "arc_identity": arc_peft.ARCConfig(rank=4, dropout=0.0, init="identity"),
}


@pytest.fixture(params=sorted(ECOSYSTEMS), ids=str)
def eco(request) -> Eco:
    spec = ECOSYSTEMS[request.param]
    pytest.importorskip(spec.library)
    return spec


def randomise(model: nn.Module, seed: int = 7, zero_attn_bias: bool = False) -> None:
    """Every adapter parameter (U, s, b, AdaptMLP's down/up) gets random O(0.3) values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in sorted(arc_peft.adapter_parameters(model).items()):
            param.copy_(0.3 * torch.randn(param.shape, generator=g))
        if zero_attn_bias:
            for _, _, slot in iter_slots(model):
                if slot.position == "attn":
                    for adapter in slot.values():
                        adapter.bias.zero_()


def adapted(spec: Eco, method: str, **kwargs) -> nn.Module:
    model = spec.build()
    arc_peft.inject_arc(model, METHODS[method])
    randomise(model, **kwargs)
    return model


def innermost(paths: list[str]) -> list[str]:
    return [p for p in paths if not any(q.startswith(p + ".") for q in paths)]


def inside(path: str, ancestor: str) -> bool:
    return path == ancestor or path.startswith(ancestor + ".")


# -- import hygiene ---------------------------------------------------------------------------


def test_import_does_not_import_transformers_or_open_clip():
    code = (
        "import arc_peft, arc_peft.discovery.inputs, sys; "
        "bad = [m for m in ('transformers', 'open_clip') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# -- the probe input --------------------------------------------------------------------------


def test_image_layout(eco):
    model = eco.build()
    assert image_layout(model) == eco.image
    assert example_input(model, batch=2).shape == (2, *eco.image)


def test_image_layout_reads_hf_config():
    transformers = pytest.importorskip("transformers")
    config = transformers.ViTConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
        image_size=(24, 40), patch_size=8, num_channels=1,
    )  # fmt: skip
    vit = transformers.ViTModel(config)
    assert image_layout(vit) == (1, 24, 40)

    class Wrapper(nn.Module):  # a user's module around the backbone declares nothing itself
        def __init__(self) -> None:
            super().__init__()
            self.backbone = vit
            self.classifier = nn.Linear(32, 5)

    assert image_layout(Wrapper()) == (1, 24, 40)
    clip = transformers.CLIPConfig(
        vision_config=dict(
            hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
            image_size=48, patch_size=8, num_channels=3,
        ),
        text_config=dict(
            hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
            vocab_size=64, max_position_embeddings=8,
        ),
    )  # fmt: skip
    # The text tower declares no image size: the vision config's is the one.
    assert image_layout(transformers.CLIPModel(clip)) == (3, 48, 48)


def test_image_layout_prefers_what_the_model_declares():
    class Model(nn.Module):  # a stem computing 64 channels from the image (CSATv2's DCT)
        def __init__(self, **declared) -> None:
            super().__init__()
            self.stem = nn.Conv2d(64, 8, 1)
            for key, value in declared.items():
                setattr(self, key, value)

    cfg = {"input_size": (3, 96, 128)}  # timm's pretrained_cfg: the weights' input
    assert image_layout(Model(pretrained_cfg=cfg)) == (3, 96, 128)
    assert image_layout(Model(default_cfg=cfg)) == (3, 96, 128)
    assert image_layout(Model(in_chans=3)) == (3, 224, 224)
    # the model as built (timm ``in_chans=1``) over the weights' configuration
    assert image_layout(Model(in_chans=1, pretrained_cfg=cfg)) == (1, 96, 128)
    assert image_layout(Model()) == (64, 224, 224)  # nothing declared: the first layer's guess


def test_image_layout_reads_open_clip():
    pytest.importorskip("open_clip")
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    vision = CLIPVisionCfg(layers=1, width=32, head_width=16, patch_size=8, image_size=40)
    text = CLIPTextCfg(context_length=8, vocab_size=64, width=32, heads=2, layers=1)
    model = CLIP(embed_dim=16, vision_cfg=vision, text_cfg=text)
    assert image_layout(model) == (3, 40, 40)
    assert image_layout(model.visual) == (3, 40, 40)


# -- discovery --------------------------------------------------------------------------------


def test_sites(eco):
    model = eco.build()
    plan = arc_peft.site_plan(model)
    pooling = eco.modules_matching(model, eco.pooling)
    attention = [
        p
        for p in innermost(eco.modules_matching(model, eco.attention))
        if not any(inside(p, q) for q in pooling)
    ]
    layers = eco.modules_matching(model, eco.layer)
    assert len(attention) == len(layers) >= 2, (attention, layers)
    attn_sites = [s for s in plan.sites if s.position == "attn"]
    mlp_sites = [s for s in plan.sites if s.position == "mlp"]
    # Every self-attention module is adapted once, at itself or the module wrapping it.
    for path in attention:
        covering = [s.path for s in attn_sites if inside(path, s.path) or inside(s.path, path)]
        assert len(covering) == 1, (path, covering, plan.summary())
    assert len(attn_sites) == len(attention), plan.summary()
    # One attention and one MLP per transformer layer, inside it; the MLP's ends in it too.
    for layer in layers:
        assert sum(inside(s.path, layer) for s in attn_sites) == 1, (layer, plan.summary())
        mlps = [s for s in mlp_sites if inside(s.path, layer)]
        assert len(mlps) == 1, (layer, plan.summary())
        assert inside(mlps[0].output_path, layer), mlps[0]
        assert all(layer not in (s.path, s.output_path) for s in plan.sites)
    assert len(mlp_sites) == len(layers), plan.summary()
    assert plan.num_blocks == len(layers)
    # Attention pooling is left out on purpose, and nothing else is left out.
    for path in pooling:
        assert any(inside(item.path, path) and item.on_purpose for item in plan.left_out), (
            path,
            plan.summary(),
        )
        assert not any(inside(s.path, path) for s in plan.sites)
    assert all(item.on_purpose for item in plan.left_out), plan.summary()
    if not pooling:
        assert not plan.left_out, plan.summary()
    # The widths are the layers' widths.
    for site in plan.sites:
        assert site.axis == -1 and site.width in (16, 32), site


POOLING = sorted(name for name, spec in ECOSYSTEMS.items() if spec.pooling)


@pytest.mark.parametrize("method", ["arc", "adaptmlp"])
@pytest.mark.parametrize("name", POOLING)
def test_pooling_not_adapted(name, method):
    eco = ECOSYSTEMS[name]
    pytest.importorskip(eco.library)
    model = eco.build()
    arc_peft.inject_arc(model, METHODS[method])
    pooling = eco.modules_matching(model, eco.pooling)
    names = list(arc_peft.adapter_parameters(model))
    assert names
    assert not [n for n in names for p in pooling if inside(n, p)]


# -- the adapters -----------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["arc_identity", "adaptmlp"])
def test_identity_at_init(eco, method):
    model = eco.build()
    x = eco.inputs()
    with torch.no_grad():
        before = eco.call(model, x)
        arc_peft.inject_arc(model, METHODS[method])
        after = eco.call(model, x)
    torch.testing.assert_close(after, before, rtol=0, atol=1e-6)


@pytest.mark.parametrize("method", ["arc", "adaptmlp"])
def test_nonzero_adapter_changes_output(eco, method):
    model = eco.build()
    x = eco.inputs()
    with torch.no_grad():
        before = eco.call(model, x)
        arc_peft.inject_arc(model, METHODS[method])
        randomise(model)
        after = eco.call(model, x)
    assert (after - before).abs().max() > 1e-3


@pytest.mark.parametrize("method", ["arc", "adaptmlp"])
def test_only_adapters_get_gradients(eco, method):
    model = adapted(eco, method)
    arc_peft.freeze_backbone(model, train_head=False)
    adapters = arc_peft.adapter_parameters(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(adapters)
    eco.call(model, eco.inputs()).square().mean().backward()
    for name, param in model.named_parameters():
        # (A gradient can be exactly zero: a ReLU of AdaptMLP dead on the one token that the
        # pooling reads. It is still computed.)
        assert (param.grad is not None) == (name in adapters), name
    assert sum(float(p.grad.abs().sum()) for p in adapters.values()) > 0


@pytest.mark.parametrize("method", ["arc", "adaptmlp"])
def test_save_load_bit_for_bit(eco, method, tmp_path):
    model = adapted(eco, method)
    x = eco.inputs()
    path = tmp_path / "adapter.safetensors"
    arc_peft.save_adapter(model, path, include_head=eco.has_head)
    fresh = eco.build()
    arc_peft.load_adapter(fresh, path)
    with torch.no_grad():
        assert torch.equal(eco.call(fresh, x), eco.call(model, x))


def test_merge_arc(eco):
    x = eco.inputs()
    model = adapted(eco, "arc")
    if eco.merge_needs_zero_attn_bias:
        # Cosine attention: the key offset W_k·b of a non-zero attention bias cannot be folded.
        with pytest.raises(arc_peft.MergeError):
            arc_peft.merge_adapter(model)
        model = adapted(eco, "arc", zero_attn_bias=True)
    with torch.no_grad():
        expected = eco.call(model, x)
        arc_peft.merge_adapter(model)
        merged = eco.call(model, x)
    assert not arc_peft.adapter_parameters(model)
    assert not any(re.search(r"(^|\.)arc_peft\.", n) for n, _ in model.named_parameters())
    torch.testing.assert_close(merged, expected, **MERGE_TOL)
