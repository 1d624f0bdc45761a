"""Site discovery on architectures nobody registered: one small model each of diverse timm
families, checked against what is known about them independently of discovery (the module types
that are attention in that family), and a slow sweep over every family (scripts/coverage.py)."""

from __future__ import annotations

import copy
import importlib.util
import sys
import warnings
from pathlib import Path

import pytest
import torch

import arc_peft
from arc_peft.methods.adaptmlp.layers import AdaptMLP
from arc_peft.methods.arc.layers import ARC
from arc_peft.runtime.slots import iter_slots

from models import randomise_adapters

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
# (csatv2 was missing while its probe input was wrong: its census failed.)
FAMILY_REPRESENTATIVES = (
    "beit_base_patch16_224",
    "halonet_h1",
    "gcresnext26ts",
    "cait_xxs24_224",
    "coat_tiny",
    "convit_tiny",
    "cpubone_nano",
    "crossvit_tiny_240",
    "csatv2",
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


# MLP sites whose output end a forward never reaches (reported, refused for AdaptMLP): NextViT's
# conv blocks after an attention block read the "MLP" at mhca.projection and add at mlp.
UNREACHED_OUTPUTS = {"nextvit_small": [f"stages.2.blocks.{i}.mhca.projection" for i in range(5, 9)]}


@pytest.mark.parametrize("name", FAMILY_REPRESENTATIVES)
def test_every_timm_family_on_the_meta_device(name: str) -> None:
    """Structure only (no arithmetic on the meta device): every module issuing attention ops is
    a site or pooling left out on purpose, nothing else is left out, both methods inject. That
    the adapters run is checked on real tensors (below): the meta device proves nothing ran."""
    if name not in timm.list_models():
        pytest.skip(f"{name} is not in this timm version")
    coverage = _coverage_script()
    row = coverage.check(name, "meta")
    assert not row["ok"]  # nothing is counted as running on the meta device
    # MLP sites whose output end no forward reaches: reported, and known (see the NextViT test)
    unreached = [i["path"] for i in row.get("no_output", ())]
    assert unreached == UNREACHED_OUTPUTS.get(name, []), unreached
    for result in row.get("methods", {}).values():
        result["left_out"] = [p for p in result.get("left_out", ()) if p not in unreached]
    assert coverage.structure_ok(row), {
        k: row.get(k) for k in ("error", "uncovered", "left_out", "methods")
    }


def _real_model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).eval()
    with torch.no_grad():  # zero-initialised branches and layer scales of 1e-6 hide any change
        for p in model.parameters():
            if p.is_floating_point() and p.numel() and p.abs().max() < 1e-4:
                p.normal_(0, 0.02)
    return model


def _check_every_injected_adapter_runs(
    model: torch.nn.Module, x: torch.Tensor | None = None
) -> None:
    """Under both methods: every adapter injected (non-zero) runs in a forward on real
    tensors, counted by forward hooks on the adapter layers, and the features change. Sites
    left out (reported) get no adapter; a model without MLP sites has none for AdaptMLP."""
    plan = arc_peft.site_plan(model, example_input=x)
    x = arc_peft.discovery.inputs.example_input(model) if x is None else x
    for config, layer in (
        (arc_peft.ARCConfig(rank=4, allow_partial=True), ARC),
        (arc_peft.AdaptMLPConfig(bottleneck=8, allow_partial=True), AdaptMLP),
    ):
        if not any(s.position in config.positions for s in plan.sites):
            continue  # AdaptMLP on a model whose blocks have no MLP (HaloNet)
        adapted = copy.deepcopy(model)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a left-out site is the test below's business
            arc_peft.inject_arc(adapted, config)  # the plan (and input) kept on the model
        adapters = [m for m in adapted.modules() if isinstance(m, layer)]
        assert adapters, plan.summary()
        ran: set[int] = set()
        hooks = [m.register_forward_hook(lambda m, a, o, ran=ran: ran.add(id(m))) for m in adapters]
        randomise_adapters(adapted, seed=1)
        with torch.no_grad():
            y = adapted(x)
            y0 = model(x)
        for hook in hooks:
            hook.remove()
        missing = [i for i, m in enumerate(adapters) if id(m) not in ran]
        assert not missing, f"{type(config).__name__}: {len(missing)} of {len(adapters)} never ran"
        y, y0 = (t[0] if isinstance(t, (list, tuple)) else t for t in (y, y0))
        assert torch.isfinite(y).all()
        assert (y - y0).abs().max() > 1e-6 * y0.abs().max(), type(config).__name__


# The default run: a few cheap families (and NextViT, on a small input, below); the sweep over
# every family is slow.
REAL_SUBSET = ("test_vit", "test_vit_relpos", "test_coatnet")


@pytest.mark.parametrize(
    "name",
    [
        n if n in REAL_SUBSET else pytest.param(n, marks=pytest.mark.slow)
        for n in FAMILY_REPRESENTATIVES
    ],
)
def test_every_injected_adapter_runs(name: str) -> None:
    if name not in timm.list_models():
        pytest.skip(f"{name} is not in this timm version")
    _check_every_injected_adapter_runs(_real_model(name))


def test_nextvit_adaptmlp_sites_whose_adapter_never_runs_are_refused() -> None:
    """NextViT's conv blocks after an attention block: the MLP site read at
    ``mhca.projection`` adds its output at the block's ``mlp``, a hook AdaptMLP never reaches
    there. Reported and refused by default, left out with allow_partial; ARC (which only
    reads the input) adapts all twelve sites."""
    model = _real_model("nextvit_small")
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    dead = UNREACHED_OUTPUTS["nextvit_small"]
    plan = arc_peft.site_plan(model, example_input=x)
    assert not plan.left_out
    assert [s.path for s in plan.sites if s.position == "mlp" and s.no_output] == dead
    with pytest.raises(arc_peft.UnsupportedModelError, match=r"4 attention or MLP site"):
        arc_peft.inject_arc(model, arc_peft.AdaptMLPConfig(bottleneck=8))
    assert iter_slots(model) == []
    with pytest.warns(UserWarning, match=r"stages\.2\.blocks\.5\.mhca\.projection"):
        arc_peft.inject_arc(model, arc_peft.AdaptMLPConfig(bottleneck=8, allow_partial=True))
    paths = [s.site.path for _, _, s in iter_slots(model)]
    assert len(paths) == 4 and not set(paths) & set(dead)
    arc_peft.remove_arc(model)
    arc_peft.inject_arc(model, arc_peft.ARCConfig(rank=4))
    assert len(iter_slots(model)) == 12
    arc_peft.remove_arc(model)
    _check_every_injected_adapter_runs(model, x)  # 12 of 12 ARC, 4 of 4 AdaptMLP


@pytest.mark.parametrize("name", ["csatv2", "csatv2_21m"])
def test_csatv2_adapts_without_example_input(name: str) -> None:
    """Its stem reads 64 DCT channels computed from a 3-channel image: the probe input comes
    from what the model declares (``in_chans``, ``pretrained_cfg``), not from that layer."""
    if name not in timm.list_models():
        pytest.skip(f"{name} is not in this timm version")
    with torch.device("meta"):  # the structure is all this checks: no arithmetic
        model = timm.create_model(name, pretrained=False).eval()
    assert arc_peft.discovery.inputs.image_layout(model) == tuple(
        model.pretrained_cfg["input_size"]
    )
    assert model.pretrained_cfg["input_size"][0] == 3
    arc_peft.inject_arc(model, arc_peft.ARCConfig(rank=4))
    plan = arc_peft.site_plan(model)
    assert plan.sites and not plan.left_out, plan.summary()
    assert len(iter_slots(model)) == len(plan.sites)


@pytest.mark.slow
def test_every_timm_family_with_attention() -> None:
    """Every timm family with attention, found from the installed timm (a new family is
    checked without being named): its smallest model is adapted, and under both methods every
    injected adapter runs on real tensors and changes the output."""
    coverage = _coverage_script()
    fams = coverage.families()
    census = coverage.load_census([n for ns in fams.values() for n in ns], workers=2)
    rows = coverage.family_rows(fams, census, torchvision=False, workers=2)
    assert len(rows) >= len(FAMILY_REPRESENTATIVES)
    errors = [(r["family"], r["entrypoint"], r["error"]) for r in rows if "error" in r]
    assert not errors, errors
    not_run = [
        (r["family"], method, m)
        for r in rows
        for method, m in r["methods"].items()
        if not m.get("none") and not ("error" not in m and m.get("adapters_run") == m["adapters"])
    ]
    assert not not_run, not_run
    unchanged = [
        (r["family"], method)
        for r in rows
        for method, m in r["methods"].items()
        if not m.get("none") and not (m["changed"] and m["finite"])
    ]
    assert not unchanged, unchanged
    # nothing left out but attention pooling (on purpose); MLP sites no output adapter reaches
    # are reported (no_output) and known
    partial = [
        (r["family"], r["left_out"], r["uncovered"])
        for r in rows
        if r["uncovered"] or any(not i["on_purpose"] for i in r["left_out"])
    ]
    assert not partial, partial
    unreached = {r["entrypoint"]: [i["path"] for i in r["no_output"]] for r in rows}
    assert {k: v for k, v in unreached.items() if v} == UNREACHED_OUTPUTS
