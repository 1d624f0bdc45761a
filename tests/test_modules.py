"""The standalone adapter layers against hand-written references of the papers' equations."""

import math

import pytest
import torch

from arc_peft import ARC, AdaptMLP
from arc_peft.methods.arc.layers import SharedProjection


def _randomise(module: torch.nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g))


def test_arc_matches_the_equation():
    torch.manual_seed(0)
    arc = ARC(12, 5, dropout=0.1).eval()
    _randomise(arc)
    x = torch.randn(3, 7, 12)
    U, s, b = arc.projection, arc.scale, arc.bias
    # ARC(x) = x + (x U diag(s)) Uᵀ + b, written term by term.
    expected = x + torch.einsum("btr,dr->btd", torch.einsum("btd,dr->btr", x, U) * s, U) + b
    torch.testing.assert_close(arc(x), expected, rtol=1e-5, atol=1e-5)
    M, bias = arc.merged_matrix()
    torch.testing.assert_close(M, torch.eye(12) + U @ torch.diag(s) @ U.T)
    torch.testing.assert_close(M, M.T)  # symmetric: the up-projection is Uᵀ
    torch.testing.assert_close(x @ M + bias, expected, rtol=1e-5, atol=1e-5)


def test_arc_shares_u_with_its_owner_and_lists_it_once():
    owner = ARC(8, 3)
    other = ARC(8, 3, share_with=owner)
    assert other.U is owner.projection
    assert "projection" not in dict(other.named_parameters())
    container = torch.nn.ModuleList([owner, other])
    names = [n for n, _ in container.named_parameters()]
    assert names.count("0.projection") == 1 and not any("1.projection" in n for n in names)
    # Gradients from both layers accumulate into the one shared U.
    x = torch.randn(4, 8)
    with torch.no_grad():
        owner.scale.fill_(1.0)
        other.scale.fill_(1.0)
    other.eval()(owner.eval()(x)).sum().backward()
    assert owner.projection.grad is not None and owner.projection.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="share U"):
        ARC(8, 4, share_with=owner)
    with pytest.raises(ValueError, match="share U"):
        ARC(8, 3, share_with=other)  # only an owner can be shared


def test_arc_layers_read_a_shared_projection_held_apart():
    held = SharedProjection(8, 3, anchor="blocks.0.attn")
    layers = torch.nn.ModuleList([ARC(8, 3, share_with=held) for _ in range(2)])
    assert all(layer.U is held.projection for layer in layers)
    assert not any("projection" in n for n, _ in layers.named_parameters())
    with torch.no_grad():
        for layer in layers:
            layer.scale.fill_(1.0)
    x = torch.randn(4, 8)
    layers[1].eval()(layers[0].eval()(x)).sum().backward()
    assert held.projection.grad is not None and held.projection.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="share U"):
        ARC(8, 4, share_with=held)
    with pytest.raises(RuntimeError, match="holds ARC's U"):
        held(x)


def test_arc_initialisation():
    torch.manual_seed(0)
    zero = ARC(768, 50, scale_init="zeros")
    assert torch.count_nonzero(zero.scale) == 0 and torch.count_nonzero(zero.bias) == 0
    x = torch.randn(2, 4, 768)
    assert torch.equal(zero.eval()(x), x + zero.bias)  # exact identity (b = 0)
    xavier = ARC(768, 50, scale_init="xavier")
    bound = math.sqrt(6 / 51)  # xavier-uniform on a (1, r) tensor, about 0.343 at r = 50
    assert xavier.scale.abs().max() <= bound and xavier.scale.abs().max() > 0.5 * bound
    u_bound = math.sqrt(6 / (768 + 50))
    assert xavier.projection.abs().max() <= u_bound
    with pytest.raises(ValueError, match="scale_init='ones'"):
        ARC(8, 2, scale_init="ones")


@pytest.mark.parametrize("layernorm", [None, "in", "out"])
@pytest.mark.parametrize("scale", [0.1, "learnable"])
def test_adaptmlp_matches_the_equation(layernorm, scale):
    torch.manual_seed(0)
    layer = AdaptMLP(10, 4, scale=scale, dropout=0.1, layernorm=layernorm).eval()
    _randomise(layer, seed=1)
    x = torch.randn(2, 6, 10)
    s = layer.scale if scale == "learnable" else 0.1
    h = layer.norm(x) if layernorm == "in" else x
    h = torch.relu(h @ layer.down.weight.T + layer.down.bias) @ layer.up.weight.T + layer.up.bias
    # the official order: scale, then the output LayerNorm (LN(s·h), not s·LN(h))
    out = layer.norm(s * h) if layernorm == "out" else s * h
    torch.testing.assert_close(layer(x), out)


def test_adaptmlp_lora_init_gives_zero_output_and_counts():
    torch.manual_seed(0)
    layer = AdaptMLP(768, 64)
    assert torch.count_nonzero(layer.up.weight) == 0
    assert torch.count_nonzero(layer.up.bias) == 0 and torch.count_nonzero(layer.down.bias) == 0
    bound = 1 / math.sqrt(768)  # kaiming_uniform(a=√5) on a fan-in of 768
    assert 0.9 * bound < layer.down.weight.abs().max() <= bound
    assert torch.count_nonzero(layer(torch.randn(3, 768))) == 0
    assert sum(p.numel() for p in layer.parameters()) == 2 * 768 * 64 + 64 + 768
    assert sum(p.numel() for p in AdaptMLP(768, 64, scale="learnable").parameters()) == (
        2 * 768 * 64 + 64 + 768 + 1
    )


def test_dropout_acts_on_the_bottleneck_in_training_only():
    torch.manual_seed(0)
    arc = ARC(16, 8, dropout=0.5)
    _randomise(arc)
    x = torch.randn(64, 16)
    arc.train()
    a, b = arc(x), arc(x)
    assert not torch.equal(a, b)
    # With p = 0.5 some bottleneck units are dropped: per row, ARC(x) - x - b lies in the span of
    # the kept columns of U. Dropping everything would give x + b exactly.
    torch.manual_seed(1)
    h = torch.nn.functional.dropout(x @ (arc.projection * arc.scale), 0.5, training=True)
    torch.manual_seed(1)
    torch.testing.assert_close(arc(x), x + h @ arc.projection.T + arc.bias)
    arc.eval()
    assert torch.equal(arc(x), arc(x))

    mlp = AdaptMLP(16, 8, dropout=0.5)
    _randomise(mlp)
    mlp.train()
    assert not torch.equal(mlp(x), mlp(x))
    mlp.eval()
    assert torch.equal(mlp(x), mlp(x))


def test_bad_module_arguments():
    with pytest.raises(ValueError, match="placement='side'"):
        AdaptMLP(8, 2, placement="side")
    with pytest.raises(ValueError, match="layernorm='pre'"):
        AdaptMLP(8, 2, layernorm="pre")
