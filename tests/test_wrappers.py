"""The file verbs given a module that holds the adapted model (a LightningModule, any container
without a head of its own) act on the adapted model inside, head and identity included."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import arc_peft
from arc_peft import ARCConfig

from models import build, inputs, randomise_adapters


class Holder(nn.Module):
    """What a training framework's module looks like: the model as a submodule, no head."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def adapted(seed: int = 0) -> nn.Module:
    model = build("vit")
    arc_peft.inject_arc(model, ARCConfig(rank=4))
    randomise_adapters(model, seed)
    return model.eval()


def test_save_load_merge_through_a_holder(tmp_path: Path) -> None:
    holder = Holder(adapted())
    arc_peft.save_adapter(holder, tmp_path / "a.safetensors")
    arc_peft.save_adapter(holder.model, tmp_path / "direct.safetensors")
    # The same file as from the model itself: its head, its class and identity.
    assert (tmp_path / "a.safetensors").read_bytes() == (
        tmp_path / "direct.safetensors"
    ).read_bytes()
    info = arc_peft.read_adapter_info(tmp_path / "a.safetensors")
    assert info.head is not None and "Holder" not in info.backbone["architecture"]
    again = Holder(adapted(seed=1))
    arc_peft.load_adapter(again, tmp_path / "a.safetensors")  # into the holder's model
    x = inputs("vit")
    with torch.no_grad():
        assert torch.equal(again(x), holder(x))
        assert arc_peft.merge_adapter(holder) is holder
        torch.testing.assert_close(holder(x), again(x), rtol=1e-5, atol=1e-5)
    assert arc_peft.adapter_configs(holder.model) == {}


def test_several_adapted_models_are_refused_by_name(tmp_path: Path) -> None:
    pair = nn.ModuleDict({"student": adapted(), "teacher": adapted(1)})
    with pytest.raises(ValueError, match=r"several adapted models \(student, teacher\)"):
        arc_peft.save_adapter(pair, tmp_path / "a.safetensors")
    assert not (tmp_path / "a.safetensors").exists()


def test_a_lightning_module(tmp_path: Path) -> None:
    lightning = pytest.importorskip("lightning")

    class Lit(lightning.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = adapted()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.model(x)

    lit = Lit()
    arc_peft.save_adapter(lit, tmp_path / "lit.safetensors")
    fresh = build("vit")
    arc_peft.load_adapter(fresh, tmp_path / "lit.safetensors")  # the real model takes it
    x = inputs("vit")
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), lit(x))


def test_loading_into_a_fresh_holder_puts_the_adapter_on_its_model(tmp_path: Path) -> None:
    arc_peft.save_adapter(adapted(), tmp_path / "a.safetensors")
    holder = Holder(build("vit"))
    arc_peft.load_adapter(holder, tmp_path / "a.safetensors")
    assert arc_peft.adapter_configs(holder.model)  # on the model, not on the holder
    arc_peft.save_adapter(holder, tmp_path / "again.safetensors")
    info = arc_peft.read_adapter_info(tmp_path / "again.safetensors")
    assert info.backbone["architecture"].endswith("VisionTransformer")
    saved = (tmp_path / "a.safetensors").read_bytes()
    assert (tmp_path / "again.safetensors").read_bytes() == saved


def test_a_lightning_trainer_trains_the_adapters_and_its_checkpoint_restores_them(
    tmp_path: Path,
) -> None:
    """Lightning's own loop, optimizer and checkpoint, unchanged: the adapters and the head
    train, the frozen backbone does not move, and a fresh model takes the trained adapters
    from Lightning's checkpoint and from an adapter file alike."""
    lightning = pytest.importorskip("lightning")

    class Lit(lightning.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = build("vit").train()
            arc_peft.inject_arc(self.model, ARCConfig(rank=4, init="identity"))
            arc_peft.freeze_backbone(self.model)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.model(x)

        def training_step(self, batch: tuple, _: int) -> torch.Tensor:
            x, y = batch
            return nn.functional.cross_entropy(self(x), y)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-2)

    torch.manual_seed(0)
    x = inputs("vit", batch=8)
    lit = Lit()
    classes = lit.model.head.out_features
    data = torch.utils.data.TensorDataset(x, torch.randint(0, classes, (8,)))
    before = {k: v.clone() for k, v in lit.state_dict().items()}
    trainer = lightning.Trainer(
        max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(lit, torch.utils.data.DataLoader(data, batch_size=4))
    trainable = {f"model.{n}" for n, p in lit.model.named_parameters() if p.requires_grad}
    moved = {k for k, v in lit.state_dict().items() if not torch.equal(v, before[k])}
    assert moved == trainable  # every adapter tensor and the head, nothing else
    assert any(".arc_peft." in k for k in moved) and "model.head.weight" in moved

    trainer.save_checkpoint(tmp_path / "lit.ckpt")
    arc_peft.save_adapter(lit, tmp_path / "task.safetensors")
    lit.eval()
    with torch.no_grad():
        want = lit(x)
        restored = Lit.load_from_checkpoint(tmp_path / "lit.ckpt").eval()
        assert torch.equal(restored(x), want)
        fresh = build("vit")
        arc_peft.load_adapter(fresh, tmp_path / "task.safetensors")
        assert torch.equal(fresh.eval()(x), want)
