"""freeze_backbone and count_parameters beyond the matrix invariants in test_inject.py."""

import pytest
import torch

import arc_peft
from arc_peft import ARCConfig

from models import build


def trainable(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_freeze_without_head_and_with_extra_modules():
    model = build("vit")
    arc_peft.inject_arc(model, ARCConfig(rank=4))
    arc_peft.freeze_backbone(model, train_head=False)
    assert trainable(model) == set(arc_peft.adapter_parameters(model))
    arc_peft.freeze_backbone(model, also=("norm", model.blocks[1].norm1))
    expected = set(arc_peft.adapter_parameters(model)) | {
        "head.weight",
        "head.bias",
        "norm.weight",
        "norm.bias",
        "blocks.1.norm1.weight",
        "blocks.1.norm1.bias",
    }
    assert trainable(model) == expected


def test_freeze_plain_model_is_a_linear_probe():
    model = build("tv_swin")
    arc_peft.freeze_backbone(model)
    assert trainable(model) == {"head.weight", "head.bias"}


def test_every_adapter_trains_and_active_only_on_request():
    model = build("vit")
    arc_peft.inject_arc(model, ARCConfig(rank=4), name="a")
    arc_peft.inject_arc(model, ARCConfig(rank=4), name="b")
    arc_peft.freeze_backbone(model, train_head=False)
    assert trainable(model) == set(arc_peft.adapter_parameters(model))
    arc_peft.freeze_backbone(model, train_head=False, adapters="active")
    assert trainable(model) == set(arc_peft.adapter_parameters(model, "a"))
    arc_peft.set_active_adapter(model, "b")
    arc_peft.freeze_backbone(model, train_head=False, adapters="active")
    assert trainable(model) == set(arc_peft.adapter_parameters(model, "b"))
    with pytest.raises(ValueError, match=r"adapters='some'.*expected 'all'"):
        arc_peft.freeze_backbone(model, adapters="some")


def test_freeze_errors_name_the_problem():
    model = build("vit")
    with pytest.raises(ValueError, match=r"'blocks\.7' is not a submodule"):
        arc_peft.freeze_backbone(model, also=("blocks.7",))
    headless = torch.nn.Sequential(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="train_head=False"):
        arc_peft.freeze_backbone(headless)
    assert all(p.requires_grad for p in model.parameters())  # nothing was frozen on error


def test_count_summary_line():
    model = build("vit")
    arc_peft.inject_arc(model, ARCConfig(rank=4))
    arc_peft.freeze_backbone(model)
    counts = arc_peft.count_parameters(model)
    assert counts.trainable == counts.adapter + counts.head
    assert counts.head == 32 * 5 + 5
    text = str(counts)
    pct = 100 * counts.trainable / counts.total
    assert text.startswith(f"trainable {counts.trainable} of {counts.total / 1e3:.3g}K")
    assert text.endswith("| sites adapted: attn 2, mlp 2")
    assert f"({pct:.2f}%)" in text and f"adapters {counts.adapter:,}" in text
    assert counts.breakdown["blocks.0.arc_peft.attn.default"] == 4 + 32  # s and b
    assert counts.breakdown["arc_peft_shared.default.attn-32"] == 32 * 4  # the shared U, once
    assert counts.breakdown["blocks.1.arc_peft.attn.default"] == 4 + 32
