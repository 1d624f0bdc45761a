"""merge_adapter / unmerge_adapter: exact folds on every architecture, clear refusals otherwise."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from torch import nn

import arc_peft
from arc_peft import ARCConfig
from arc_peft.discovery import targets
from arc_peft.merge import _affine
from arc_peft.runtime.slots import iter_slots

from models import MATRIX, build, inputs, randomise_adapters

# Outputs are O(1); the merged model differs from the adapted one by float32 rounding only
# (measured: at most ~5e-6), while the adapter itself moves the outputs by >= 0.04.
TOL = dict(rtol=1e-4, atol=3e-5)

# Per model: whether the attention adapter's bias must be zero for an exact merge (cosine
# attention or RoPE: the key offset W_k·b matters and there is no key bias to take it), and
# whether the model pads windows after the adapter (torchvision Swin).
# TNT's and FastViT's attention compute q and k with bias-free layers: the query offset W_q·b
# has no bias to go to.
ZERO_ATTN_BIAS = {"swinv2", "eva02", "eva02_swiglu", "tv_swinv2", "tnt", "fastvit"}
PADS = {"tv_swin", "tv_swinv2"}


# FastViT's tiny features are O(0.05): its adapters need O(1) values to move the logits well
# above the merge tolerance.
SCALE = {"fastvit": 1.0}


def randomise(
    model: nn.Module, zero_attn_bias: bool = False, seed: int = 7, scale: float = 0.3
) -> None:
    """Give every adapter parameter (U, s and b included) random O(``scale``) values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, _, slot in iter_slots(model):
            for adapter in slot.values():
                for param in adapter.parameters():
                    param.copy_(scale * torch.randn(param.shape, generator=g))
                if zero_attn_bias and slot.position == "attn":
                    adapter.bias.zero_()


def adapted(name: str, zero_attn_bias: bool = False, **config) -> nn.Module:
    model = build(name)
    arc_peft.inject_arc(model, arc_peft.ARCConfig(**{"rank": 4, **config}))
    randomise(model, zero_attn_bias, scale=SCALE.get(name, 0.3))
    return model


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-for-bit equal, NaNs included (``torch.equal`` says NaN != NaN)."""
    nan = a.isnan() if a.is_floating_point() else torch.zeros_like(a, dtype=torch.bool)
    return torch.equal(nan, b.isnan() if b.is_floating_point() else nan) and torch.equal(
        a.masked_fill(nan, 0), b.masked_fill(nan, 0)
    )


def assert_same_state(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert list(after) == list(before)
    for key, value in before.items():
        assert same(after[key], value), key


def has_hooks(model: nn.Module) -> bool:
    return any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())


@torch.no_grad()
@pytest.mark.parametrize("name", MATRIX)
def test_merged_model_is_the_plain_backbone_and_computes_like_the_adapted_one(name):
    x = inputs(name)
    plain = build(name)
    backbone_out = plain(x)
    model = adapted(name, zero_attn_bias=name in ZERO_ATTN_BIAS)
    expected = model(x)
    # the adapter does change the outputs, by far more than the merge tolerance
    assert (expected - backbone_out).abs().max() > 100 * TOL["atol"]

    arc_peft.merge_adapter(model, assume_no_window_padding=name in PADS)
    merged_out = model(x)
    torch.testing.assert_close(merged_out, expected, **TOL)

    # Exactly the plain backbone's modules, parameter names and no hooks left behind.
    assert [n for n, _ in model.named_modules()] == [n for n, _ in plain.named_modules()]
    assert not any(isinstance(m, arc_peft.Adapter) for m in model.modules())
    assert not has_hooks(model) and arc_peft.adapter_configs(model) == {}
    # Only the sites' own tensors changed (under every name a site module has: CoaT's parallel
    # block calls one MLP module as mlp2, mlp3 and mlp4).
    site_modules = {id(plain.get_submodule(s.path)) for s in arc_peft.site_plan(plain).sites}
    sites = [
        f"{path}."
        for path, module in plain.named_modules(remove_duplicate=False)
        if id(module) in site_modules
    ]
    state, plain_state = model.state_dict(), plain.state_dict()
    changed = [k for k in plain_state if not torch.equal(state[k], plain_state[k])]
    assert changed and all(any(k.startswith(s) for s in sites) for k in changed), changed

    fresh = build(name, seed=123)
    fresh.load_state_dict(state, strict=True)
    assert torch.equal(fresh(x), merged_out)


@torch.no_grad()
def test_merge_of_adapters_on_some_blocks_and_positions():
    x = inputs("vit")
    model = adapted("vit", positions=("attn",), blocks=[1])
    expected = model(x)
    arc_peft.merge_adapter(model)
    torch.testing.assert_close(model(x), expected, **TOL)


def test_fold_uses_the_adapters_own_affine_map():
    model = adapted("vit")
    for _, _, slot in iter_slots(model):
        adapter = slot["default"]
        M, b = _affine(adapter, torch.device("cpu"))
        M32, b32 = adapter.merged_matrix()
        torch.testing.assert_close(M.float(), M32, rtol=1e-6, atol=1e-6)
        assert torch.equal(b.float(), b32)
        x = torch.randn(3, adapter.dim)
        adapter.eval()
        torch.testing.assert_close(adapter(x), x @ M32 + b32, rtol=1e-5, atol=1e-5)


# -- one site at a time: layouts the model matrix does not contain -------------------------------


def _site_cases():
    from timm.layers import Attention, GluMlp, Mlp, SwiGLU
    from timm.models.eva import EvaAttention

    d = 16
    return {
        "timm_attention_gated": lambda: Attention(d, num_heads=2, qkv_bias=True, gated=True),
        "timm_attention_qk_norm": lambda: Attention(
            d, num_heads=2, qkv_bias=True, qk_norm=True, norm_layer=nn.LayerNorm
        ),
        "eva_attention_separate_gated": lambda: EvaAttention(
            d, num_heads=2, qkv_fused=False, gated=True, scale_norm=False
        ),
        "mha_batch_first": lambda: nn.MultiheadAttention(d, 2, batch_first=True),
        "mlp": lambda: Mlp(d, 32),
        "glu_mlp": lambda: GluMlp(d, 32),
        "swiglu": lambda: SwiGLU(d, 32),
    }


@torch.no_grad()
@pytest.mark.parametrize("case", list(_site_cases()))
def test_fold_of_a_single_site_is_exact(case):
    make = _site_cases()[case]
    torch.manual_seed(0)
    module = make().eval()
    for param in module.parameters():  # random biases too (timm zero-initialises some)
        param.copy_(0.3 * torch.randn(param.shape))
    d = 16
    u = torch.randn(d, 4)
    M = torch.eye(d) + (u * torch.randn(4)) @ u.t()
    b = torch.randn(d)
    x = torch.randn(2, 5, d)
    fold = targets.get_target(module).merge
    bias_free = "eva" in case  # EVA's key projection has no bias: its key offset must be zero
    if bias_free:
        with pytest.raises(arc_peft.MergeError, match="RoPE"):
            fold(module, M.double(), b.double())
        b = torch.zeros(d)

    def run(m, inp):
        if isinstance(m, nn.MultiheadAttention):
            return m(inp, inp, inp, need_weights=False)[0]
        return m(inp)

    expected = run(module, x @ M + b)
    new = fold(module, M.double(), b.double())
    for tensor_name, value in new.items():
        module.get_parameter(tensor_name).copy_(value)
    torch.testing.assert_close(run(module, x), expected, rtol=1e-4, atol=1e-4)


# -- refusals: clear error, model unchanged ------------------------------------------------------


def refuse(model: nn.Module, match: str, **kwargs) -> arc_peft.MergeError:
    x = inputs(model.__dict__["_test_name"])
    before = snapshot(model)
    with torch.no_grad():
        out = model(x)
    adapters = [id(a) for _, _, slot in iter_slots(model) for a in slot.values()]
    with pytest.raises(arc_peft.MergeError, match=match) as info:
        arc_peft.merge_adapter(model, **kwargs)
    assert_same_state(model, before)
    assert [id(a) for _, _, slot in iter_slots(model) for a in slot.values()] == adapters
    with torch.no_grad():
        assert same(model(x), out)
    return info.value


def named(model: nn.Module, name: str) -> nn.Module:
    model.__dict__["_test_name"] = name
    return model


def test_adaptmlp_is_refused():
    model = named(build("vit"), "vit")
    arc_peft.inject_arc(model, arc_peft.AdaptMLPConfig(bottleneck=4))
    err = refuse(model, "AdaptMLP")
    assert "blocks.0.arc_peft.mlp" in str(err) and "timm.layers.mlp.Mlp" in str(err)


@pytest.mark.parametrize("name", ["swinv2", "tv_swinv2"])
def test_cosine_attention_with_a_key_offset_is_refused(name):
    model = named(adapted(name), name)
    err = refuse(model, "cosine attention", assume_no_window_padding=True)
    assert ".arc_peft.attn" in str(err) and "WindowAttention" in str(err)


@pytest.mark.parametrize("name", ["eva02", "eva02_swiglu"])
def test_eva_attention_with_a_key_offset_is_refused(name):
    # RoPE makes a key offset position dependent: dropping it is measurably inexact.
    err = refuse(named(adapted(name), name), "RoPE")
    assert "blocks.0.arc_peft.attn" in str(err) and "EvaAttention" in str(err)


@torch.no_grad()
def test_torchvision_swin_refuses_only_where_its_configured_size_pads():
    x = torch.randn(2, 3, 40, 40, generator=torch.Generator().manual_seed(3))
    # Probed at 40 px (10x10 feature map, window 4): the windows pad, the merge is refused.
    model = build("tv_swin")
    arc_peft.inject_arc(model, arc_peft.ARCConfig(rank=4), example_input=x[:1])
    randomise(model)
    model = named(model, "tv_swin")
    err = refuse(model, "assume_no_window_padding=True")
    assert "10×10 tokens in windows of 4×4" in str(err)
    # Told otherwise, the merge is still checked at the probed size, where it is not exact.
    refuse(model, "do not reproduce the adapted output", assume_no_window_padding=True)
    # At the size it is configured for (no size declared: 224 px, 56x56 tokens) nothing pads:
    # no flag needed, and the merge is exact there.
    model = adapted("tv_swin")
    y = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(4))
    expected = model(y)
    arc_peft.merge_adapter(model)
    torch.testing.assert_close(model(y), expected, **TOL)


@pytest.mark.parametrize("name", ["swinv2", "tv_swinv2", "eva02", "eva02_swiglu", "tv_swin"])
def test_mergeable_config_merges_cosine_rope_and_padding_models_after_training(name):
    model = build(name)
    example = inputs(name)[:1] if name == "tv_swin" else None  # 32 px: Swin's windows pad
    config = arc_peft.ARCConfig(rank=4, mergeable=True)
    arc_peft.inject_arc(model, config, example_input=example)
    arc_peft.freeze_backbone(model)
    attn_bias = [
        n for n in arc_peft.adapter_parameters(model) if ".attn." in n and n.endswith("bias")
    ]
    assert attn_bias == []  # no trainable bias at the attention sites
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    x = inputs(name)
    model.train()
    for _ in range(2):
        optimizer.zero_grad()
        model(x).square().mean().backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        expected = model(x)
        arc_peft.merge_adapter(model)
        torch.testing.assert_close(model(x), expected, **TOL)


def test_mergeable_config_round_trips_and_costs_one_bias_per_attention_site(tmp_path):
    plain, mergeable = build("vit"), build("vit")
    arc_peft.inject_arc(plain, arc_peft.ARCConfig(rank=4))
    arc_peft.inject_arc(mergeable, arc_peft.ARCConfig(rank=4, mergeable=True))
    cost = arc_peft.count_parameters(plain).adapter - arc_peft.count_parameters(mergeable).adapter
    assert cost == 2 * 32  # D = 32 per attention site, 2 blocks
    path = tmp_path / "m.safetensors"
    arc_peft.save_adapter(mergeable, path)
    fresh = build("vit")
    arc_peft.load_adapter(fresh, path)
    assert arc_peft.adapter_configs(fresh)["default"].mergeable is True
    assert "mergeable" not in arc_peft.ARCConfig().to_dict()  # old readers still read defaults
    with pytest.raises(ValueError, match="mergeable='yes' is invalid"):
        arc_peft.ARCConfig(mergeable="yes")


@torch.no_grad()
def test_torchvision_swin_merges_when_the_bias_is_zero_even_with_padding():
    model = adapted("tv_swin", zero_attn_bias=True)
    x = torch.randn(2, 3, 40, 40, generator=torch.Generator().manual_seed(3))
    expected = model(x)
    arc_peft.merge_adapter(model)
    torch.testing.assert_close(model(x), expected, **TOL)


def test_layer_without_a_bias_is_refused_unless_the_offset_is_zero():
    model = timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        num_classes=5,
        img_size=32,
        patch_size=8,
        embed_dim=32,
        depth=2,
        num_heads=2,
        qkv_bias=False,
    ).eval()
    arc_peft.inject_arc(model, arc_peft.ARCConfig(rank=4))
    randomise(named(model, "vit"))
    refuse(model, "no bias parameter")
    randomise(model, zero_attn_bias=True)
    x = inputs("vit")
    with torch.no_grad():
        expected = model(x)
        arc_peft.merge_adapter(model)
        torch.testing.assert_close(model(x), expected, **TOL)


def test_non_finite_result_is_refused():
    model = named(adapted("vit"), "vit")
    with torch.no_grad():
        next(iter(iter_slots(model)))[2]["default"].bias[0] = float("nan")
    refuse(model, "non-finite")


class _PadFirst(nn.Module):
    """An attention that zero-pads its input with an extra token before the projections."""

    def __init__(self, dim):
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)

    def forward(self, x):
        q, k, v = self.qkv(torch.nn.functional.pad(x, (0, 0, 1, 0))).chunk(3, dim=-1)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)


class _ConvAttention(nn.Module):
    """Channels-first attention: 1×1 convolutions read an N, C, H, W input."""

    def __init__(self, dim, key_bias=True):
        super().__init__()
        self.q, self.k = nn.Conv2d(dim, dim, 1), nn.Conv2d(dim, dim, 1, bias=key_bias)
        self.v, self.proj = nn.Conv2d(dim, dim, 1), nn.Conv2d(dim, dim, 1)

    def forward(self, x):
        n, c, h, w = x.shape
        q, k, v = (f(x).flatten(2).transpose(1, 2) for f in (self.q, self.k, self.v))
        out = torch.softmax(q @ k.transpose(1, 2), -1) @ v
        return self.proj(out.transpose(1, 2).reshape(n, c, h, w))


class _Wrap(nn.Module):
    def __init__(self, attention: nn.Module):
        super().__init__()
        self.attn = attention

    def forward(self, x):
        return self.attn(x)


def _merge_case(attention: nn.Module, x: torch.Tensor) -> tuple[nn.Module, torch.Tensor]:
    model = _Wrap(attention).eval()
    arc_peft.inject_arc(model, arc_peft.ARCConfig(rank=2, positions=("attn",)), example_input=x)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in arc_peft.adapter_parameters(model).values():
            param.copy_(torch.randn(param.shape, generator=g))
    return model, model(x)


def test_generic_fold_merges_unregistered_channels_first_attention():
    x = torch.randn(2, 8, 3, 3)
    model, expected = _merge_case(_ConvAttention(8), x)
    assert iter_slots(model)[0][2].site.axis == 1
    arc_peft.merge_adapter(model)
    torch.testing.assert_close(model(x), expected, **TOL)
    assert arc_peft.adapter_configs(model) == {}


def test_generic_fold_drops_a_key_offset_only_where_softmax_ignores_it():
    x = torch.randn(2, 8, 3, 3)
    model, expected = _merge_case(_ConvAttention(8, key_bias=False), x)
    arc_peft.merge_adapter(model)  # the dropped key offset is constant per query: exact
    torch.testing.assert_close(model(x), expected, **TOL)


class _TrainReturnsNone(_ConvAttention):
    """timm's LeViT attention overrides ``train`` and returns ``None`` (no ``.eval()`` chain)."""

    def train(self, mode=True):
        super().train(mode)


def test_generic_fold_does_not_chain_train_or_eval():
    x = torch.randn(2, 8, 3, 3)
    model, expected = _merge_case(_TrainReturnsNone(8), x)
    arc_peft.merge_adapter(model)
    torch.testing.assert_close(model(x), expected, **TOL)


def test_generic_fold_refuses_padding_before_the_layers():
    # Padded tokens are zeros unmerged but would become b merged: refused, naming the op.
    x = torch.randn(2, 5, 8)
    model, expected = _merge_case(_PadFirst(8), x)
    before = snapshot(model)
    with pytest.raises(arc_peft.MergeError, match="a pad op reads the adapted input") as info:
        arc_peft.merge_adapter(model)
    assert "arc_peft.attn" in str(info.value) and "_PadFirst at attn" in str(info.value)
    assert_same_state(model, before)
    assert same(model(x), expected)


def test_other_adapters_block_the_merge():
    model = named(adapted("vit"), "vit")
    arc_peft.inject_arc(model, arc_peft.ARCConfig(rank=2), name="other")
    refuse(model, r"also holds adapter\(s\) \['other'\]")


def test_merge_inside_disable_or_mixed_batch_is_refused():
    model = named(adapted("vit"), "vit")
    with arc_peft.disable_adapter(model), pytest.raises(arc_peft.MergeError, match="disable"):
        arc_peft.merge_adapter(model)
    with arc_peft.mixed_batch(model, ["default", None]), pytest.raises(arc_peft.MergeError):
        arc_peft.merge_adapter(model)
    assert list(arc_peft.adapter_configs(model)) == ["default"]


def test_name_resolution():
    model = adapted("vit")
    with pytest.raises(KeyError, match="'nope'"):
        arc_peft.merge_adapter(model, "nope")
    arc_peft.set_active_adapter(model, None)
    with pytest.raises(arc_peft.MergeError, match="no adapter is active"):
        arc_peft.merge_adapter(model)
    with pytest.raises(arc_peft.MergeError, match="no adapters"):
        arc_peft.merge_adapter(build("vit"))
    arc_peft.merge_adapter(model, "default")  # an inactive adapter merges when named
    assert arc_peft.adapter_configs(model) == {}


# -- unmerge ---------------------------------------------------------------------------------------


@torch.no_grad()
@pytest.mark.parametrize("name", ["vit", "tv_vit", "swin"])
def test_unmerge_restores_the_adapted_model_exactly(name):
    model = adapted(name)
    x = inputs(name)
    expected = model(x)
    before = snapshot(model)
    adapters = {n: id(p) for n, p in arc_peft.adapter_parameters(model).items()}

    arc_peft.merge_adapter(model, keep_original=True)
    assert arc_peft.adapter_configs(model) == {}
    plain_keys = list(build(name).state_dict())
    assert list(model.state_dict()) == plain_keys  # the kept copy is not in the state dict

    arc_peft.unmerge_adapter(model)
    assert_same_state(model, before)
    assert {n: id(p) for n, p in arc_peft.adapter_parameters(model).items()} == adapters
    assert arc_peft.active_adapter(model) == "default"
    assert torch.equal(model(x), expected)
    with pytest.raises(arc_peft.MergeError, match="nothing to undo"):
        arc_peft.unmerge_adapter(model)


def test_merge_without_keep_original_is_final():
    model = adapted("vit")
    arc_peft.merge_adapter(model)
    with pytest.raises(arc_peft.MergeError, match="keep_original=True"):
        arc_peft.unmerge_adapter(model)


def test_unmerge_refuses_while_newer_adapters_exist():
    model = adapted("vit")
    arc_peft.merge_adapter(model, keep_original=True)
    arc_peft.inject_arc(model, arc_peft.ARCConfig(rank=2), name="later")
    with pytest.raises(arc_peft.MergeError, match=r"\['later'\]"):
        arc_peft.unmerge_adapter(model)
    arc_peft.delete_adapter(model, "later")
    arc_peft.unmerge_adapter(model)
    assert list(arc_peft.adapter_configs(model)) == ["default"]


def test_the_advice_for_a_model_with_other_adapters_works_when_followed():
    model = build("vit")
    arc_peft.inject_arc(model, ARCConfig(rank=4), name="cifar")
    arc_peft.inject_arc(model, ARCConfig(rank=4), name="svhn")
    randomise_adapters(model)
    model.eval()
    with pytest.raises(arc_peft.MergeError, match="delete_adapter") as info:
        arc_peft.merge_adapter(model, "cifar")
    message = str(info.value)
    # The recipe the message gives: a copy, the others deleted from it, then the merge.
    assert "copy = copy.deepcopy(model); for other in ['svhn']" in message
    assert "arc_peft.merge_adapter(copy, 'cifar')" in message
    merged = copy.deepcopy(model)
    for other in ["svhn"]:
        arc_peft.delete_adapter(merged, other)
    arc_peft.merge_adapter(merged, "cifar")
    x = inputs("vit")
    with torch.no_grad():
        torch.testing.assert_close(merged(x), model(x), rtol=1e-5, atol=1e-5)
    assert arc_peft.adapter_configs(model).keys() == {"cifar", "svhn"}  # the original kept both


def test_swapped_arguments_are_named(tmp_path):
    model = build("vit")
    arc_peft.inject_arc(model, ARCConfig(rank=4))
    path = tmp_path / "a.safetensors"
    with pytest.raises(TypeError, match="arguments are swapped"):
        arc_peft.save_adapter(str(path), model)
    arc_peft.save_adapter(model, path)
    with pytest.raises(TypeError, match="arguments are swapped"):
        arc_peft.load_adapter(str(path), build("vit"))
