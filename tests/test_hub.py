"""Sharing on the Hugging Face Hub, offline: a folder laid out as a Hub repo, and the same files
in huggingface_hub's cache layout read through ``"hf-hub:user/repo"`` with ``HF_HUB_OFFLINE=1``
(huggingface_hub's own offline path; nothing of arc_peft is mocked)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import timm
import torch
from torch import nn

import arc_peft
from arc_peft.io.sources import ADAPTER_FILE, CONFIG_FILE, resolve

from models import build, inputs, randomise_adapters

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)


def trained() -> nn.Module:
    """A tiny timm ViT as ``create_model`` rebuilds it from the file (seed 0, no weights)."""
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=7, **TINY)
    model.eval()
    arc_peft.inject_arc(model, arc_peft.ARCConfig(rank=4))
    randomise_adapters(model, 5)
    return model


def test_folder_holds_adapter_config_and_card(tmp_path: Path) -> None:
    model = trained()
    folder = tmp_path / "repo"
    meta = {"dataset": "cifar100", "metrics": {"top1": 91.25}}
    arc_peft.save_adapter_folder(model, folder, metadata=meta, repo_id="me/vit-cifar")
    assert sorted(os.listdir(folder)) == ["README.md", ADAPTER_FILE, CONFIG_FILE]
    config = json.loads((folder / CONFIG_FILE).read_text())
    info = arc_peft.read_adapter_info(folder)  # a folder reads as its adapter file
    assert config["method"] == "arc" and config["metadata"] == meta
    assert config["adapter_parameters"] == info.adapter_parameters
    assert config["model"]["architecture"] == "vit_tiny_patch16_224"
    card = (folder / "README.md").read_text()
    assert "library_name: arc-peft" in card
    assert "base_model: timm/vit_tiny_patch16_224.augreg_in21k_ft_in1k" in card
    assert f"{info.adapter_parameters:,} adapter parameters" in card
    assert "| top1 | 91.25 |" in card
    assert 'arc_peft.create_model("hf-hub:me/vit-cifar")' in card

    torch.manual_seed(0)
    fresh = arc_peft.create_model(folder, pretrained=False, **TINY).eval()
    x = inputs("vit")
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))


def _populate_cache(cache: Path, repo_id: str, files: Path, commit: str = "a" * 40) -> None:
    """huggingface_hub's cache layout: blobs by content hash, a snapshot of symlinks to them,
    and refs/main naming the snapshot's commit."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "blobs").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for file in files.iterdir():
        digest = hashlib.sha256(file.read_bytes()).hexdigest()
        shutil.copyfile(file, repo / "blobs" / digest)
        (snapshot / file.name).symlink_to(Path("..", "..", "blobs", digest))


def test_hub_round_trip_offline(tmp_path: Path) -> None:
    pytest.importorskip("huggingface_hub")
    model = trained()
    arc_peft.save_adapter_folder(model, tmp_path / "repo", repo_id="me/vit-cifar")
    _populate_cache(tmp_path / "cache", "me/vit-cifar", tmp_path / "repo")
    x = inputs("vit")
    with torch.no_grad():
        torch.save({"x": x, "y": model(x)}, tmp_path / "io.pt")
    # A fresh interpreter: huggingface_hub reads HF_HUB_OFFLINE / HF_HUB_CACHE at import.
    script = f"""
import torch, arc_peft
data = torch.load({str(tmp_path / "io.pt")!r})
torch.manual_seed(0)  # the same random backbone as build("vit"): no weights offline
model = arc_peft.create_model("hf-hub:me/vit-cifar", pretrained=False, **{TINY!r})
model.eval()
with torch.no_grad():
    assert torch.equal(model(data["x"]), data["y"]), "outputs differ"
info = arc_peft.read_adapter_info("hf-hub:me/vit-cifar")
assert info.path.startswith({str(tmp_path / "cache")!r}), info.path
print("round trip ok", type(model).__name__, model.head.out_features)
"""
    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        HF_HUB_CACHE=str(tmp_path / "cache"),
        PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
    )
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "round trip ok VisionTransformer 7" in done.stdout


def test_hub_sources_are_checked(tmp_path: Path) -> None:
    for bad in ("hf-hub:no-slash", "hf-hub:a/b/c", "hf-hub:/x"):
        with pytest.raises(ValueError, match="expected 'hf-hub:user/repo'"):
            resolve(bad)
    assert resolve(tmp_path) == str(tmp_path)  # no adapter file in it: left to the reader
    (tmp_path / ADAPTER_FILE).write_bytes(b"")
    assert resolve(tmp_path) == str(tmp_path / ADAPTER_FILE)
    assert resolve("some/file.safetensors") == "some/file.safetensors"


def test_missing_huggingface_hub_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # as if not installed
    with pytest.raises(ImportError, match=r'pip install "arc-peft\[hub\]"'):
        arc_peft.push_adapter_to_hub(trained(), "me/repo")
    with pytest.raises(ImportError, match="huggingface_hub"):
        arc_peft.load_adapter(build("vit"), "hf-hub:me/repo")


def test_create_model_needs_a_timm_identity(tmp_path: Path) -> None:
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.VisionTransformer(32, 8, 2, 2, 32, 64, num_classes=3)
    arc_peft.inject_arc(model, arc_peft.ARCConfig(rank=2))
    arc_peft.save_adapter(model, tmp_path / "tv.safetensors")
    with pytest.raises(ValueError, match="build it yourself and call arc_peft.load_adapter"):
        arc_peft.create_model(tmp_path / "tv.safetensors", pretrained=False)


def _edit_model_identity(src: Path, dst: Path, edit) -> Path:
    raw = src.read_bytes()
    size = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + size])
    model_id = json.loads(header["__metadata__"]["model"])
    edit(model_id)
    header["__metadata__"]["model"] = json.dumps(model_id, sort_keys=True)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    dst.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + size :])
    return dst


@pytest.mark.parametrize(
    "arch, kwargs, recorded",
    [
        ("vit_tiny_patch16_224", TINY, {"img_size": [32, 32], "patch_size": [8, 8], "depth": 2}),
        (
            "swin_tiny_patch4_window7_224",
            dict(
                img_size=64,
                window_size=4,
                embed_dim=32,
                depths=(1, 1, 1, 1),
                num_heads=(1, 1, 2, 2),
            ),
            {"img_size": [64, 64], "window_size": [4, 4], "embed_dim": 32},
        ),
    ],
)
def test_a_file_rebuilds_the_backbone_it_was_trained_on(
    tmp_path: Path, arch: str, kwargs: dict, recorded: dict
) -> None:
    torch.manual_seed(0)
    model = timm.create_model(arch, pretrained=False, num_classes=5, **kwargs).eval()
    arc_peft.inject_arc(model, arc_peft.ARCConfig(rank=4))
    randomise_adapters(model, 3)
    path = tmp_path / "task.safetensors"
    arc_peft.save_adapter(model, path)
    model_id = arc_peft.read_adapter_info(path).model
    assert recorded.items() <= model_id["args"].items()
    assert model_id["pretrained"] is False  # built with pretrained=False: norms at their init
    # No weights are fetched (the file says the backbone was random): this runs offline.
    rebuilt = arc_peft.create_model(path).eval()
    rebuilt.load_state_dict(model.state_dict(), strict=True)  # the same tensors, the same shapes
    x = torch.randn(2, 3, kwargs["img_size"], kwargs["img_size"])
    with torch.no_grad():
        assert torch.equal(rebuilt(x), model(x))


def test_changes_outside_the_recorded_arguments_warn(tmp_path: Path) -> None:
    model = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, num_classes=3, mlp_ratio=2.0, **TINY
    )
    arc_peft.inject_arc(model, arc_peft.ARCConfig(rank=4))
    path = tmp_path / "task.safetensors"
    arc_peft.save_adapter(model, path)
    assert arc_peft.read_adapter_info(path).model["args_complete"] is False
    # Its MLP width differs from the adapter's backbone (the sites' input widths agree, so the
    # adapter would load): the warning says so, and how to pass what the file cannot record.
    with pytest.warns(UserWarning, match="could not record"):
        default = arc_peft.create_model(path)
    assert default.blocks[0].mlp.fc1.out_features == 128
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fitted = arc_peft.create_model(path, mlp_ratio=2.0)  # the warning's advice, no warning
    assert fitted.blocks[0].mlp.fc1.out_features == 64


def test_trained_weights_are_recorded_as_pretrained(tmp_path: Path) -> None:
    model = trained()
    with torch.no_grad():
        model.norm.weight.mul_(1.5)  # as any trained checkpoint has it
    path = tmp_path / "task.safetensors"
    arc_peft.save_adapter(model, path)
    assert arc_peft.read_adapter_info(path).model["pretrained"] is True


def test_a_file_cannot_pass_other_arguments_to_timm(tmp_path: Path) -> None:
    path = tmp_path / "task.safetensors"
    arc_peft.save_adapter(trained(), path)

    def edit(model_id):
        model_id["args"] = {"pretrained_cfg_overlay": {"file": "/etc/passwd"}}

    bad = _edit_model_identity(path, tmp_path / "bad.safetensors", edit)
    with pytest.raises(arc_peft.AdapterFileError, match="does not pass on"):
        arc_peft.create_model(bad)
