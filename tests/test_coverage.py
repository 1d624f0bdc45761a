"""Site discovery on architectures nobody registered: one small model each of diverse timm
families, checked against what is known about them independently of discovery (the module types
that are attention in that family), and a slow sweep over every family (scripts/coverage.py)."""

from __future__ import annotations

import copy
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

import arc_peft
from arc_peft.methods.arc.layers import ARC

timm = pytest.importorskip("timm")

ROOT = Path(__file__).resolve().parents[1]

# entrypoint -> (tiny kwargs, attention module class names, MLP sites expected)
CASES = {
    # channels-first hybrid: attention only in the last stage, Conv MLPs
    "fastvit_sa12": (dict(img_size=64), ("Attention",), 2),
    "efficientformerv2_s0": (dict(img_size=64), ("Attention2d", "Attention2dDownsample"), 4),
    # parallel blocks: three attention + MLP sites per block (the MLPs shared: one module)
    "coat_lite_tiny": (dict(img_size=64), ("FactorAttnConvRelPosEnc",), 8),
    # cross-attention fusion: adapted, attention-only sites
    "crossvit_tiny_240": ({}, ("Attention", "CrossAttention"), None),
    "cait_xxs24_224": (
        dict(img_size=32, depth=2, depth_token_only=1),
        ("TalkingHeadAttn", "ClassAttn"),
        3,
    ),
    "xcit_nano_12_p16_224": (
        dict(img_size=32, depth=2, cls_attn_layers=1),
        ("XCA", "ClassAttn"),
        3,
    ),
    "maxvit_pico_rw_256": (dict(img_size=64, depths=(1, 1, 1, 1)), ("AttentionCl",), 8),
    "pvt_v2_b0": (dict(depths=(1, 1, 1, 1)), ("Attention",), 4),
    "levit_128s": (dict(img_size=64), ("Attention", "AttentionDownsample"), None),
    "vit_base_patch16_rope_224": (
        dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2),
        ("AttentionRope",),
        2,
    ),
    # clamped projections (its "clippable" linears) and a gated MLP
    "gemma4_vit_167m": (
        dict(
            img_size=48,
            embed_dim=32,
            depth=2,
            num_heads=2,
            head_dim=16,
            intermediate_size=64,
            use_clipped_linears=True,
        ),
        ("Gemma4Attention",),
        2,
    ),  # fmt: skip
    # single-head attention over a normalised slice of the channels (channels-first)
    "shvit_s1": (dict(img_size=64), ("SHSA",), 9),
    # separable attention: softmax(q) * k summed over the tokens, no matmul at all
    "mobilevitv2_050": (dict(img_size=64), ("LinearSelfAttention",), 9),
    "visformer_tiny": (dict(img_size=64), ("Attention",), 8),
    # a gated MLP that normalises inline before its two projections: adapted at its input
    "vitamin_small_224": (dict(img_size=64), ("Attention",), 14),
    # inner (pixel) and outer (patch) attention per block, each with its MLP
    "tnt_s_patch16_224": (dict(img_size=32, depth=2), ("Attention",), 4),
}


def _build(name: str, kwargs: dict) -> torch.nn.Module:
    torch.manual_seed(0)
    try:
        return timm.create_model(name, pretrained=False, **kwargs).eval()
    except TypeError:  # a family that does not take some tiny kwarg: its smallest default
        return timm.create_model(name, pretrained=False).eval()


def _example(kwargs: dict) -> torch.Tensor:
    size = kwargs.get("img_size", 224)
    size = size if isinstance(size, tuple) else (size, size)
    if not kwargs:
        size = (240, 240)
    return torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(0))


def _attention_modules(model: torch.nn.Module, names: tuple[str, ...]) -> set[str]:
    return {p for p, m in model.named_modules() if type(m).__name__ in names}


@pytest.mark.parametrize("name", list(CASES))
def test_family_fully_adapted(name: str) -> None:
    kwargs, attn_types, mlps = CASES[name]
    model = _build(name, kwargs)
    x = _example(kwargs)
    plan = arc_peft.site_plan(model, example_input=x[:1], refresh=True)
    expected = _attention_modules(model, attn_types)
    assert expected, f"{name}: no module of {attn_types}: the test's premise is stale"
    attn = {s.path for s in plan.sites if s.position == "attn"}
    # every attention module is a site, or holds the one site of its input projection
    for path in expected:
        assert any(
            a == path or a.startswith(path + ".") for a in attn
        ), f"{name}: {path} is not adapted\n{plan.summary()}"
    assert len(attn) == len(expected), plan.summary()
    assert not [i for i in plan.left_out if not i.on_purpose], plan.summary()
    n_mlp = sum(s.position == "mlp" for s in plan.sites)
    if mlps is not None:
        assert n_mlp == mlps, plan.summary()
    # a non-zero adapter at every site runs and changes the features
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():  # zero-initialised branches would hide the change
            if p.is_floating_point() and not p.any():
                p.copy_(0.02 * torch.randn(p.shape, generator=g))
    adapted = copy.deepcopy(model)
    arc_peft.inject_arc(adapted, arc_peft.ARCConfig(rank=4), example_input=x[:1])
    adapters = [m for m in adapted.modules() if isinstance(m, ARC)]  # the site layers
    assert len(adapters) == len(plan.sites)
    ran: set[int] = set()
    hooks = [m.register_forward_hook(lambda m, a, o: ran.add(id(m))) for m in adapters]
    with torch.no_grad():
        for p in arc_peft.adapter_parameters(adapted).values():  # small: BatchNorm stems overflow
            p.copy_(0.3 * torch.randn(p.shape, generator=g))
        y0, y = model.forward_features(x), adapted.forward_features(x)
    for h in hooks:
        h.remove()
    assert len(ran) == len(adapters), f"{name}: {len(adapters) - len(ran)} adapters never ran"
    y0, y = (t[0] if isinstance(t, (list, tuple)) else t for t in (y0, y))
    assert torch.isfinite(y).all()
    assert (y - y0).abs().max() > 1e-6 * y0.abs().max(), f"{name}: the adapters change nothing"


def test_attention_pooling_left_out_on_purpose() -> None:
    model = timm.create_model(
        "vit_base_patch16_siglip_224", pretrained=False, img_size=32, patch_size=8,
        embed_dim=32, depth=1, num_heads=2,
    ).eval()  # fmt: skip
    plan = arc_peft.site_plan(model, refresh=True)
    pooled = [i for i in plan.left_out if i.path.startswith("attn_pool")]
    assert pooled and all(i.on_purpose for i in pooled), plan.summary()
    assert [s.path for s in plan.sites] == ["blocks.0.attn", "blocks.0.mlp"]
    arc_peft.inject_arc(model, arc_peft.ARCConfig(rank=4))  # no error


# The smallest entrypoint with self-attention of each timm model family (timm 1.0.31), as picked by
# scripts/coverage.py from its census; the slow test below recomputes it from the installed timm.
FAMILY_REPRESENTATIVES = (
    "beit_base_patch16_224",
    "halonet_h1",
    "gcresnext26ts",
    "cait_xxs24_224",
    "coat_tiny",
    "convit_tiny",
    "cpubone_nano",
    "crossvit_tiny_240",
    "davit_tiny",
    "deepseek_vit_412m",
    "deit_tiny_patch16_224",
    "edgenext_xx_small",
    "efficientformer_l1",
    "efficientformerv2_s0",
    "gc_efficientnetv2_rw_t",
    "efficientvim_m1",
    "efficientvit_b0",
    "efficientvit_m0",
    "vit_tiny_patch16_dinov3_qkvb",
    "fastvit_mci0",
    "gcvit_xxtiny",
    "gemma4_vit_167m",
    "hiera_tiny_224",
    "sam2_hiera_tiny",
    "iformer_t",
    "levit_128s",
    "lowformer_b0",
    "test_coatnet",
    "caformer_s18",
    "mobilenetv4_hybrid_medium_075",
    "mobilenetv5_base",
    "mobilevit_xxs",
    "mvitv2_tiny",
    "naflexvit_base_patch16_parfac_gap",
    "nest_tiny",
    "nextvit_small",
    "pit_ti_224",
    "pvt_v2_b0",
    "qwen3_vit_88m",
    "shvit_s1",
    "skresnet18",
    "swin_tiny_patch4_window7_224",
    "swinv2_tiny_window8_256",
    "swinv2_cr_tiny_224",
    "tiny_vit_5m_224",
    "tnt_s_legacy_patch16_224",
    "twins_svt_small",
    "visformer_tiny",
    "test_vit",
    "vit_tiny_r_s16_p8_224",
    "test_vit_relpos",
    "samvit_base_patch16_224",
    "vitamin_small_224",
    "volo_d1_224",
    "xcit_nano_12_p8_224",
)


def _coverage_script():
    spec = importlib.util.spec_from_file_location(
        "coverage_script", ROOT / "scripts" / "coverage.py"
    )
    coverage = importlib.util.module_from_spec(spec)
    sys.modules["coverage_script"] = coverage
    spec.loader.exec_module(coverage)
    return coverage


@pytest.mark.parametrize("name", FAMILY_REPRESENTATIVES)
def test_every_timm_family_on_the_meta_device(name: str) -> None:
    """Structure only (no arithmetic on the meta device): every module issuing attention ops is
    a site or pooling left out on purpose, nothing else is left out, every adapter runs."""
    if name not in timm.list_models():
        pytest.skip(f"{name} is not in this timm version")
    row = _coverage_script().check(name, "meta")
    assert row["ok"], {k: row.get(k) for k in ("error", "uncovered", "left_out", "adapters_run")}


@pytest.mark.slow
def test_every_timm_family_with_attention() -> None:
    coverage = _coverage_script()
    fams = coverage.families()
    census = coverage.load_census([n for ns in fams.values() for n in ns], workers=2)
    rows = coverage.family_rows(fams, census)
    bad = [
        (r["family"], r["entrypoint"], r.get("error") or r.get("left_out"))
        for r in rows
        if not r["ok"]
    ]
    assert not bad, bad
