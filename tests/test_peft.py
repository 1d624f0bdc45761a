"""arc_peft beside peft: injecting after peft is refused naming peft; the other order works
end to end (ARC trains next to LoRA, saves alone, merge refuses naming the LoRA layer)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

import arc_peft
from arc_peft import ARCConfig, MergeError, UnsupportedModelError

from models import build, inputs, randomise_adapters

peft = pytest.importorskip("peft")


def test_injecting_into_a_peft_model_is_refused_naming_peft():
    model = peft.get_peft_model(
        build("vit"), peft.LoraConfig(r=4, target_modules=["qkv"], modules_to_save=["head"])
    )
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UnsupportedModelError, match=r"already has peft Linear at .*qkv.*Inject"):
        arc_peft.inject_arc(model, ARCConfig(rank=4))
    assert model.state_dict().keys() == before.keys()


def test_arc_then_peft_trains_saves_and_refuses_to_merge(tmp_path: Path):
    model = build("vit")
    arc_peft.inject_arc(model, ARCConfig(rank=4))
    randomise_adapters(model)
    arc_peft.freeze_backbone(model)
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["qkv"]))
    ours = arc_peft.adapter_parameters(wrapped)
    for param in ours.values():  # get_peft_model froze them: the documented line
        param.requires_grad_(True)
    x = inputs("vit")
    F.cross_entropy(wrapped(x), torch.tensor([0, 1])).backward()
    assert all(p.grad is not None for p in ours.values())
    lora = [p for n, p in wrapped.named_parameters() if "lora_" in n]
    assert lora and all(p.grad is not None for p in lora)
    # save_adapter stores arc_peft's adapters only (peft saves its own), for the real backbone.
    path = tmp_path / "arc.safetensors"
    arc_peft.save_adapter(wrapped, path)
    info = arc_peft.read_adapter_info(path)
    assert info.backbone["architecture"].endswith("VisionTransformer")
    assert set(info.backbone["widths"]["attn"]) == {32}  # the model's width, not LoRA's rank
    with safe_open(str(path), "pt") as stored:  # arc_peft's tensors only: none of LoRA's
        keys = set(stored.keys())
    assert keys and not any("lora" in k for k in keys)
    plain = build("vit")
    arc_peft.load_adapter(plain, path)
    got = {k: v for k, v in arc_peft.adapter_parameters(plain).items()}
    assert len(got) == len(ours)
    for (_, a), (_, b) in zip(sorted(got.items()), sorted(ours.items()), strict=True):
        assert torch.equal(a, b)
    with pytest.raises(MergeError, match=r"peft Linear at .*qkv.*merge_and_unload"):
        arc_peft.merge_adapter(wrapped)


def test_freeze_backbone_after_peft_keeps_both_and_a_modules_to_save_head_loads_plain(
    tmp_path: Path,
):
    model = build("vit")
    arc_peft.inject_arc(model, ARCConfig(rank=4))
    randomise_adapters(model)
    wrapped = peft.get_peft_model(
        model, peft.LoraConfig(r=4, target_modules=["qkv"], modules_to_save=["head"])
    )
    arc_peft.freeze_backbone(wrapped)  # ARC trainable again, peft's own state left as it was
    ours = arc_peft.adapter_parameters(wrapped)
    assert ours and all(p.requires_grad for p in ours.values())
    trainable = {n for n, p in wrapped.named_parameters() if p.requires_grad}
    assert any("lora_A" in n for n in trainable) and any("lora_B" in n for n in trainable)
    assert any("head.modules_to_save" in n for n in trainable)
    assert not any("base_layer" in n or "original_module" in n for n in trainable)
    head = wrapped.base_model.model.head.modules_to_save["default"]
    with torch.no_grad():
        head.weight.add_(1.0)  # the trained copy differs from the original head
    path = tmp_path / "arc.safetensors"
    arc_peft.save_adapter(wrapped, path)
    plain = build("vit")
    arc_peft.load_adapter(plain, path)  # the head under plain keys: the copy peft trained
    assert torch.equal(plain.head.weight, head.weight)
    assert not torch.equal(plain.head.weight, wrapped.base_model.model.head.original_module.weight)
    # ...and back into a peft model whose head is in modules_to_save: into the copy that trains.
    again = build("vit")
    arc_peft.inject_arc(again, ARCConfig(rank=4))
    again = peft.get_peft_model(
        again, peft.LoraConfig(r=4, target_modules=["qkv"], modules_to_save=["head"])
    )
    arc_peft.load_adapter(again, path)
    assert torch.equal(again.base_model.model.head.modules_to_save["default"].weight, head.weight)
    for key, value in arc_peft.adapter_parameters(again).items():
        assert torch.equal(value, ours[key])
