"""Sequence-first transformers (``nn.TransformerEncoderLayer`` with its default
``batch_first=False``: tokens ``L, N, D``): sites are found, adapted, and a mixed-task batch
routes each sample along the axis that holds the samples, not the token axis."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import arc_peft
from arc_peft.runtime.slots import iter_slots

from models import check_mixed_batch, randomise_adapters


class SeqFirstViT(nn.Module):
    """A ViT whose encoder runs sequence-first, as torch's own ``nn.TransformerEncoder`` does
    by default (and open_clip's ``Transformer(batch_first=False)``)."""

    def __init__(self, dim: int = 16, depth: int = 2, classes: int = 5) -> None:
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, 8, 8)
        layer = nn.TransformerEncoderLayer(dim, 2, 32, dropout=0.0, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch_embed(x).flatten(2).permute(2, 0, 1)  # L, N, D
        return self.head(self.encoder(tokens).mean(0))


def _model() -> nn.Module:
    torch.manual_seed(0)
    return SeqFirstViT().eval()


def _x(batch: int) -> torch.Tensor:
    # 4 tokens: the token axis (L=4) is a multiple of a batch of 2, so routing along it would
    # pass the size check and mix samples up silently
    return torch.randn(batch, 3, 16, 16, generator=torch.Generator().manual_seed(0))


def test_sites_know_the_samples_are_on_axis_1():
    model = _model()
    plan = arc_peft.site_plan(model, example_input=_x(1))
    assert [s.position for s in plan.sites] == ["attn", "mlp", "attn", "mlp"]
    assert {s.batch_axis for s in plan.sites if s.position == "attn"} == {1}
    # the MLP of nn.TransformerEncoderLayer is inline (linear1, activation, linear2): its site
    # is the first linear, which also reads L, N, D
    assert all(s.batch_axis == 1 for s in plan.sites), plan.sites


def test_batch_axis_from_a_probe_of_several_samples():
    plan = arc_peft.site_plan(_model(), example_input=_x(3), refresh=True)
    assert all(s.batch_axis == 1 for s in plan.sites)


@torch.no_grad()
@pytest.mark.parametrize("batch", [2, 4])
def test_mixed_batch_equals_each_sample_alone(batch: int):
    model = _model()
    arc_peft.inject_arc(model, arc_peft.ARCConfig(rank=2), name="a", example_input=_x(1))
    arc_peft.inject_arc(model, arc_peft.AdaptMLPConfig(bottleneck=2), name="b")
    randomise_adapters(model, 1)
    tasks = (["a", "b", None, "a"] * 2)[:batch]
    x = _x(batch)
    check_mixed_batch(model, tasks, x, differs_by=1e-4)
    assert all(slot.routing is None for _, _, slot in iter_slots(model))
