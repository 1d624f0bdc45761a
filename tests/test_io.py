"""Adapter files: round trips across the model matrix, the stored layout, strict all-or-nothing
loading of bad files, atomic saves and deterministic bytes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch
from safetensors import safe_open
from torch import nn

import arc_peft
from arc_peft import AdapterFileError, AdaptMLPConfig, ARCConfig
from arc_peft.io.saving import _serialize

from models import MATRIX, build, inputs, method_configs, randomise_adapters

METHODS = {
    **method_configs(),
    # the AdaptMLP options that add state (a learnable scale, a LayerNorm) must round-trip too
    "adaptmlp": AdaptMLPConfig(bottleneck=4, scale="learnable", layernorm="in"),
}


def randomise(model: nn.Module, seed: int = 0, head: bool = True) -> None:
    """Non-trivial adapter (and head) weights: the paper's zero init would hide a missed copy."""
    g = torch.Generator().manual_seed(seed)
    params = list(arc_peft.adapter_parameters(model).values())
    if head:
        params += list(arc_peft.get_head(model).parameters())
    with torch.no_grad():
        for param in params:
            param.copy_(torch.randn(param.shape, generator=g) * 0.3)


def adapted(name: str = "vit", config=METHODS["arc"], seed: int = 0) -> nn.Module:
    model = build(name)
    arc_peft.inject_arc(model, config)
    randomise(model, seed)
    return model.eval()


def snapshot(model: nn.Module) -> dict:
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "configs": arc_peft.adapter_configs(model),
        "active": arc_peft.active_adapter(model),
        "modules": [n for n, _ in model.named_modules()],
    }


def assert_unchanged(model: nn.Module, before: dict) -> None:
    state = model.state_dict()
    assert list(state) == list(before["state"])
    for key, value in before["state"].items():
        assert torch.equal(state[key], value), key
    assert arc_peft.adapter_configs(model) == before["configs"]
    assert arc_peft.active_adapter(model) == before["active"]
    assert [n for n, _ in model.named_modules()] == before["modules"]


def read_raw(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    size = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8 : 8 + size]), raw[8 + size :]


def write_header(path: Path, header: dict, data: bytes) -> None:
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(len(text).to_bytes(8, "little") + text + data)


def rewrite_tensors(src: Path, dst: Path, mutate) -> None:
    """Re-serialise ``src`` with its metadata after ``mutate(tensors)`` (a well-formed file)."""
    with safe_open(str(src), "pt") as handle:
        metadata = handle.metadata()
    tensors = safetensors.torch.load_file(str(src))
    mutate(tensors)
    dst.write_bytes(_serialize(tensors, metadata))


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    path = tmp_path / "vit.safetensors"
    arc_peft.save_adapter(adapted(), path)
    return path


# -- round trips ---------------------------------------------------------------------------------


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("name", MATRIX)
def test_round_trip_is_bit_exact(name: str, method: str, tmp_path: Path) -> None:
    model = adapted(name, METHODS[method])
    path = tmp_path / "a.safetensors"
    arc_peft.save_adapter(model, path)

    fresh = build(name)  # same backbone; its head differs until the file's head is loaded
    arc_peft.load_adapter(fresh, path)

    x = inputs(name)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))  # also proves the new adapters run in eval mode
    want, got = model.state_dict(), fresh.state_dict()
    assert list(got) == list(want)
    for key in want:
        assert torch.equal(got[key], want[key]), key
    assert arc_peft.adapter_configs(fresh) == {"default": METHODS[method]}
    assert arc_peft.active_adapter(fresh) == "default"


def test_file_counts_match_the_model_and_the_formula(saved: Path) -> None:
    info = arc_peft.read_adapter_info(saved)
    d, r, layers = 32, 4, 2
    assert info.adapter_parameters == 2 * (d * r + layers * (r + d))  # P_pos·(D·r + L·(r + D))
    assert info.adapter_parameters == arc_peft.count_parameters(adapted()).adapter
    assert info.head_parameters == 5 * d + 5
    assert info.config == METHODS["arc"]
    assert info.backbone["num_blocks"] == 2
    assert info.backbone["widths"] == {"attn": [32, 32], "mlp": [32, 32]}
    assert info.dtype == "float32"
    assert info.file_size == saved.stat().st_size
    json.dumps(info.to_dict())  # JSON-ready
    assert "arc" in str(info) and "400" in str(info)


@pytest.mark.parametrize("name, groups", [("vit", 2), ("swin", 8)])
def test_shared_projection_is_stored_once(name: str, groups: int, tmp_path: Path) -> None:
    model = adapted(name)
    path = tmp_path / "a.safetensors"
    arc_peft.save_adapter(model, path, include_head=False)
    with safe_open(str(path), "pt") as handle:
        keys = list(handle.keys())
    blocks = len(arc_peft.runtime.slots.iter_slots(model)) // 2
    # One U per (position, width) group (Swin: 4 stages x 2 positions), s and b per site.
    assert sum(k.endswith(".projection") for k in keys) == groups
    assert len(keys) == groups + 2 * 2 * blocks
    assert len(keys) == len(arc_peft.adapter_parameters(model))
    assert not any(".default." in k for k in keys)  # stored without the adapter name


def test_head_included_and_excluded(tmp_path: Path) -> None:
    model = adapted()
    with_head, without = tmp_path / "h.safetensors", tmp_path / "n.safetensors"
    arc_peft.save_adapter(model, with_head)
    arc_peft.save_adapter(model, without, include_head=False)
    with safe_open(str(with_head), "pt") as a, safe_open(str(without), "pt") as b:
        assert set(a.keys()) - set(b.keys()) == {"head.weight", "head.bias"}
    assert arc_peft.read_adapter_info(without).head is None

    for path, load_head in ((without, True), (with_head, False)):
        fresh = build("vit")
        head_before = {k: v.clone() for k, v in fresh.head.state_dict().items()}
        arc_peft.load_adapter(fresh, path, load_head=load_head)
        for key, value in fresh.head.state_dict().items():
            assert torch.equal(value, head_before[key])
        for key, param in arc_peft.adapter_parameters(fresh).items():
            assert torch.equal(param, arc_peft.adapter_parameters(model)[key])


def test_load_replaces_weights_of_an_equal_adapter(saved: Path) -> None:
    target = build("vit")
    arc_peft.inject_arc(target, METHODS["arc"])
    arc_peft.inject_arc(target, METHODS["adaptmlp"], name="other")
    arc_peft.set_active_adapter(target, "other")
    params = arc_peft.adapter_parameters(target, "default")
    arc_peft.load_adapter(target, saved)
    assert arc_peft.adapter_parameters(target, "default") == params  # same objects, new values
    source = arc_peft.adapter_parameters(adapted())
    for key, param in params.items():
        assert torch.equal(param, source[key])
    assert arc_peft.active_adapter(target) == "other"  # replacing does not switch


def test_load_under_another_name_and_activation(saved: Path) -> None:
    model = adapted()
    arc_peft.load_adapter(model, saved, name="task_b", load_head=False)
    assert arc_peft.active_adapter(model) == "default"  # inject_arc's rule: no switch
    arc_peft.delete_adapter(model, "task_b")
    arc_peft.load_adapter(model, saved, name="task_b", activate=True)
    assert arc_peft.active_adapter(model) == "task_b"
    for key, param in arc_peft.adapter_parameters(model, "task_b").items():
        assert torch.equal(
            param, arc_peft.adapter_parameters(model)[key.replace("task_b", "default")]
        )

    plain = build("vit")
    arc_peft.load_adapter(plain, saved, activate=False)
    assert arc_peft.active_adapter(plain) is None


def test_load_follows_the_model_dtype_and_keeps_the_rng(saved: Path) -> None:
    model = build("vit").double()
    rng = torch.get_rng_state()
    arc_peft.load_adapter(model, saved)
    assert torch.equal(torch.get_rng_state(), rng)
    source = arc_peft.adapter_parameters(adapted())
    for key, param in arc_peft.adapter_parameters(model).items():
        assert param.dtype == torch.float64
        assert torch.equal(param, source[key].double())


# -- saving --------------------------------------------------------------------------------------


def test_same_weights_give_the_same_bytes(tmp_path: Path) -> None:
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    arc_peft.save_adapter(adapted(), a)
    arc_peft.save_adapter(adapted(), b)  # a separately built model with the same weights
    assert a.read_bytes() == b.read_bytes()
    arc_peft.save_adapter(adapted(), b)  # again: safetensors alone orders metadata randomly
    assert a.read_bytes() == b.read_bytes()


def test_save_chooses_the_adapter_or_says_why_not(tmp_path: Path) -> None:
    path = tmp_path / "a.safetensors"
    with pytest.raises(ValueError, match="no adapters"):
        arc_peft.save_adapter(build("vit"), path)
    model = adapted()
    arc_peft.inject_arc(model, METHODS["adaptmlp"], name="other")
    with pytest.raises(KeyError, match="missing"):
        arc_peft.save_adapter(model, path, name="missing")
    arc_peft.set_active_adapter(model, None)
    with pytest.raises(ValueError, match=r"\['default', 'other'\]"):
        arc_peft.save_adapter(model, path)
    arc_peft.save_adapter(model, path, name="other")
    assert arc_peft.read_adapter_info(path).config == METHODS["adaptmlp"]
    assert arc_peft.read_adapter_info(path).name == "other"
    arc_peft.delete_adapter(model, "default")
    arc_peft.save_adapter(model, path)  # the only adapter, though inactive
    assert not path.with_name(path.name + ".tmp").exists()


def test_save_refuses_non_finite_weights(tmp_path: Path) -> None:
    model = adapted()
    with torch.no_grad():
        next(iter(arc_peft.adapter_parameters(model).values()))[0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        arc_peft.save_adapter(model, tmp_path / "a.safetensors")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("failing", ["os.replace", "os.fsync", "arc_peft.io.saving._serialize"])
def test_failed_save_keeps_the_old_file(
    failing: str, saved: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = saved.read_bytes()
    model = adapted(seed=1)  # different weights: a completed save would change the bytes

    def boom(*args, **kwargs):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(failing, boom)
    with pytest.raises(OSError, match="simulated"):
        arc_peft.save_adapter(model, saved)
    monkeypatch.undo()
    assert saved.read_bytes() == before
    assert [p.name for p in saved.parent.iterdir()] == [saved.name]  # no temporary file left
    arc_peft.save_adapter(model, saved)
    assert saved.read_bytes() != before


# -- bad files: AdapterFileError and an untouched model -------------------------------------------


@pytest.fixture(params=["plain", "injected"])
def target(request) -> nn.Module:
    """A model to load into: a plain backbone, or one already holding an (equal) adapter."""
    model = build("vit")
    if request.param == "injected":
        arc_peft.inject_arc(model, METHODS["arc"])
        randomise(model, seed=7)
    return model


def check_rejected(model: nn.Module, path: Path, match: str, **kwargs) -> None:
    before = snapshot(model)
    with pytest.raises(AdapterFileError, match=match):
        arc_peft.load_adapter(model, path, **kwargs)
    assert_unchanged(model, before)


def test_wrong_backbone(tmp_path: Path, target: nn.Module) -> None:
    wide = timm.create_model(
        "vit_tiny_patch16_224", num_classes=5, img_size=32, patch_size=8, embed_dim=48, depth=3
    )
    arc_peft.inject_arc(wide, METHODS["arc"])
    path = tmp_path / "wide.safetensors"
    arc_peft.save_adapter(wide, path)
    check_rejected(target, path, r"another backbone.*3 blocks vs 2.*attn widths per block \[48×3\]")

    swin = adapted("swin")
    arc_peft.save_adapter(swin, path)
    check_rejected(target, path, r"architecture timm\.models\.swin_transformer\.SwinTransformer")


def test_head_for_another_number_of_classes(tmp_path: Path, target: nn.Module) -> None:
    model = build("vit", num_classes=10)
    arc_peft.inject_arc(model, METHODS["arc"])
    path = tmp_path / "ten.safetensors"
    arc_peft.save_adapter(model, path)
    # Another number of classes is not an error: the stored head becomes the adapter's own.
    arc_peft.load_adapter(target, path, name="ten", activate=True)
    x = inputs("vit")
    with torch.no_grad():
        assert target(x).shape[-1] == 10
        assert torch.equal(arc_peft.get_head(target).weight, model.head.weight)
        arc_peft.set_active_adapter(target, None)
        assert target(x).shape[-1] == 5  # the model's own head again


def test_arc_file_into_adaptmlp_model(saved: Path) -> None:
    model = build("vit")
    arc_peft.inject_arc(model, METHODS["adaptmlp"])
    check_rejected(model, saved, r"already has an adapter 'default' with a different config")


def test_random_bytes_and_other_formats(tmp_path: Path, target: nn.Module) -> None:
    path = tmp_path / "bad.safetensors"
    g = torch.Generator().manual_seed(0)
    path.write_bytes(bytes(torch.randint(0, 256, (4096,), generator=g, dtype=torch.uint8).tolist()))
    check_rejected(target, path, "not a safetensors file")
    torch.save({"w": torch.ones(2)}, path)
    check_rejected(target, path, "pickle")
    safetensors.torch.save_file({"w": torch.ones(2)}, str(path))
    check_rejected(target, path, "not an arc_peft adapter file")
    path.write_bytes(b"")
    check_rejected(target, path, "empty")
    path.write_bytes(b"hello, this is not an adapter file at all")
    with pytest.raises(AdapterFileError, match="not a safetensors file"):
        arc_peft.read_adapter_info(path)


def test_truncated_at_every_offset(saved: Path, target: nn.Module) -> None:
    raw = saved.read_bytes()
    cut = saved.with_name("cut.safetensors")
    end_of_header = 8 + int.from_bytes(raw[:8], "little")
    # Every offset near the boundaries (length prefix, header end, data end), a stride elsewhere
    # (each offset costs a file write; one rule covers the data region).
    sizes = {*range(16), *range(end_of_header - 16, end_of_header + 16), *range(0, len(raw), 23)}
    sizes |= set(range(len(raw) - 16, len(raw)))
    before = snapshot(target)
    for size in sorted(sizes):
        cut.write_bytes(raw[:size])
        with pytest.raises(AdapterFileError, match=r"truncated|empty|not a safetensors|corrupt"):
            arc_peft.load_adapter(target, cut)
        if size % 97 == 0:
            with pytest.raises(AdapterFileError):
                arc_peft.read_adapter_info(cut)
    assert_unchanged(target, before)


def _set_meta(field: str, value: str):
    def mutate(header: dict) -> None:
        header["__metadata__"][field] = value

    return mutate


def _first_key(suffix: str):
    def pick(header: dict) -> str:
        return next(k for k in header if k.endswith(suffix))

    return pick


def _reshape(header: dict) -> None:
    header[_first_key(".scale")(header)]["shape"] = [5]


def _rename(header: dict) -> None:
    key = _first_key(".scale")(header)
    header[key.replace(".scale", ".scales")] = header.pop(key)


def _overlap(header: dict) -> None:
    header[_first_key(".bias")(header)]["data_offsets"][0] -= 4


@pytest.mark.parametrize(
    "mutate, match",
    [
        (_set_meta("format_version", "2"), r"file-format version 2.*Update arc-peft"),
        (_set_meta("format_version", "one"), "format_version"),
        (  # plain target: refused from the header, nothing built; injected: config differs
            _set_meta("config", json.dumps({"method": "arc", "rank": 5})),
            r"shape mismatch for \S+: file \[(32, )?4\], (model|its own config .*) \[(32, )?5\]"
            "|different config",
        ),
        (_set_meta("config", json.dumps({"method": "arc", "rnk": 5})), "unknown ARCConfig field"),
        (_set_meta("config", "{not json"), "unusable method config"),
        (_set_meta("method", "adaptmlp"), "corrupt metadata"),
        (_set_meta("backbone", "[]"), "backbone must be a JSON object"),
        (_set_meta("head", json.dumps({"module": "head", "shapes": {"head.w": [1]}})), "head"),
        (_set_meta("format", "something.else"), "not an arc_peft adapter file"),
        (_reshape, "corrupt header"),
        (_rename, r"missing adapter key\(s\): blocks\.0\.arc_peft\.attn\.scale;.*unexpected"),
        (_overlap, "corrupt header"),
    ],
)
def test_tampered_header(saved: Path, target: nn.Module, mutate, match: str) -> None:
    header, data = read_raw(saved)
    mutate(header)
    write_header(saved, header, data)
    check_rejected(target, saved, match)


def test_garbled_header_bytes(saved: Path, target: nn.Module) -> None:
    raw = bytearray(saved.read_bytes())
    raw[20:40] = b"\xff" * 20
    saved.write_bytes(bytes(raw))
    check_rejected(target, saved, "corrupt header")


def test_wrong_shape_and_non_finite_values(saved: Path, target: nn.Module) -> None:
    bad = saved.with_name("bad.safetensors")

    def reshape(tensors: dict) -> None:
        tensors["blocks.1.arc_peft.mlp.bias"] = torch.zeros(33)

    rewrite_tensors(saved, bad, reshape)
    check_rejected(target, bad, r"shape mismatch for blocks\.1\.arc_peft\.mlp\.bias: file \[33\]")

    for value in (float("nan"), float("inf")):

        def poison(tensors: dict, value=value) -> None:
            tensors["blocks.1.arc_peft.mlp.scale"][2] = value

        rewrite_tensors(saved, bad, poison)
        check_rejected(target, bad, r"blocks\.1\.arc_peft\.mlp\.scale holds NaN or infinite")


def test_missing_and_extra_tensors(saved: Path, target: nn.Module) -> None:
    bad = saved.with_name("bad.safetensors")
    rewrite_tensors(saved, bad, lambda t: t.pop("blocks.0.arc_peft.attn.projection"))
    check_rejected(target, bad, r"missing adapter key\(s\): blocks\.0\.arc_peft\.attn\.projection")
    rewrite_tensors(
        saved,
        bad,
        lambda t: t.update(
            {"blocks.1.arc_peft.attn.projection": t["blocks.0.arc_peft.attn.projection"].clone()}
        ),
    )
    check_rejected(target, bad, r"unexpected adapter key\(s\): blocks\.1\.arc_peft\.attn\.proj")


def test_invalid_name_changes_nothing(saved: Path) -> None:
    model = build("vit")
    before = snapshot(model)
    with pytest.raises(ValueError, match="adapter name"):
        arc_peft.load_adapter(model, saved, name="not valid")
    assert_unchanged(model, before)


def test_missing_file_is_an_os_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        arc_peft.load_adapter(build("vit"), tmp_path / "nope.safetensors")
    assert not os.path.exists(tmp_path / "nope.safetensors")


def test_files_move_both_ways_between_a_timm_classifier_and_its_features_only_form(tmp_path):
    kwargs = dict(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2)

    def make(**extra):
        torch.manual_seed(0)
        return timm.create_model("vit_tiny_patch16_224", pretrained=False, **kwargs, **extra)

    features = make(features_only=True)
    arc_peft.inject_arc(features, ARCConfig(rank=4))
    randomise_adapters(features, 2)
    arc_peft.freeze_backbone(features)  # no classifier: nothing to train, no error
    assert set(arc_peft.adapter_parameters(features)) == {
        n for n, p in features.named_parameters() if p.requires_grad
    }
    arc_peft.save_adapter(features, tmp_path / "features.safetensors")
    classifier = make(num_classes=3)
    arc_peft.load_adapter(classifier, tmp_path / "features.safetensors")
    arc_peft.save_adapter(classifier, tmp_path / "classifier.safetensors")
    back = make(features_only=True)
    arc_peft.load_adapter(back, tmp_path / "classifier.safetensors")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        for a, b in zip(back.eval()(x), features.eval()(x), strict=True):
            assert torch.equal(a, b)


def test_files_move_both_ways_between_a_transformers_classifier_and_its_base_model(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.ViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        image_size=32, patch_size=8, num_labels=3,
    )  # fmt: skip
    torch.manual_seed(0)
    classifier = transformers.ViTForImageClassification(cfg).eval()
    arc_peft.inject_arc(classifier, ARCConfig(rank=4))
    randomise_adapters(classifier, 1)
    arc_peft.save_adapter(classifier, tmp_path / "classifier.safetensors")
    base = transformers.ViTModel(cfg, add_pooling_layer=False).eval()
    base.load_state_dict(classifier.vit.state_dict(), strict=False)
    arc_peft.load_adapter(base, tmp_path / "classifier.safetensors")  # head left: base has none
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(base(x).last_hidden_state, classifier.vit(x).last_hidden_state)
    arc_peft.freeze_backbone(base)  # a base model: no head to train, no error
    arc_peft.save_adapter(base, tmp_path / "base.safetensors")
    again = transformers.ViTForImageClassification(cfg).eval()
    again.load_state_dict(classifier.state_dict(), strict=False)
    arc_peft.load_adapter(again, tmp_path / "base.safetensors")
    with torch.no_grad():
        assert torch.equal(again(x).logits, classifier(x).logits)
    # An unrelated architecture of the same widths is still refused.
    other = transformers.DeiTModel(transformers.DeiTConfig(**cfg.to_dict()))
    with pytest.raises(arc_peft.AdapterFileError, match="made for another"):
        arc_peft.load_adapter(other, tmp_path / "classifier.safetensors")
