"""inject_arc / remove_arc across the model matrix: the invariants every architecture must keep."""

import copy

import pytest
import timm
import torch
from torch import nn

import arc_peft
from arc_peft import AdaptMLPConfig, ARCConfig, UnsupportedModelError
from arc_peft.methods.arc.layers import SharedProjection
from arc_peft.methods.layers import Adapter, SharedState
from arc_peft.runtime.shared import entry_path, iter_shared
from arc_peft.runtime.slots import iter_slots

from models import MATRIX, build, inputs, method_configs, randomise_adapters

_TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)

METHODS = {**method_configs(), "arc_att": ARCConfig(rank=4, positions=("attn",))}


def site_outputs(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The output of every adapted attention / MLP module for input ``x``."""
    captured, handles = {}, []
    for path, _, slot in iter_slots(model):
        site = model.get_submodule(slot.site.output_path or slot.site.path)

        def hook(_m, _a, out, path=path):
            captured[path] = out[0] if isinstance(out, tuple) else out

        handles.append(site.register_forward_hook(hook))
    model(x)
    for handle in handles:
        handle.remove()
    return captured


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_same_state(before: dict, model: nn.Module) -> None:
    after = model.state_dict()
    assert list(after) == list(before)
    for key, value in before.items():
        assert torch.equal(after[key], value), key


@pytest.mark.parametrize("name", MATRIX)
@pytest.mark.parametrize(
    "config",
    [
        ARCConfig(rank=4, init="identity"),
        ARCConfig(rank=4, positions=("attn",), init="paper"),  # attention scales start at zero
        AdaptMLPConfig(bottleneck=4),
        AdaptMLPConfig(bottleneck=4, placement="sequential", scale="learnable", layernorm="in"),
    ],
    ids=["arc-identity", "arc_att-paper", "adaptmlp", "adaptmlp-seq-ln"],
)
def test_identity_at_init(name, config):
    model = build(name)
    x = inputs(name)
    expected = model(x)
    arc_peft.inject_arc(model, config)
    assert torch.equal(model(x), expected)


@pytest.mark.parametrize("name", MATRIX)
def test_paper_init_mlp_scales_are_not_identity(name):
    """Official init: MLP scales are xavier-uniform, so ARC is not an identity at init."""
    model = build(name)
    x = inputs(name)
    expected = model(x)
    arc_peft.inject_arc(model, ARCConfig(rank=4))
    mlp_scales = [
        slot["default"].scale for _, _, slot in iter_slots(model) if slot.position == "mlp"
    ]
    attn_scales = [
        slot["default"].scale for _, _, slot in iter_slots(model) if slot.position == "attn"
    ]
    assert all(torch.count_nonzero(s) == 0 for s in attn_scales)
    assert all(torch.count_nonzero(s) == s.numel() for s in mlp_scales)
    assert not torch.equal(model(x), expected)


@pytest.mark.parametrize("name", MATRIX)
@pytest.mark.parametrize("method", list(METHODS))
def test_every_adapter_runs_and_changes_its_site(name, method):
    """A non-zero adapter changes every adapted module's output and the model's output."""
    model = build(name)
    x = inputs(name)
    arc_peft.inject_arc(model, METHODS[method])
    randomise_adapters(model)
    with arc_peft.disable_adapter(model):
        plain_sites, plain_out = site_outputs(model, x), model(x)
    adapted_sites, adapted_out = site_outputs(model, x), model(x)
    assert set(plain_sites) == {path for path, _, _ in iter_slots(model)}
    for path, value in plain_sites.items():
        assert not torch.equal(value, adapted_sites[path]), f"adapter at {path} did not run"
    assert not torch.equal(plain_out, adapted_out)


@pytest.mark.parametrize("name", MATRIX)
def test_only_adapters_and_head_train(name):
    model = build(name)
    x = inputs(name)
    arc_peft.inject_arc(model, ARCConfig(rank=4))
    randomise_adapters(model)
    arc_peft.freeze_backbone(model)
    head = {id(p) for p in arc_peft.get_head(model).parameters()}
    adapters = {id(p) for p in arc_peft.adapter_parameters(model).values()}
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == head | adapters and adapters and head

    before = state(model)
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(x).square().mean().backward()
    for pname, param in model.named_parameters():
        if id(param) in trainable:
            # Every trainable parameter gets a gradient: nothing that never runs (DDP-safe).
            assert param.grad is not None and param.grad.abs().sum() > 0, pname
        else:
            assert param.grad is None, pname
    optimizer.step()
    after = model.state_dict()
    adapter_names = set(arc_peft.adapter_parameters(model))
    head_names = {n for n, p in model.named_parameters() if id(p) in head}
    for key, value in before.items():
        changed = not torch.equal(after[key], value)
        if key in adapter_names or key in head_names:
            assert changed, f"{key} did not train"
        else:
            assert not changed, f"frozen {key} changed"


@pytest.mark.parametrize("name", MATRIX)
def test_counts_equal_the_closed_form(name):
    model = build(name)
    plain = sum(p.numel() for p in model.parameters())
    sites = arc_peft.site_plan(model).sites
    dims = {pos: [s.width for s in sites if s.position == pos] for pos in ("attn", "mlp")}
    r = 4
    arc_peft.inject_arc(model, ARCConfig(rank=r))
    # ARC: per (position, width) group one U (D·r), per site r + D.
    expected = 0
    for pos in ("attn", "mlp"):
        expected += sum(d * r for d in set(dims[pos])) + sum(r + d for d in dims[pos])
    counts = arc_peft.count_parameters(model)
    assert counts.adapter == expected
    assert counts.total == plain + expected
    assert sum(counts.breakdown.values()) == expected
    arc_peft.remove_arc(model)
    arc_peft.inject_arc(model, AdaptMLPConfig(bottleneck=r))
    assert arc_peft.count_parameters(model).adapter == sum(2 * d * r + r + d for d in dims["mlp"])


@pytest.mark.parametrize(
    ("model_name", "config", "expected"),
    [
        ("vit_base_patch16_224", ARCConfig(rank=50), 96_432),
        ("vit_base_patch16_224", ARCConfig(rank=50, positions=("attn",)), 48_216),
        ("vit_base_patch16_224", AdaptMLPConfig(bottleneck=64), 1_189_632),
        ("vit_base_patch16_224", AdaptMLPConfig(bottleneck=8), 156_768),
        ("swin_base_patch4_window7_224", ARCConfig(rank=50), 218_464),
    ],
)
def test_paper_parameter_counts(model_name, config, expected):
    import timm

    with torch.device("meta"):  # shapes only: no memory, no init cost
        model = timm.create_model(model_name, pretrained=False, num_classes=0)
    arc_peft.inject_arc(model, config)
    counts = arc_peft.count_parameters(model)
    assert counts.adapter == expected
    assert counts.head == 0


@pytest.mark.parametrize("name", MATRIX)
def test_remove_restores_the_original_model(name):
    model = build(name)
    x = inputs(name)
    before, expected = state(model), model(x)
    arc_peft.inject_arc(model, ARCConfig(rank=4))
    arc_peft.inject_arc(model, AdaptMLPConfig(bottleneck=3), name="other")
    randomise_adapters(model)
    assert not torch.equal(model(x), expected)
    assert arc_peft.remove_arc(model) is model
    assert_same_state(before, model)
    assert torch.equal(model(x), expected)
    for module in model.modules():
        assert not module._forward_pre_hooks and not module._forward_hooks
    assert arc_peft.adapter_configs(model) == {}


@pytest.mark.parametrize("name", MATRIX)
def test_plain_checkpoint_loads_into_an_adapted_model(name):
    """Backbone parameter names never change: only the adapter keys are missing."""
    donor = build(name, seed=7)
    model = build(name)
    arc_peft.inject_arc(model, ARCConfig(rank=4))
    missing, unexpected = model.load_state_dict(donor.state_dict(), strict=False)
    assert unexpected == []
    assert set(missing) == set(arc_peft.adapter_parameters(model))
    for key, value in donor.state_dict().items():
        assert torch.equal(model.state_dict()[key], value)


@pytest.mark.parametrize("name", ["vit", "swin", "eva02", "tv_vit", "tv_swin"])
def test_bf16_autocast_forward_and_backward(name):
    model = build(name)
    x = inputs(name)
    arc_peft.inject_arc(model, ARCConfig(rank=4))
    arc_peft.freeze_backbone(model)
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    out.float().square().mean().backward()
    for pname, param in arc_peft.adapter_parameters(model).items():
        assert param.grad is not None and torch.isfinite(param.grad).all(), pname
        assert param.grad.dtype == torch.float32


def test_training_mode_dropout_really_drops():
    model = build("vit")
    x = inputs("vit")
    arc_peft.inject_arc(model, ARCConfig(rank=8, dropout=0.5))
    randomise_adapters(model)
    model.eval()
    assert torch.equal(model(x), model(x))
    model.train()
    torch.manual_seed(0)
    first = model(x)
    torch.manual_seed(1)
    assert not torch.equal(first, model(x))
    for _, _, slot in iter_slots(model):
        slot["default"].dropout.p = 0.0
    torch.manual_seed(0)
    a = model(x)
    torch.manual_seed(1)
    assert torch.equal(a, model(x))  # no other randomness in this model: it was the adapters'


def test_blocks_select_the_last_k():
    model = build("swin")  # 4 blocks in 4 stages of different widths
    arc_peft.inject_arc(model, ARCConfig(rank=4, blocks=(-2, -1)))
    assert sorted({slot.block for _, _, slot in iter_slots(model)}) == [2, 3]
    owners = {id(s["default"].owner) for _, _, s in iter_slots(model)}
    assert len(owners) == 4  # 2 positions x 2 widths: U is shared per (position, width)
    # one site per group here (a block per stage), so each U is held by that block
    assert sorted(entry_path(e) for e in iter_shared(model)) == [
        f"layers.{stage}.blocks.0.arc_peft_shared.default.{position}-{width}"
        for stage, width in ((2, 64), (3, 128))
        for position in ("attn", "mlp")
    ]
    with pytest.raises(arc_peft.ConfigError, match=r"blocks=\(4,\) is out of range .* \[-4, 3\]"):
        arc_peft.inject_arc(build("swin"), ARCConfig(blocks=(4,)))


def test_projection_shared_per_position_and_listed_once():
    model = build("vit")
    arc_peft.inject_arc(model, ARCConfig(rank=4))
    slots = iter_slots(model)
    attn = [s["default"] for _, _, s in slots if s.position == "attn"]
    held = model.arc_peft_shared["default"]["attn-32"]  # above the blocks, on the model
    assert isinstance(held, SharedProjection) and held.anchor == "blocks.0.attn"
    assert all(a.owner is held and a.U is held.projection for a in attn)
    assert not any("projection" in dict(a.named_parameters()) for a in attn)
    names = [n for n, _ in model.named_parameters() if n.endswith(".projection")]
    assert names == [
        "arc_peft_shared.default.attn-32.projection",
        "arc_peft_shared.default.mlp-32.projection",
    ]
    assert [k for k in model.state_dict() if k.endswith(".projection")] == names


def test_shared_projection_is_held_above_every_site_it_serves():
    # Swin with two blocks per stage: each stage's U is held by the stage (the nearest module
    # above its blocks that is not a container), so a per-block FSDP unit never holds another
    # block's U. The same for a Hugging Face ViT, whose blocks sit in a ModuleList.
    swin = timm.create_model(
        "swin_tiny_patch4_window7_224", pretrained=False, img_size=56, window_size=7,
        embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 1, 1, 1),
    )  # fmt: skip
    arc_peft.inject_arc(swin, ARCConfig(rank=4))
    held = {entry_path(e): e[3].anchor for e in iter_shared(swin)}
    assert held == {
        f"layers.{i}.arc_peft_shared.default.{position}-{16 * 2**i}": (
            f"layers.{i}.blocks.0.{'attn' if position == 'attn' else 'mlp'}"
        )
        for i in range(4)
        for position in ("attn", "mlp")
    }
    for path, _, slot in iter_slots(swin):
        stage = path.split(".")[1]
        assert entry_path(_shared_of(swin, slot["default"])).startswith(f"layers.{stage}.")


def _shared_of(model: nn.Module, layer: nn.Module):
    return next(e for e in iter_shared(model) if e[3] is layer.owner)


def test_extra_arguments_pass_through_untouched():
    model = build("vit")
    arc_peft.inject_arc(model, ARCConfig(rank=4))
    randomise_adapters(model)
    attn = model.blocks[0].attn
    x = torch.randn(2, 5, 32)
    mask = torch.zeros(2, 1, 5, 5, dtype=torch.bool)
    mask[..., 0] = True
    by_position = attn(x, attn_mask=mask)
    assert torch.equal(attn(x=x, attn_mask=mask), by_position)  # input passed by keyword
    assert not torch.equal(by_position, attn(x))  # the mask reached the module
    with arc_peft.disable_adapter(model):
        assert not torch.equal(attn(x, attn_mask=mask), by_position)  # and so did the adapter


def test_mha_requires_self_attention():
    model = build("tv_vit")
    arc_peft.inject_arc(model, ARCConfig(rank=4))
    mha = model.encoder.layers[0].self_attention
    q, k = torch.randn(2, 5, 32), torch.randn(2, 5, 32)
    with pytest.raises(ValueError, match="self-attention only"):
        mha(q, k, k)
    out, _ = mha(query=q, key=q, value=q, need_weights=False)
    assert out.shape == q.shape


def test_injecting_twice_is_a_clear_error_and_changes_nothing():
    model = build("vit")
    arc_peft.inject_arc(model, ARCConfig(rank=4))
    before = state(model)
    with pytest.raises(ValueError, match="already has an adapter named 'default'"):
        arc_peft.inject_arc(model, ARCConfig(rank=4))
    assert_same_state(before, model)


@pytest.mark.parametrize(
    "bad", ["", "two words", "_private", "active", "routing", "site", "keys", "a.b", 3]
)
def test_bad_adapter_names(bad):
    model = build("vit")
    with pytest.raises(ValueError, match="adapter name"):
        arc_peft.inject_arc(model, ARCConfig(rank=4), name=bad)
    assert iter_slots(model) == []


def test_bad_arguments_leave_the_model_unchanged():
    model = build("vit")
    before = state(model)
    with pytest.raises(TypeError, match="ARCConfig or AdaptMLPConfig, got dict"):
        arc_peft.inject_arc(model, {"rank": 4})
    with pytest.raises(arc_peft.ConfigError, match="out of range"):
        arc_peft.inject_arc(model, ARCConfig(blocks=(0, 9)))
    assert_same_state(before, model)
    assert iter_slots(model) == []


class _Attn(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.to_qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, tokens):
        q, k, v = self.to_qkv(tokens).chunk(3, dim=-1)
        return self.out(torch.softmax(q @ k.transpose(-1, -2), -1) @ v)


class _FF(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.inner = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, tokens):
        return self.inner(tokens)


class _Block(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.mixer, self.ff = _Attn(dim), _FF(dim)

    def forward(self, x):
        x = x + self.mixer(self.norm1(x))
        return x + self.ff(self.norm2(x))


@pytest.fixture
def custom_targets():
    yield
    for cls in (_Attn, _FF):
        arc_peft.discovery.targets._REGISTRY.pop(cls, None)


def test_unregistered_custom_model_is_discovered(custom_targets):
    # Nobody registered _Attn or _FF, and the root is an nn.Sequential: the probe still finds
    # one attention and one MLP per block, and the slot state lives on each _Block.
    model = nn.Sequential(_Block(16), _Block(16))
    x = torch.randn(2, 3, 16)
    with pytest.raises(UnsupportedModelError, match=r"probe forward .* example_input"):
        arc_peft.inject_arc(model, ARCConfig(rank=2))  # a token input, not an image
    arc_peft.inject_arc(model, ARCConfig(rank=2), example_input=x)
    sites = [(s.site.path, s.position, s.block) for _, _, s in iter_slots(model)]
    expected = [
        ("0.mixer", "attn", 0),
        ("0.ff", "mlp", 0),
        ("1.mixer", "attn", 1),
        ("1.ff", "mlp", 1),
    ]
    assert sites == expected
    randomise_adapters(model)
    with arc_peft.disable_adapter(model):
        plain = model(x)
    assert not torch.equal(model(x), plain)


class _GatedMixer(nn.Module):
    """Token mixing without attention ops: the probe cannot know it is an attention layer."""

    def __init__(self, dim):
        super().__init__()
        self.proj = nn.Linear(dim, dim)

    def forward(self, tokens):
        return self.proj(tokens) * tokens.mean(dim=1, keepdim=True)


class _MixerNet(nn.Module):
    """A block the probe understands, then a ``_GatedMixer`` it cannot."""

    def __init__(self):
        super().__init__()
        self.block = _Block(16)
        self.mixer = _GatedMixer(16)

    def forward(self, x):
        return self.mixer(self.block(x))


def test_register_target_overrides_discovery(custom_targets):
    model, x = _MixerNet(), torch.randn(2, 3, 16)
    assert [s.path for s in arc_peft.site_plan(model, x).sites] == ["block.mixer", "block.ff"]
    arc_peft.register_target(_GatedMixer, "attn")
    try:
        with pytest.raises(ValueError, match="already registered"):
            arc_peft.register_target(_GatedMixer, "attn")
        arc_peft.inject_arc(model, ARCConfig(rank=2, positions=("attn",)), example_input=x)
        paths = [s.site.path for _, _, s in iter_slots(model)]
        assert sorted(paths) == ["block.mixer", "mixer"]
    finally:
        arc_peft.discovery.targets._REGISTRY.pop(_GatedMixer, None)


def test_register_target_reaches_a_model_probed_before(custom_targets):
    """A plan kept on the model is stale once a target is registered: the next inject_arc
    probes again (with the example input given before) and sees the new site."""

    model, x = _MixerNet(), torch.randn(2, 3, 16)
    arc_peft.inject_arc(model, ARCConfig(rank=2, positions=("attn",)), "a", example_input=x)
    assert [s.site.path for _, _, s in iter_slots(model)] == ["block.mixer"]
    arc_peft.register_target(_GatedMixer, "attn")
    try:
        arc_peft.inject_arc(model, ARCConfig(rank=2, positions=("attn",)), "b")
        sites = {(p, s.site.path) for p, _, s in iter_slots(model)}
        assert {path for _, path in sites} == {"block.mixer", "mixer"}
        # the adapters injected before stay where they were
        assert sorted(arc_peft.adapter_configs(model)) == ["a", "b"]
        assert "a" not in model.get_submodule("").arc_peft["mixer"]
    finally:
        arc_peft.discovery.targets._REGISTRY.pop(_GatedMixer, None)


def test_unsupported_torchvision_cnn():
    import torchvision

    model = torchvision.models.resnet18(weights=None)
    with pytest.raises(UnsupportedModelError, match="no self-attention found in ResNet"):
        arc_peft.inject_arc(model, ARCConfig())
    assert iter_slots(model) == []


def test_register_target_validates():
    with pytest.raises(TypeError, match=r"nn\.Module subclass"):
        arc_peft.register_target(int, "attn")
    with pytest.raises(ValueError, match="position='ffn'"):
        arc_peft.register_target(_FF, "ffn")


def test_deepcopy_keeps_sharing_and_hooks():
    model = build("vit")
    arc_peft.inject_arc(model, ARCConfig(rank=4))
    randomise_adapters(model)
    clone = copy.deepcopy(model)
    x = inputs("vit")
    assert torch.equal(clone(x), model(x))
    attn = [s["default"] for _, _, s in iter_slots(clone) if s.position == "attn"]
    assert attn[1].owner is attn[0].owner is clone.arc_peft_shared["default"]["attn-32"]
    arc_peft.remove_arc(clone)
    assert not torch.equal(clone(x), model(x))  # the copy's hooks were removed...
    assert iter_slots(model)  # ...and the original keeps its own
    with arc_peft.disable_adapter(model):
        assert torch.equal(clone(x), model(x))


def test_new_adapters_follow_the_models_mode():
    model = build("vit")  # eval mode
    arc_peft.inject_arc(model, ARCConfig(rank=4))
    assert not any(m.training for m in model.modules())
    model.train()
    arc_peft.inject_arc(model, ARCConfig(rank=4), name="second")
    assert all(m.training for m in model.modules())


def test_site_selection_by_module_path_patterns():
    model = build("vit")
    config = ARCConfig(rank=2, target_modules=("blocks.*.attn",), exclude_modules=("blocks.0.*",))
    arc_peft.inject_arc(model, config)
    assert [s.site.path for _, _, s in iter_slots(model)] == ["blocks.1.attn"]
    counts = arc_peft.count_parameters(model)
    assert counts.sites == {"attn": 1} and "sites adapted: attn 1" in str(counts)
    with pytest.raises(arc_peft.ConfigError, match="match no site"):
        arc_peft.inject_arc(build("vit"), ARCConfig(target_modules=("head*",)))
    with pytest.raises(ValueError, match="target_modules"):
        ARCConfig(target_modules=())


class _TwoAttention(nn.Module):
    """Holds an attention module that its forward never calls: the probe cannot place it."""

    def __init__(self):
        super().__init__()
        self.used, self.unused = _Block(16), _Block(16)

    def forward(self, x):
        return self.used(x)


def test_attention_left_out_is_an_error_unless_partial_is_allowed():
    model, x = _TwoAttention(), torch.randn(2, 3, 16)
    with pytest.raises(UnsupportedModelError, match=r"unused\.mixer .*not called by the probe"):
        arc_peft.inject_arc(model, ARCConfig(rank=2), example_input=x)
    assert iter_slots(model) == []
    with pytest.warns(UserWarning, match="unused.mixer"):
        arc_peft.inject_arc(model, ARCConfig(rank=2, allow_partial=True), example_input=x)
    assert [s.site.path for _, _, s in iter_slots(model)] == ["used.mixer", "used.ff"]


class _InlineMLPBlock(nn.Module):
    """Its MLP (norm included) is computed inline from the block's own parameters: no module
    takes the MLP's input, so there is nowhere to hook an adapter."""

    def __init__(self, dim):
        super().__init__()
        self.norm1, self.mixer = nn.LayerNorm(dim), _Attn(dim)
        self.w1, self.w2 = (
            nn.Parameter(torch.randn(2 * dim, dim)),
            nn.Parameter(torch.randn(dim, 2 * dim)),
        )
        self.ln = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x = x + self.mixer(self.norm1(x))
        h = nn.functional.layer_norm(x, x.shape[-1:], self.ln)
        return x + nn.functional.linear(
            nn.functional.gelu(nn.functional.linear(h, self.w1)), self.w2
        )


def test_an_mlp_nothing_can_hook_is_reported_not_skipped():
    model, x = nn.Sequential(_InlineMLPBlock(16), _InlineMLPBlock(16)), torch.randn(2, 3, 16)
    plan = arc_peft.site_plan(model, example_input=x)
    assert [(i.path, i.position, i.on_purpose) for i in plan.left_out] == [
        ("0", "mlp", False), ("1", "mlp", False),
    ]  # fmt: skip
    assert "no module takes" in plan.left_out[0].reason and "its MLP" in plan.summary()
    with pytest.raises(UnsupportedModelError, match=r"0 \(.*_InlineMLPBlock, its MLP\)"):
        arc_peft.inject_arc(model, ARCConfig(rank=2), example_input=x)
    assert iter_slots(model) == []
    # attention only (ARC_att) does not need the MLPs; allow_partial adapts the rest, loudly
    arc_peft.inject_arc(model, ARCConfig(rank=2, positions=("attn",)), example_input=x)
    with pytest.warns(UserWarning, match="its MLP"):
        arc_peft.inject_arc(model, ARCConfig(rank=2, allow_partial=True), name="b")
    assert [s.site.path for _, _, s in iter_slots(model)] == ["0.mixer", "1.mixer"]


class _AuxFF(nn.Module):
    """An MLP returning ``(output, auxiliary)``: the probe reads its output off the tuple, but
    a hook cannot add an output adapter's term to a tuple."""

    def __init__(self, dim):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)

    def forward(self, tokens):
        hidden = nn.functional.gelu(self.fc1(tokens))
        return self.fc2(hidden), hidden.mean()


class _AuxBlock(_Block):
    def __init__(self, dim):
        super().__init__(dim)
        self.ff = _AuxFF(dim)

    def forward(self, x):
        x = x + self.mixer(self.norm1(x))
        return x + self.ff(self.norm2(x))[0]


def _adapter_calls(model: nn.Module, x: torch.Tensor) -> tuple[int, int]:
    """(adapter layers injected, how many a forward with non-zero adapters runs)."""
    layers = [m for m in model.modules() if isinstance(m, Adapter)]
    layers = [m for m in layers if not isinstance(m, SharedState)]  # ARC's shared U never runs
    ran: set[int] = set()
    hooks = [m.register_forward_hook(lambda m, a, o: ran.add(id(m))) for m in layers]
    randomise_adapters(model)
    with torch.no_grad():
        model(x)
    for hook in hooks:
        hook.remove()
    return len(layers), len(ran)


def test_a_site_whose_adapter_the_forward_never_runs_is_reported_not_injected():
    make = lambda: nn.Sequential(_Block(16), _AuxBlock(16))  # noqa: E731
    x = torch.randn(2, 3, 16)
    plan = arc_peft.site_plan(make(), example_input=x)
    # the input end runs: a site for ARC; the output end never adds anything: not for AdaptMLP
    assert [s.path for s in plan.sites] == ["0.mixer", "0.ff", "1.mixer", "1.ff"]
    assert [s.path for s in plan.sites if s.position == "mlp" and s.no_output] == ["1.ff"]
    assert not plan.left_out and "where no adapter adding to the output runs: 1" in plan.summary()
    model = make()
    with pytest.raises(UnsupportedModelError, match=r"1\.ff \(.*_AuxFF, its MLP, adapters adding"):
        arc_peft.inject_arc(model, AdaptMLPConfig(bottleneck=4), example_input=x)
    assert iter_slots(model) == []
    with pytest.warns(UserWarning, match="never reaches the hook at 1.ff"):
        config = AdaptMLPConfig(bottleneck=4, allow_partial=True)
        arc_peft.inject_arc(model, config, example_input=x)
    assert [s.site.path for _, _, s in iter_slots(model)] == ["0.ff"]
    assert _adapter_calls(model, x) == (1, 1)  # no adapter that never runs
    model = make()
    arc_peft.inject_arc(model, ARCConfig(rank=2), example_input=x)  # no warning: ARC runs there
    assert _adapter_calls(model, x) == (4, 4)


def test_attention_pooling_is_left_out_on_purpose():
    model = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, num_classes=3, global_pool="map", **_TINY
    ).eval()
    plan = arc_peft.site_plan(model)
    pooled = [item for item in plan.left_out if item.path == "attn_pool"]
    assert pooled and pooled[0].on_purpose and "pooling" in pooled[0].reason
    arc_peft.inject_arc(model, ARCConfig(rank=2))  # no error: left out on purpose
    paths = [s.site.path for _, _, s in iter_slots(model)]
    assert paths == ["blocks.0.attn", "blocks.0.mlp", "blocks.1.attn", "blocks.1.mlp"]


def test_a_pattern_matching_nothing_says_how_many_sites_exist():
    model = build("vit")
    n = len(arc_peft.site_plan(model).sites)
    with pytest.raises(arc_peft.ConfigError, match="match no site") as info:
        arc_peft.inject_arc(model, ARCConfig(target_modules=("head*",)))
    assert f"the {n} sites are" in str(info.value)
    if n > 8:
        assert f"and {n - 8} more" in str(info.value)


@pytest.mark.parametrize(
    "config, field",
    [(ARCConfig(rank=10_000), "rank"), (AdaptMLPConfig(bottleneck=10_000), "bottleneck")],
)
def test_a_size_not_below_the_width_is_refused_naming_it(config, field):
    model = build("vit")
    width = max(s.width for s in arc_peft.site_plan(model).sites)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(
        arc_peft.ConfigError, match=rf"{field}=10000 is not below the site's width"
    ) as info:
        arc_peft.inject_arc(model, config)
    assert f"Use {field} < " in str(info.value)
    assert not arc_peft.adapter_configs(model)
    assert model.state_dict().keys() == before.keys()
    # At the width itself too: a "bottleneck" as wide as the tokens is none.
    with pytest.raises(arc_peft.ConfigError, match="not below the site's width"):
        arc_peft.inject_arc(model, type(config)(**{field: width}))
