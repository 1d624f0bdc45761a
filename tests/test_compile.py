"""Adapted models run under ``torch.compile(fullgraph=True)`` and compute what eager mode computes.

``aot_eager`` traces the whole graph (hooks, shared U, forward and backward) through dynamo and
AOTAutograd without inductor's code generation, which keeps these tests fast on a CPU; the
inductor checks compile real kernels.
"""

from __future__ import annotations

import copy

import pytest
import torch

import arc_peft

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
