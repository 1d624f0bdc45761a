"""Self-describing adapter files: the backbone's identity and the user's metadata are stored,
a file refuses another architecture and warns on other pretrained weights, and a classifier's
adapter loads into the same timm network built with ``features_only=True``."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import timm
import torch
from torch import nn

import arc_peft
from arc_peft.errors import AdapterFileError
from arc_peft.io.identity import model_identity, remap_keys

from models import randomise_adapters

_VIT = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)
_SWIN = dict(img_size=56, window_size=7, embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1))


def timm_model(name: str, seed: int = 0, **kwargs) -> nn.Module:
    torch.manual_seed(seed)
    kwargs = {**(_SWIN if name.startswith("swin") else _VIT), **kwargs}
    return timm.create_model(name, pretrained=False, **kwargs).eval()


def trained(name: str = "vit_tiny_patch16_224", **kwargs) -> nn.Module:
    model = timm_model(name, num_classes=5, **kwargs)
    arc_peft.inject_arc(model, arc_peft.ARCConfig(rank=4))
    randomise_adapters(model, 1)
    return model


def test_identity_and_metadata_are_stored(tmp_path: Path) -> None:
    path = tmp_path / "a.safetensors"
    meta = {"dataset": "cifar100", "classes": ["cat", "dog"], "metrics": {"top1": 91.5}}
    arc_peft.save_adapter(trained(), path, metadata=meta)
    info = arc_peft.read_adapter_info(path)
    assert info.model == {
        "library": "timm",
        "architecture": "vit_tiny_patch16_224",
        "tag": "augreg_in21k_ft_in1k",
        "hub_id": "timm/vit_tiny_patch16_224.augreg_in21k_ft_in1k",
        # What rebuilds it: the builder arguments that differ from the entrypoint's, and no
        # pretrained weights (built with pretrained=False).
        "args": {"img_size": [32, 32], "patch_size": [8, 8], "embed_dim": 32, "depth": 2,
                 "num_heads": 2},
        "pretrained": False,
    }  # fmt: skip
    assert info.metadata == meta
    text = str(info)
    assert "timm vit_tiny_patch16_224 (tag augreg_in21k_ft_in1k" in text
    assert '[metrics]   {"top1": 91.5}' in text
    assert info.to_dict()["metadata"] == meta


@pytest.mark.parametrize(
    "bad, error",
    [({"x": float("nan")}, ValueError), ({"x": object()}, ValueError), (["a"], TypeError)],
)
def test_metadata_must_be_a_json_object(tmp_path: Path, bad, error) -> None:
    path = tmp_path / "a.safetensors"
    with pytest.raises(error, match="metadata must be"):
        arc_peft.save_adapter(trained(), path, metadata=bad)
    assert not path.exists()


@pytest.mark.parametrize("other", ["deit_tiny_patch16_224", "vit_tiny_patch16_384"])
def test_another_architecture_is_refused(tmp_path: Path, other: str) -> None:
    """Same class, same widths: only the recorded identity tells these apart."""
    path = tmp_path / "a.safetensors"
    arc_peft.save_adapter(trained(), path)
    model = timm_model(other, num_classes=5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(AdapterFileError, match=f"vit_tiny_patch16_224' and the model is '{other}'"):
        arc_peft.load_adapter(model, path)
    assert arc_peft.adapter_configs(model) == {}
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    arc_peft.load_adapter(model, path, check_model=False)  # the user knows better
    assert list(arc_peft.adapter_configs(model)) == ["default"]


def test_another_pretrained_tag_warns(tmp_path: Path) -> None:
    path = tmp_path / "a.safetensors"
    arc_peft.save_adapter(trained(), path)
    model = timm.create_model(
        "vit_tiny_patch16_224.augreg_in21k", pretrained=False, num_classes=5, **_VIT
    )
    expected = "tag 'augreg_in21k_ft_in1k'; the model has 'augreg_in21k'"
    with pytest.warns(UserWarning, match=expected):
        arc_peft.load_adapter(model, path)
    same = timm_model("vit_tiny_patch16_224", num_classes=5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        arc_peft.load_adapter(same, path)
    assert not [w for w in caught if "pretrained" in str(w.message)]


@torch.no_grad()
@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "swin_tiny_patch4_window7_224"])
def test_classifier_adapter_loads_into_features_only(tmp_path: Path, name: str) -> None:
    model = trained(name)
    path = tmp_path / "a.safetensors"
    arc_peft.save_adapter(model, path)
    extra = {"out_indices": (0, 1)} if name.startswith("vit") else {}
    features = timm_model(name, features_only=True, **extra)
    # The same backbone weights, under the wrapper's names.
    source = {k.replace(".", "_"): v for k, v in model.state_dict().items()}
    state = {}
    for key in features.state_dict():
        words = key.replace(".", "_")
        hits = [w for w in source if words == w or words.endswith("_" + w)]
        state[key] = source[max(hits, key=len)]
    features.load_state_dict(state)
    arc_peft.load_adapter(features, path)  # the head is left out: there is none to run
    x = torch.randn(2, 3, *(32, 32) if name.startswith("vit") else (56, 56))
    got = features(x)[-1]
    last = 1 if name.startswith("vit") else 3
    want = model.forward_intermediates(x, indices=[last], intermediates_only=True)[-1]
    if got.shape != want.shape:  # timm's Swin features are channels-last
        got = got.permute(0, 3, 1, 2)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert arc_peft.count_parameters(features).adapter == arc_peft.count_parameters(model).adapter


def test_remap_keys_is_one_to_one() -> None:
    expected = {"model.blocks.1.a", "model.blocks.11.a"}
    assert remap_keys({"blocks.1.a", "blocks.11.a"}, expected) == {
        "blocks.1.a": "model.blocks.1.a",
        "blocks.11.a": "model.blocks.11.a",
    }
    assert remap_keys({"layers.0.x"}, {"layers_0.x"}) == {"layers.0.x": "layers_0.x"}
    assert remap_keys({"a.x"}, {"p.a.x", "q.a.x"}) == {}  # ambiguous: no guess
    assert remap_keys({"a.x"}, {"a.x", "b.y"}) == {}  # incomplete


def test_torchvision_and_transformers_identity() -> None:
    torchvision = pytest.importorskip("torchvision")
    assert model_identity(torchvision.models.swin_t()) == {
        "library": "torchvision",
        "architecture": "swin_t",
    }
    tiny = torchvision.models.VisionTransformer(32, 8, 2, 2, 32, 64)
    assert model_identity(tiny) == {}  # not one of the builders: the widths still check
    transformers = pytest.importorskip("transformers")
    config = transformers.ViTConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
        image_size=32, patch_size=8,
    )  # fmt: skip
    model = transformers.ViTModel(config)
    model.config._name_or_path = "google/vit-base-patch16-224"
    assert model_identity(model) == {
        "library": "transformers",
        "architecture": "ViTModel",
        "name_or_path": "google/vit-base-patch16-224",
    }
