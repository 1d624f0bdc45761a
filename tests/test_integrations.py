"""Inside the tools users train with: activation checkpointing, Hugging Face ``save_pretrained`` /
``Trainer`` checkpoints, peft side by side, and wrapper modules (a LightningModule, any module
holding the adapted model). Nothing is silently lost: it works, or it fails naming the fix.

Every model is a tiny random-init configuration; nothing is downloaded.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import arc_peft

from models import build, inputs, randomise_adapters


def tiny_hf_vit(seed: int = 0) -> nn.Module:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    config = transformers.ViTConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=32,
        patch_size=8,
        num_labels=3,
    )
    return transformers.ViTForImageClassification(config)


def adapter_grads(model: nn.Module) -> dict[str, torch.Tensor | None]:
    return {
        n: None if p.grad is None else p.grad.clone()
        for n, p in arc_peft.adapter_parameters(model).items()
    }


# -- 1. reentrant activation checkpointing ----------------------------------------------------


def test_hf_reentrant_checkpointing_trains_adapters():
    """``use_reentrant=True`` gives every adapter the gradient it gets without checkpointing
    (it used to give none: the checkpointed layers' inputs did not require grad)."""
    model = tiny_hf_vit()
    arc_peft.inject_arc(model, arc_peft.ARCConfig(rank=4, dropout=0.0))
    randomise_adapters(model)
    arc_peft.freeze_backbone(model)
    model.train()
    pixels = torch.randn(2, 3, 32, 32)
    labels = torch.tensor([0, 2])
    model(pixel_values=pixels, labels=labels).loss.backward()
    plain = adapter_grads(model)
    model.zero_grad()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    model(pixel_values=pixels, labels=labels).loss.backward()
    checkpointed = adapter_grads(model)
    assert plain.keys() == checkpointed.keys() and len(plain) == 10
    for name, grad in checkpointed.items():
        assert grad is not None and grad.abs().sum() > 0, name
        torch.testing.assert_close(grad, plain[name], rtol=1e-5, atol=1e-7)
    assert not pixels.requires_grad  # the caller's tensor is left as it was


def test_timm_reentrant_grad_checkpointing():
    """timm's ``set_grad_checkpointing`` with reentrant ``torch.utils.checkpoint``."""
    from timm.layers import set_reentrant_ckpt, use_reentrant_ckpt

    model = build("vit")
    arc_peft.inject_arc(model, arc_peft.ARCConfig(rank=4, dropout=0.0))
    randomise_adapters(model)
    arc_peft.freeze_backbone(model)
    x = inputs("vit")
    model(x).square().sum().backward()
    plain = adapter_grads(model)
    model.zero_grad()
    model.set_grad_checkpointing(True)
    was = use_reentrant_ckpt()
    set_reentrant_ckpt(True)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message="None of the inputs")
            model(x).square().sum().backward()
    finally:
        set_reentrant_ckpt(was)
    for name, grad in adapter_grads(model).items():
        assert grad is not None, name
        torch.testing.assert_close(grad, plain[name], rtol=1e-5, atol=1e-6)


def test_plain_reentrant_checkpoint_reaches_adapters():
    """``torch.utils.checkpoint`` called in a model's own forward, frozen layers before it."""

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Linear(8, 16)
            self.layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
            self.head = nn.Linear(16, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = checkpoint(self.layer, self.stem(x), use_reentrant=True)
            return self.head(h.mean(1))

    torch.manual_seed(0)
    model = Model()
    arc_peft.inject_arc(
        model, arc_peft.ARCConfig(rank=4, dropout=0.0), example_input=torch.randn(1, 5, 8)
    )
    randomise_adapters(model)
    arc_peft.freeze_backbone(model, train_head=False)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="None of the inputs")
        model(torch.randn(2, 5, 8)).sum().backward()
    grads = adapter_grads(model)
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads.values()), grads


def test_input_grad_hook_goes_with_the_adapters():
    model = build("vit")
    arc_peft.inject_arc(model, arc_peft.ARCConfig(rank=4))
    assert len(model._forward_pre_hooks) == 1
    arc_peft.merge_adapter(model)
    assert len(model._forward_pre_hooks) == 0
    arc_peft.inject_arc(model, arc_peft.ARCConfig(rank=4))
    arc_peft.remove_arc(model)
    assert len(model._forward_pre_hooks) == 0


# -- 2. save_pretrained / from_pretrained, Trainer checkpoints --------------------------------


def test_save_pretrained_warns_and_the_named_route_keeps_the_adapters(tmp_path):
    transformers = pytest.importorskip("transformers")
    model = tiny_hf_vit().eval()
    arc_peft.inject_arc(model, arc_peft.ARCConfig(rank=4))
    randomise_adapters(model)
    pixels = torch.randn(2, 3, 32, 32)
    expected = model(pixel_values=pixels).logits
    with pytest.warns(arc_peft.AdaptersNotSavedWarning, match=r"load_adapter\(model, folder\)"):
        model.save_pretrained(tmp_path)
    arc_peft.save_adapter(model, tmp_path / "adapter.safetensors")  # the route it names
    loaded = transformers.ViTForImageClassification.from_pretrained(tmp_path).eval()
    assert arc_peft.adapter_configs(loaded) == {}  # what from_pretrained alone gives
    arc_peft.load_adapter(loaded, tmp_path)
    assert torch.equal(loaded(pixel_values=pixels).logits, expected)


def test_merged_model_saves_without_warning(tmp_path):
    transformers = pytest.importorskip("transformers")
    model = tiny_hf_vit().eval()
    arc_peft.inject_arc(model, arc_peft.ARCConfig(rank=4))
    randomise_adapters(model)
    pixels = torch.randn(2, 3, 32, 32)
    arc_peft.merge_adapter(model)
    assert "save_pretrained" not in model.__dict__  # the wrapper went with the adapters
    with warnings.catch_warnings():
        warnings.simplefilter("error", arc_peft.AdaptersNotSavedWarning)
        model.save_pretrained(tmp_path)
    loaded = transformers.ViTForImageClassification.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(
        loaded(pixel_values=pixels).logits, model(pixel_values=pixels).logits, rtol=0, atol=0
    )


class _Images(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int) -> dict:
        g = torch.Generator().manual_seed(i)
        return {"pixel_values": torch.randn(3, 32, 32, generator=g), "labels": i % 3}


def _trained(tmp_path, steps: int, resume: str | None = None, callback: bool = True) -> nn.Module:
    transformers = pytest.importorskip("transformers")
    from arc_peft.integrations.transformers import ArcPeftCallback

    model = tiny_hf_vit()
    arc_peft.inject_arc(model, arc_peft.ARCConfig(rank=4))  # dropout on: the RNG is restored
    arc_peft.freeze_backbone(model)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=2,
        max_steps=steps,
        save_steps=2,
        learning_rate=0.05,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    trainer = transformers.Trainer(
        model=model,
        args=args,
        train_dataset=_Images(),
        callbacks=[ArcPeftCallback()] if callback else [],
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", arc_peft.AdaptersNotSavedWarning)
        trainer.train(resume_from_checkpoint=str(tmp_path / resume) if resume else None)
    return model


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {**arc_peft.adapter_parameters(model), **dict(model.classifier.named_parameters())}


@pytest.mark.slow  # two Trainer runs: ~10 s of CPU
def test_trainer_resume_restores_every_adapter_tensor(tmp_path):
    """A run of 4 steps (checkpoints at 2 and 4), and a fresh model resumed from its step-2
    checkpoint to step 4, end with the same adapter and head, bit for bit."""
    whole = _state(_trained(tmp_path, steps=4))
    assert (tmp_path / "checkpoint-2" / "adapter.safetensors").is_file()
    resumed = _state(_trained(tmp_path, steps=4, resume="checkpoint-2"))
    assert whole.keys() == resumed.keys() and len(whole) == 12
    for name, value in whole.items():
        assert torch.equal(value, resumed[name]), name


def test_trainer_resume_without_adapter_file_refuses(tmp_path):
    _trained(tmp_path, steps=2, callback=False)
    with pytest.raises(FileNotFoundError, match="checkpoint-2 holds no adapter.safetensors"):
        _trained(tmp_path, steps=4, resume="checkpoint-2")


# -- 3. peft side by side ---------------------------------------------------------------------


def _vit_with_lora(modules_to_save=None) -> nn.Module:
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=4, target_modules=["qkv"], modules_to_save=modules_to_save)
    return peft.get_peft_model(build("vit"), config)


@pytest.mark.parametrize("modules_to_save", [None, ["head"]])
def test_inject_into_a_peft_model_refuses_naming_peft(modules_to_save):
    model = _vit_with_lora(modules_to_save)
    before = dict(model.state_dict())
    with pytest.raises(arc_peft.UnsupportedModelError, match=r"holds peft layers .*qkv.*inject"):
        arc_peft.inject_arc(model, arc_peft.ARCConfig(rank=4))
    assert arc_peft.adapter_configs(model) == {} and model.state_dict().keys() == before.keys()


def test_arc_then_peft_trains_saves_and_refuses_to_merge(tmp_path):
    peft = pytest.importorskip("peft")
    model = build("vit")
    arc_peft.inject_arc(model, arc_peft.ARCConfig(rank=4, dropout=0.0))
    randomise_adapters(model)
    arc_peft.freeze_backbone(model)
    lora = peft.get_peft_model(
        model, peft.LoraConfig(r=4, target_modules=["qkv"], modules_to_save=["head"])
    )
    ours = arc_peft.adapter_parameters(lora)
    assert not any(p.requires_grad for p in ours.values())  # get_peft_model froze them
    for param in ours.values():  # the documented step
        param.requires_grad_(True)
    x = inputs("vit")
    lora(x).square().sum().backward()
    assert all(p.grad is not None for p in ours.values())
    with pytest.raises(ValueError, match="include_head=False"):
        arc_peft.save_adapter(lora, tmp_path / "arc.safetensors")
    # LoRA's trainable tensors are peft's to save: ours alone go into the file.
    arc_peft.save_adapter(lora, tmp_path / "arc.safetensors", include_head=False)
    lora.save_pretrained(tmp_path / "lora")
    assert (tmp_path / "lora" / "adapter_model.safetensors").is_file()
    # the file is the plain backbone's: it loads into a fresh model, refused were it PeftModel's
    fresh = build("vit")
    arc_peft.load_adapter(fresh, tmp_path / "arc.safetensors")
    for name, param in arc_peft.adapter_parameters(fresh).items():
        assert torch.equal(param, ours[f"base_model.model.{name}"]), name
    with pytest.raises(arc_peft.MergeError, match=r"wrapped by peft .*blocks\.0\.attn\.qkv"):
        arc_peft.merge_adapter(lora)
    # peft's merge first, then ours: the plain backbone computing what the pair computed.
    lora.eval()
    expected = lora(x)
    merged = lora.merge_and_unload()
    arc_peft.merge_adapter(merged)
    assert arc_peft.adapter_configs(merged) == {}
    torch.testing.assert_close(merged(x), expected, rtol=1e-4, atol=1e-5)


# -- 4. wrappers ------------------------------------------------------------------------------


class Wrapper(nn.Module):
    """What a LightningModule is to the file verbs: a module holding the adapted model."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.loss = nn.CrossEntropyLoss()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def test_file_verbs_through_a_wrapper_act_on_the_adapted_model(tmp_path):
    model = build("vit")
    arc_peft.inject_arc(model, arc_peft.ARCConfig(rank=4))
    randomise_adapters(model)
    with torch.no_grad():
        model.head.weight.add_(1.0)
    arc_peft.save_adapter(model, tmp_path / "plain.safetensors")
    wrapped = Wrapper(model)
    assert arc_peft.freeze_backbone(wrapped) is wrapped
    assert model.head.weight.requires_grad  # the head was found inside
    arc_peft.save_adapter(wrapped, tmp_path / "wrapped.safetensors")
    # the same bytes: head included, the real backbone's class and keys
    assert (tmp_path / "wrapped.safetensors").read_bytes() == (
        tmp_path / "plain.safetensors"
    ).read_bytes()
    other = Wrapper(build("vit"))
    arc_peft.inject_arc(other.model, arc_peft.ARCConfig(rank=4))
    arc_peft.load_adapter(other, tmp_path / "wrapped.safetensors")
    x = inputs("vit")
    model.eval(), other.eval()
    assert torch.equal(other(x), wrapped(x))
    expected = wrapped(x)
    assert arc_peft.merge_adapter(wrapped) is wrapped
    assert arc_peft.adapter_configs(model) == {}
    torch.testing.assert_close(wrapped(x), expected, rtol=1e-4, atol=1e-5)


def test_wrapper_of_two_adapted_models_refuses_naming_them(tmp_path):
    pair = nn.ModuleDict({"student": build("vit"), "teacher": build("vit")})
    for model in pair.values():
        arc_peft.inject_arc(model, arc_peft.ARCConfig(rank=4))
    with pytest.raises(ValueError, match=r"\['student', 'teacher'\].*save_adapter\(model\.student"):
        arc_peft.save_adapter(pair, tmp_path / "a.safetensors")
    assert not (tmp_path / "a.safetensors").exists()


def test_a_model_with_its_own_head_is_not_a_wrapper(tmp_path):
    """ViTForImageClassification adapted at ``.vit``: the file holds the classifier too."""
    model = tiny_hf_vit()
    arc_peft.inject_arc(model.vit, arc_peft.ARCConfig(rank=4))
    arc_peft.save_adapter(model, tmp_path / "a.safetensors")
    info = arc_peft.read_adapter_info(tmp_path / "a.safetensors")
    assert info.head_parameters == 32 * 3 + 3, info.head
