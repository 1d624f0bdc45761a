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
