"""The method registry: a third adapter method, registered from test code alone, gets every verb
(inject, freeze, count, save -> load, mixed batch, merge) with no change to the library; the
built-in methods are found there too."""

from __future__ import annotations

import copy
import dataclasses
import pathlib
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import pytest
import torch
from torch import Tensor, nn

import arc_peft
from arc_peft.methods import AdapterConfig, config_from_dict, registry
from arc_peft.methods.layers import Adapter

from models import build, inputs


@dataclasses.dataclass(frozen=True)
class ScaleShiftConfig(AdapterConfig):
    """SSF-style per-channel scale and shift on each site's input: an affine map, so mergeable."""

    positions: tuple[str, ...] = ("attn", "mlp")
    blocks: tuple[int, ...] | None = None
    target_modules: tuple[str, ...] | None = None
    exclude_modules: tuple[str, ...] = ()
    allow_partial: bool = False

    method: ClassVar[str] = "scaleshift"

    def __post_init__(self) -> None:
        self.check_selection()


class ScaleShift(Adapter):
    def __init__(self, dim: int, **factory: Any) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim, **factory))
        self.beta = nn.Parameter(torch.zeros(dim, **factory))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma + self.beta

    def affine(self, dtype=None, device=None):
        gamma = self.gamma.to(device=device, dtype=dtype)
        return torch.diag(gamma), self.beta.to(device=device, dtype=dtype)


def build_scaleshift(
    sites: Sequence[Any], config: ScaleShiftConfig, factory: Callable[[Any], dict]
) -> list[Adapter]:
    return [ScaleShift(site.width, **factory(site)) for site in sites]


@pytest.fixture
def scaleshift():
    method = arc_peft.register_method(ScaleShiftConfig, build_scaleshift)
    yield method
    registry._METHODS.pop("scaleshift")  # test code only: leave the registry as it was


def _randomise(model: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in arc_peft.adapter_parameters(model).values():
            p.add_(0.1 * torch.randn(p.shape, generator=g))


def test_builtin_methods_are_registered():
    names = [m.name for m in arc_peft.registered_methods()]
    assert names[:2] == ["arc", "adaptmlp"]
    for method in arc_peft.registered_methods():
        config = method.example_config()
        assert config_from_dict(config.to_dict()) == config


def test_a_third_method_gets_every_verb(scaleshift, tmp_path):
    torch.manual_seed(0)
    model = build("vit").eval()
    x = inputs("vit", batch=3)
    plain = model(x)
    arc_peft.inject_arc(model, ScaleShiftConfig())
    # identity at init; a non-zero adapter changes the output (the hooks run it)
    assert torch.equal(model(x), plain)
    _randomise(model, 1)
    adapted = model(x)
    assert not torch.allclose(adapted, plain)

    # freeze + count: only the adapter (and the head) train; counts are 2·D per site
    arc_peft.freeze_backbone(model)
    counts = arc_peft.count_parameters(model)
    sites = len(arc_peft.site_plan(model).sites)
    assert counts.adapter == sites * 2 * 32
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(arc_peft.adapter_parameters(model)) | {"head.weight", "head.bias"}
    model.train()
    model(x).sum().backward()
    assert all(p.grad is not None for p in arc_peft.adapter_parameters(model).values())
    model.eval()

    # save -> fresh model -> load reproduces the outputs bit for bit
    path = tmp_path / "ss.safetensors"
    arc_peft.save_adapter(model, path)
    assert arc_peft.read_adapter_info(path).config == ScaleShiftConfig()
    torch.manual_seed(0)
    fresh = build("vit").eval()
    arc_peft.load_adapter(fresh, path)
    assert torch.equal(fresh(x), adapted)

    # mixed batch: each sample through its own adapter equals each adapter alone
    arc_peft.inject_arc(fresh, ScaleShiftConfig(), name="other")
    with torch.no_grad():
        for p in arc_peft.adapter_parameters(fresh, "other").values():
            p.mul_(-1.0)
    arc_peft.set_active_adapter(fresh, "other")
    other = fresh(x)
    with arc_peft.mixed_batch(fresh, ["default", "other", "default"]):
        mixed = fresh(x)
    torch.testing.assert_close(mixed[[0, 2]], adapted[[0, 2]], rtol=0, atol=1e-6)
    torch.testing.assert_close(mixed[1], other[1], rtol=0, atol=1e-6)

    # merge: the affine map folds into the backbone, outputs unchanged
    merged = arc_peft.merge_adapter(copy.deepcopy(model))
    assert not arc_peft.adapter_configs(merged)
    torch.testing.assert_close(merged(x), adapted, rtol=1e-4, atol=1e-5)


def test_a_method_without_an_affine_map_is_refused_at_merge(scaleshift):
    class NoAffine(ScaleShift):
        merge_refusal = "it is a test layer without one"

        def affine(self, dtype=None, device=None):
            return None

    arc_peft.register_method(
        ScaleShiftConfig,
        lambda sites, config, factory: [NoAffine(s.width, **factory(s)) for s in sites],
        replace=True,
    )
    model = build("vit").eval()
    arc_peft.inject_arc(model, ScaleShiftConfig())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(arc_peft.MergeError, match="it is a test layer without one"):
        arc_peft.merge_adapter(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_registry_refuses_what_is_not_a_method():
    with pytest.raises(TypeError, match="AdapterConfig subclass"):
        arc_peft.register_method(dict, build_scaleshift)
    with pytest.raises(ValueError, match="already registered"):
        arc_peft.register_method(ScaleShiftConfig2, build_scaleshift)
    with pytest.raises(TypeError, match="expected an ARCConfig or AdaptMLPConfig"):
        arc_peft.inject_arc(build("vit"), object())
    with pytest.raises(ValueError, match="unknown adapter method 'nope'"):
        config_from_dict({"method": "nope"})


@dataclasses.dataclass(frozen=True)
class ScaleShiftConfig2(ScaleShiftConfig):
    method: ClassVar[str] = "arc"  # a tag already taken by a built-in


@pytest.mark.parametrize("method", ["arc", "adaptmlp"])
def test_files_written_by_version_0_1_0_load_exactly(method):
    """Files saved by the release before the method registry (tests/data, written by that code
    from a seeded tiny ViT) load onto a fresh model: every stored tensor lands in the model bit
    for bit, and the model reproduces the logits that release computed."""
    import safetensors.torch

    data = pathlib.Path(__file__).parent / "data"
    stored = safetensors.torch.load_file(data / f"v010_{method}.safetensors")
    expected = safetensors.torch.load_file(data / f"v010_{method}_expected.safetensors")
    torch.manual_seed(0)
    model = build("vit").eval()
    arc_peft.load_adapter(model, data / f"v010_{method}.safetensors")
    state = list(model.state_dict().values())
    for key, tensor in stored.items():
        assert any(t.shape == tensor.shape and torch.equal(t, tensor) for t in state), key
    with torch.no_grad():
        got = model(expected["x"])
    # The logits were computed on another machine, whose float32 GEMM kernels may round
    # differently (1.9e-6 apart on an Intel Xeon against the AMD EPYC that wrote them); a
    # tensor loaded into the wrong place moves them by orders of magnitude more.
    torch.testing.assert_close(got, expected["logits"], rtol=1e-5, atol=1e-5)
