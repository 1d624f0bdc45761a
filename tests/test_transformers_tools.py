"""Inside the tools users train with: transformers save_pretrained / from_pretrained and Trainer
checkpoint + resume keep every adapter tensor; reentrant activation checkpointing still trains
the adapters (transformers and timm)."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest
import timm
import torch

import arc_peft
from arc_peft import ARCConfig
from arc_peft.runtime.pretrained import AdaptersNotRestoredWarning

from models import randomise_adapters

transformers = pytest.importorskip("transformers")


def config():
    return transformers.ViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        image_size=32, patch_size=8, num_labels=3,
    )  # fmt: skip


def adapted(seed: int = 0):
    torch.manual_seed(seed)
    model = transformers.ViTForImageClassification(config())
    arc_peft.inject_arc(model, ARCConfig(rank=4))
    return model


def test_save_pretrained_keeps_the_adapters_and_says_how_to_load_them(tmp_path: Path):
    model = adapted().eval()
    randomise_adapters(model, 2)
    with pytest.warns(AdaptersNotRestoredWarning, match="arc_peft.load_adapter"):
        model.save_pretrained(tmp_path)
    assert (tmp_path / "adapter.safetensors").is_file()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        back = transformers.ViTForImageClassification.from_pretrained(tmp_path).eval()
    arc_peft.load_adapter(back, tmp_path)  # the folder: its adapter.safetensors
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(back(x).logits, model(x).logits)
    # A merged model is a plain model: nothing extra, no warning.
    arc_peft.merge_adapter(model)
    assert "save_pretrained" not in model.__dict__
    with warnings.catch_warnings():
        warnings.simplefilter("error", AdaptersNotRestoredWarning)
        model.save_pretrained(tmp_path / "merged")
    assert not (tmp_path / "merged" / "adapter.safetensors").exists()


def _adapter_grads(model) -> list:
    return [p.grad for p in arc_peft.adapter_parameters(model).values()]


def test_reentrant_checkpointing_trains_the_adapters_transformers():
    model = adapted()
    arc_peft.freeze_backbone(model)
    model.train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    model(torch.randn(2, 3, 32, 32)).logits.sum().backward()
    assert all(g is not None for g in _adapter_grads(model))
    assert all(p.grad is not None for p in model.classifier.parameters())


def test_reentrant_checkpointing_trains_the_adapters_timm():
    model = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, num_classes=3, img_size=32, patch_size=8, depth=2
    )
    arc_peft.inject_arc(model, ARCConfig(rank=4))
    arc_peft.freeze_backbone(model)
    model.set_grad_checkpointing(True)
    model.train()
    reentrant = timm.layers.use_reentrant_ckpt()
    timm.layers.set_reentrant_ckpt(True)
    try:
        model(torch.randn(2, 3, 32, 32)).sum().backward()
    finally:
        timm.layers.set_reentrant_ckpt(reentrant)
    assert all(g is not None for g in _adapter_grads(model))
    # Removed with the adapters: the plain model carries nothing of arc_peft's.
    arc_peft.remove_arc(model)
    assert not model.patch_embed._forward_hooks


@pytest.mark.parametrize("lose_the_file", [False, True])
def test_trainer_checkpoint_and_resume_restore_every_adapter_tensor(
    tmp_path: Path, lose_the_file: bool
):
    from arc_peft.integrations.transformers import ArcPeftCallback

    class Data(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 8

        def __getitem__(self, i: int) -> dict:
            g = torch.Generator().manual_seed(i)
            return {"pixel_values": torch.randn(3, 32, 32, generator=g), "labels": i % 3}

    def trainer(model):
        args = transformers.TrainingArguments(
            str(tmp_path), per_device_train_batch_size=4, max_steps=4, save_steps=2,
            learning_rate=1e-2, report_to=[], use_cpu=True, logging_steps=100, seed=0,
            data_seed=0,
        )  # fmt: skip
        return transformers.Trainer(
            model=model, args=args, train_dataset=Data(), callbacks=[ArcPeftCallback()]
        )

    def fresh():
        model = adapted()
        arc_peft.freeze_backbone(model)
        return model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        straight = fresh()
        trainer(straight).train()
        assert os.path.isfile(tmp_path / "checkpoint-2" / "adapter.safetensors")
        if lose_the_file:
            os.remove(tmp_path / "checkpoint-2" / "adapter.safetensors")
        resumed = fresh()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer(resumed).train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    said = [str(w.message) for w in caught if "ArcPeftCallback" in str(w.message)]
    ours, theirs = arc_peft.adapter_parameters(straight), arc_peft.adapter_parameters(resumed)
    assert ours.keys() == theirs.keys()
    if lose_the_file:  # not silent: the run says the adapters were not restored
        assert said and "holds no adapter.safetensors" in said[0]
        return
    assert not said
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_own_reentrant_checkpointing_warns_and_the_fix_trains_the_adapters():
    """A user's own ``torch.utils.checkpoint(..., use_reentrant=True)`` (no model flag arc_peft
    can see): the adapters would get no gradient, so the first step warns naming the fix."""
    from torch.utils.checkpoint import checkpoint

    from arc_peft.errors import AdaptersNotTrainedWarning

    model = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, num_classes=3, img_size=32, patch_size=8, depth=2
    )
    arc_peft.inject_arc(model, ARCConfig(rank=4))
    arc_peft.freeze_backbone(model)
    model.train()

    def step(reentrant: bool, require: bool) -> None:
        model.zero_grad(set_to_none=True)
        h = model._pos_embed(model.patch_embed(torch.randn(2, 3, 32, 32)))
        if require:
            h.requires_grad_(True)
        for block in model.blocks:
            h = checkpoint(block, h, use_reentrant=reentrant)
        model.head(model.norm(h).mean(1)).sum().backward()

    with pytest.warns(AdaptersNotTrainedWarning, match="use_reentrant=False"):
        step(reentrant=True, require=False)
    assert all(g is None for g in _adapter_grads(model))
    for reentrant, require in ((True, True), (False, False)):
        with warnings.catch_warnings():
            warnings.simplefilter("error", AdaptersNotTrainedWarning)
            step(reentrant, require)
        grads = _adapter_grads(model)
        assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
    # Plain no-grad forwards in train mode (statistics, probes) do not warn.
    with warnings.catch_warnings():
        warnings.simplefilter("error", AdaptersNotTrainedWarning)
        with torch.no_grad():
            model(torch.randn(2, 3, 32, 32))
