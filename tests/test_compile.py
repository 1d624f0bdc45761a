"""Adapted models run under ``torch.compile(fullgraph=True)`` and compute what eager mode computes.

``aot_eager`` traces the whole graph (hooks, shared U, forward and backward) through dynamo and
AOTAutograd without inductor's code generation, which keeps these tests fast on a CPU; the
inductor checks compile real kernels.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

import arc_peft
from arc_peft.methods.arc.layers import ARC as ARCLayer

from models import build, inputs, randomise_adapters

ARC = arc_peft.ARCConfig(rank=4, dropout=0.0)
ADAPTMLP = arc_peft.AdaptMLPConfig(bottleneck=4, dropout=0.0)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _adapted(config: arc_peft.AdapterConfig) -> torch.nn.Module:
    model = build("vit")
    arc_peft.inject_arc(model, config)
    # Non-zero adapter weights: at its initialisation AdaptMLP adds exactly zero.
    randomise_adapters(model, 3)
    return model.eval()


def _check_forward(config: arc_peft.AdapterConfig, backend: str) -> None:
    model = _adapted(config)
    x = inputs("vit", batch=3)
    with torch.no_grad():
        expected = model(x)
        with arc_peft.disable_adapter(model):
            bare = model(x)
        compiled = torch.compile(model, backend=backend, fullgraph=True)
        got = compiled(x)
    assert not torch.allclose(expected, bare)  # the adapter does change the output
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("config", [ARC, ADAPTMLP], ids=["arc", "adaptmlp"])
def test_forward_matches_eager_aot_eager(config):
    _check_forward(config, "aot_eager")


@pytest.mark.parametrize("config", [ARC, ADAPTMLP], ids=["arc", "adaptmlp"])
def test_backward_matches_eager_aot_eager(config):
    model = _adapted(config)
    arc_peft.freeze_backbone(model)
    compiled_model = copy.deepcopy(model)
    compiled = torch.compile(compiled_model, backend="aot_eager", fullgraph=True)
    x, y = inputs("vit", batch=3), torch.tensor([0, 1, 2])
    torch.nn.functional.cross_entropy(model(x), y).backward()
    torch.nn.functional.cross_entropy(compiled(x), y).backward()
    expected = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    got = {n: p.grad for n, p in compiled_model.named_parameters() if p.requires_grad}
    assert set(got) == set(expected)
    assert any(n.startswith("blocks.0.arc_peft") for n in got)  # adapter weights get gradients
    for name, grad in expected.items():
        torch.testing.assert_close(got[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_switching_adapters_under_compile():
    """Changing the active adapter after compiling must not reuse the stale graph's result."""
    model = _adapted(ARC)
    arc_peft.inject_arc(model, ARC, name="other")
    with torch.no_grad():
        for name, param in arc_peft.adapter_parameters(model, "other").items():
            param.copy_(torch.full_like(param, 0.05) if "scale" in name else param + 0.1)
    x = inputs("vit", batch=2)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        first = compiled(x)
        arc_peft.set_active_adapter(model, "other")
        second = compiled(x)
        expected = model(x)
    assert not torch.allclose(first, second)
    torch.testing.assert_close(second, expected, rtol=1e-5, atol=1e-5)


def test_adaptmlp_forward_matches_eager_inductor():
    _check_forward(ADAPTMLP, "inductor")


@pytest.mark.slow
def test_arc_forward_matches_eager_inductor():
    _check_forward(ARC, "inductor")


# -- compiled training folds the pre-norm into ARC (Site.norm, Adapter.after_norm) --------------


def _saved(config: arc_peft.AdapterConfig | None, lean: bool = True, dtype: str = "fp32") -> int:
    from benchmarks.measure import compiled_saved_bytes

    model = build("vit")
    if config is not None:
        arc_peft.inject_arc(model, config)
    arc_peft.freeze_backbone(model)
    return compiled_saved_bytes(
        model, inputs("vit", batch=4), dtype, grads_to_input=True, lean=lean
    )


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_compiled_arc_keeps_no_token_sized_tensor_per_site(dtype):
    """The compiled graph saves, per ARC site, the ``N×r`` bottleneck and the ``D×r`` folded
    projection only (no dropout here: no mask); through the site it saves ``N×D`` more per site
    (the norm's output, or its cast). Both bounds are closed-form, from the model's shapes."""
    config = arc_peft.ARCConfig(rank=4, dropout=0.0)
    model = build("vit")
    sites = len(arc_peft.site_plan(model).sites)
    with torch.no_grad():
        tokens = math.prod(model.forward_features(inputs("vit", batch=4)).shape[:2])
    dim = model.embed_dim
    low = 2 if dtype == "bf16" else 4
    floor = _saved(None, dtype=dtype)
    folded = _saved(config, dtype=dtype)
    at_site = _saved(config, lean=False, dtype=dtype)
    per_site_kept = tokens * 4 * low + dim * 4 * 4 + dim * 4  # bottleneck, D×r, norm weight cast
    assert folded - floor <= sites * per_site_kept
    assert at_site - folded >= sites * tokens * dim * low


def test_site_norm_found_only_where_the_norm_output_is_the_site_input_alone():
    vit = arc_peft.site_plan(build("vit")).sites
    assert [s.norm.path for s in vit[:2]] == ["blocks.0.norm1", "blocks.0.norm2"]
    assert vit[0].norm.weight == "weight" and vit[0].norm.eps == 1e-6

    # One norm feeding attention and MLP at once (ViT-22B's parallel block): folding it into
    # one site's adapter would adapt the other's input too, so neither site gets it.
    class Parallel(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = torch.nn.LayerNorm(32)
            self.attn = torch.nn.MultiheadAttention(32, 2, batch_first=True)
            self.mlp = torch.nn.Sequential(
                torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 32)
            )

        def forward(self, x):
            y = self.norm(x)
            return x + self.attn(y, y, y, need_weights=False)[0] + self.mlp(y)

    plan = arc_peft.site_plan(Parallel(), example_input=torch.randn(2, 5, 32))
    assert [s.position for s in plan.sites][:1] == ["attn"]
    assert all(s.norm is None for s in plan.sites)


def test_a_written_out_norm_over_another_axis_is_not_taken_for_an_rms_norm():
    """The RMS pattern is matched by its data flow, axis and exponent included: a "norm" that
    averages over the tokens (or squares nothing) is left alone, so it is never folded."""

    class TokenNorm(torch.nn.Module):
        def __init__(self, axis: int, power: int):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(32))
            self.axis, self.power = axis, power

        def forward(self, x):
            r = torch.rsqrt(x.pow(self.power).mean(self.axis, keepdim=True) + 1e-6)
            return x * r * self.weight

    class Block(torch.nn.Module):
        def __init__(self, axis: int, power: int):
            super().__init__()
            self.norm = TokenNorm(axis, power)
            self.attn = torch.nn.MultiheadAttention(32, 2, batch_first=True)

        def forward(self, x):
            y = self.norm(x)
            return x + self.attn(y, y, y, need_weights=False)[0]

    x = torch.randn(2, 5, 32)
    found = {
        (axis, power): arc_peft.site_plan(Block(axis, power), example_input=x).sites[0].norm
        for axis, power in ((-1, 2), (1, 2), (-1, 4))
    }
    assert found[-1, 2] is not None and found[-1, 2].kind == "rms_norm"
    assert found[-1, 2].eps == 1e-6 and found[-1, 2].weight == "weight"
    assert found[1, 2] is None and found[-1, 4] is None


@pytest.mark.parametrize("kind", ["layer_norm", "rms_norm"])
def test_after_norm_is_forward_on_the_norm_output(kind):
    """A LayerNorm hands over ``x̂``; an RMS norm ``x`` and its ``rsqrt`` ``r`` (``x̂ = x·r``)."""
    torch.manual_seed(0)
    rms = kind == "rms_norm"
    norm_class = torch.nn.RMSNorm if rms else torch.nn.LayerNorm
    norm = norm_class(8, eps=1e-6, dtype=torch.float64)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        if not rms:
            norm.bias.uniform_(-1, 1)
    arc = ARCLayer(8, rank=3, dropout=0.0, dtype=torch.float64)
    with torch.no_grad():
        arc.scale.uniform_(-1, 1)
        arc.bias.uniform_(-1, 1)
    x = torch.randn(2, 5, 8, dtype=torch.float64, requires_grad=True)

    def via_site(x):
        return arc(norm(x))

    def via_norm(x):
        if rms:
            r = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps)
            return arc.after_norm(x, norm.weight, None, norm(x), r)
        x_hat = torch.nn.functional.layer_norm(x, (8,), None, None, norm.eps)
        return arc.after_norm(x_hat, norm.weight, norm.bias, norm(x))

    torch.testing.assert_close(via_norm(x), via_site(x))
    params = (x, arc.projection, arc.scale, arc.bias)
    grads = [torch.autograd.grad(f(x).square().sum(), params) for f in (via_site, via_norm)]
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b)
    assert torch.autograd.gradcheck(via_norm, (x,))


def _aimv2_timm() -> torch.nn.Module:
    import timm

    kw = {"embed_dim": 32, "depth": 2, "num_heads": 2, "img_size": 28, "num_classes": 5}
    return timm.create_model("aimv2_large_patch14_224", pretrained=False, **kw)


def _vit_torch_rms_norm() -> torch.nn.Module:
    import timm

    kw = {"embed_dim": 32, "depth": 2, "num_heads": 2, "img_size": 32, "num_classes": 5}
    return timm.create_model("vit_tiny_patch16_224", norm_layer=torch.nn.RMSNorm, **kw)


def _aimv2_hf() -> torch.nn.Module:
    transformers = pytest.importorskip("transformers")
    config = transformers.Aimv2VisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=28,
        patch_size=14,
    )
    return transformers.Aimv2VisionModel(config)


@pytest.mark.parametrize(
    ("make", "size"), [(_aimv2_timm, 28), (_vit_torch_rms_norm, 32), (_aimv2_hf, 28)],
    ids=["timm_rms_written_out", "torch_rms_norm_op", "hf_rms_weight_first"],
)  # fmt: skip
def test_compiled_training_folds_rms_pre_norms(make, size):
    """RMS norms as timm and Hugging Face write them out, and ``F.rms_norm``: every site's
    pre-norm is found, folded in the compiled step (counted), and the gradients are eager's."""
    torch.manual_seed(0)
    model = make()
    x = torch.randn(2, 3, size, size)
    arc_peft.inject_arc(model, ARC, example_input=x)
    randomise_adapters(model, 3)
    arc_peft.freeze_backbone(model, train_head=False)
    model.eval()  # Hugging Face models drop paths in training mode; dropout is 0 here anyway
    norms = [s.norm for s in arc_peft.site_plan(model).sites]
    assert len(norms) == 4 and all(n is not None and n.kind == "rms_norm" for n in norms)
    _check_compiled_training(model, x, folded=4, fullgraph=False)  # HF code breaks fullgraph


@pytest.mark.parametrize("name", ["vit", "tv_vit", "swin", "eva02_swiglu", "coat"])
def test_compiled_training_matches_eager_across_the_zoo(name):
    """aot_eager, fullgraph: the compiled step (ARC folded at the pre-norm where the site has
    one) gives eager's gradients; the fold really runs (counted)."""
    model = build(name)
    arc_peft.inject_arc(model, ARC)
    randomise_adapters(model, 3)
    arc_peft.freeze_backbone(model)
    folded = sum(s.norm is not None for s in arc_peft.site_plan(model).sites)
    assert folded > 0
    _check_compiled_training(model, inputs(name, batch=2), folded, fullgraph=True)


def _check_compiled_training(
    model: torch.nn.Module, x: torch.Tensor, folded: int, fullgraph: bool
) -> None:
    """One step of ``model`` and of a compiled copy (aot_eager) give the same gradients, the
    compiled one through ``folded`` calls of ``ARC.after_norm``."""
    compiled_model = copy.deepcopy(model)
    calls = []
    original = ARCLayer.after_norm

    def counted(self, *args):
        calls.append(self)
        return original(self, *args)

    def loss(m: torch.nn.Module) -> torch.Tensor:
        y = m(x)
        return (y if isinstance(y, torch.Tensor) else y.last_hidden_state).square().mean()

    loss(model).backward()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ARCLayer, "after_norm", counted)
        loss(torch.compile(compiled_model, backend="aot_eager", fullgraph=fullgraph)).backward()
    assert len(calls) == folded
    expected = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    got = {n: p.grad for n, p in compiled_model.named_parameters() if p.requires_grad}
    assert expected and set(got) == set(expected)
    for key, grad in expected.items():
        torch.testing.assert_close(got[key], grad, rtol=1e-4, atol=1e-6, msg=key)


def test_a_compiled_forward_stopped_between_norm_and_site_leaves_no_adapter_skipped():
    """A compiled training forward that raises after the pre-norm's fold ran but before its site
    (here a user's hook on the norm) must not make a later forward skip that site's adapter."""
    model = build("vit")
    arc_peft.inject_arc(model, ARC)
    randomise_adapters(model, 3)
    arc_peft.freeze_backbone(model)
    x = inputs("vit", batch=2)
    expected = model(x).detach()
    raising = [True]

    def user_hook(module, args, output):
        if raising[0]:
            raise RuntimeError("stopped by the user's hook")

    model.blocks[0].norm1.register_forward_hook(user_hook)
    with pytest.raises(RuntimeError, match="user's hook"):
        torch.compile(model, backend="aot_eager")(x)
    raising[0] = False
    assert torch.equal(model(x).detach(), expected)  # eager
    with torch.no_grad():  # compiled, no fold (no autograd)
        got = torch.compile(model, backend="aot_eager")(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
