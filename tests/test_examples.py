"""Smoke tests of examples/: each script runs end to end on a tiny model and a tiny image folder,
and its adapter file reloads to the weights it trained (DDP: identical on every rank)."""

from __future__ import annotations

import importlib
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import arc_peft

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))  # the examples import their sibling _common.py

CLASSES = ("circle", "square")


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    """``root/{train,val}/{circle,square}/*.png``: 6 + 2 tiny RGB images per class."""
    from PIL import Image, ImageDraw

    root = tmp_path_factory.mktemp("images")
    g = torch.Generator().manual_seed(0)
    for split, count in (("train", 6), ("val", 2)):
        for label, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                noise = torch.randint(0, 80, (40, 40, 3), generator=g, dtype=torch.uint8)
                image = Image.fromarray(noise.numpy())
                box = (8 + i % 3, 8, 30, 30 - i % 3)
                draw = ImageDraw.Draw(image)
                (draw.ellipse if label == 0 else draw.rectangle)(box, fill=(255, 200, 40))
                image.save(folder / f"{i}.png")
    return root


def _common_args(data: Path, out: Path) -> list[str]:
    return [
        *("--data", str(data), "--tiny", "--out", str(out), "--workers", "0", "--epochs", "1"),
        *("--batch-size", "4", "--max-steps", "3", "--rank", "4", "--bottleneck", "4"),
    ]


def _assert_trained_and_reloadable(model: torch.nn.Module, path: Path, config) -> None:
    """The file holds ``config``, loads onto ``model`` (a fresh backbone) and was trained."""
    assert arc_peft.read_adapter_info(path).config == config
    arc_peft.load_adapter(model, path)
    assert arc_peft.adapter_configs(model) == {"default": config}
    params = arc_peft.adapter_parameters(model)
    # Zero-initialised pieces (attention scales / AdaptMLP's up-projection) must have moved.
    moved = [n for n, p in params.items() if p.abs().sum() > 0 and n.endswith(("scale", "weight"))]
    assert moved, f"no adapter weight was trained: {sorted(params)}"
    head = arc_peft.get_head(model)
    assert any(p.abs().sum() > 0 for p in head.parameters()), "the zero head was not trained"


def test_train_timm(image_folder: Path, tmp_path: Path) -> None:
    import timm

    train_timm = importlib.import_module("train_timm")
    summary = train_timm.main([*_common_args(image_folder, tmp_path), "--method", "arc_att"])
    assert summary["steps"] == 3 and summary["classes"] == list(CLASSES)
    fresh = timm.create_model(
        "vit_base_patch16_224.augreg_in21k", num_classes=2, **train_timm.TINY_VIT
    )
    config = arc_peft.ARCConfig(rank=4, positions=("attn",))
    _assert_trained_and_reloadable(fresh, tmp_path / "adapter.safetensors", config)


def test_train_torchvision(image_folder: Path, tmp_path: Path) -> None:
    from torchvision.models.vision_transformer import VisionTransformer

    train_tv = importlib.import_module("train_torchvision")
    summary = train_tv.main([*_common_args(image_folder, tmp_path), "--method", "adaptmlp"])
    assert summary["steps"] == 3
    fresh = VisionTransformer(num_classes=2, **train_tv.TINY_VIT)
    config = arc_peft.AdaptMLPConfig(bottleneck=4)
    _assert_trained_and_reloadable(fresh, tmp_path / "adapter.safetensors", config)


def test_replace_head_rejects_unknown_layout() -> None:
    train_tv = importlib.import_module("train_torchvision")
    with pytest.raises(ValueError, match=r"neither heads\.head"):
        train_tv.replace_head(torch.nn.Linear(3, 3), 2)


def test_train_ddp_two_cpu_processes(image_folder: Path, tmp_path: Path) -> None:
    import timm

    dump = tmp_path / "dump"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        str(EXAMPLES / "train_ddp.py"), *_common_args(image_folder, tmp_path / "out"),
        "--device", "cpu", "--debug-dump-dir", str(dump),
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    ranks = [load_file(dump / f"rank{r}.safetensors") for r in (0, 1)]
    assert ranks[0].keys() == ranks[1].keys() and len(ranks[0]) > 2
    for key, value in ranks[0].items():
        assert torch.equal(value, ranks[1][key]), f"{key} differs between ranks"
    # Only rank 0 writes, and what it wrote is what every rank holds.
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "adapter.safetensors",
        "summary.json",
    ]
    fresh = timm.create_model(
        "vit_base_patch16_224.augreg_in21k",
        num_classes=2,
        **importlib.import_module("train_timm").TINY_VIT,
    )
    config = arc_peft.ARCConfig(rank=4)
    _assert_trained_and_reloadable(fresh, tmp_path / "out" / "adapter.safetensors", config)
    for key, param in arc_peft.adapter_parameters(fresh).items():
        assert torch.equal(param.detach(), ranks[0][key]), key
    for key, value in arc_peft.get_head(fresh).state_dict().items():
        assert torch.equal(value, ranks[0][f"head.{key}"]), key


def test_train_ddp_refuses_to_run_without_torchrun(image_folder: Path, tmp_path: Path) -> None:
    train_ddp = importlib.import_module("train_ddp")
    if "LOCAL_RANK" in os.environ:
        pytest.skip("running under torchrun")
    with pytest.raises(SystemExit):
        train_ddp.main(_common_args(image_folder, tmp_path))


def test_transfer_demo_quick(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    demo = importlib.import_module("transfer_demo")
    rows = demo.main(["--quick", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    # Each method's row is printed as it finishes, before the summary below the table.
    first_row = out.index("| Linear probe")
    assert first_row < out.index("| ARC ") < out.index("reloaded from")
    if importlib.util.find_spec("matplotlib") is not None:
        assert (tmp_path / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [r.method for r in rows] == [demo.METHOD_LABELS[m] for m in demo.METHODS]
    assert all(r.reload_identical for r in rows)
    by_name = {r.method: r for r in rows}
    # The parameter counts of the methods follow from the architecture alone.
    vit = demo.DIGITS_VIT
    dim, depth, rank, hidden = (
        vit["embed_dim"],
        vit["depth"],
        demo.DIGITS_RANK,
        demo.DIGITS_BOTTLENECK,
    )
    head = dim * 5 + 5
    assert by_name["Linear probe"].trainable == head
    assert by_name["ARC"].trainable == head + 2 * (dim * rank + depth * (rank + dim))
    assert by_name["ARC_att"].trainable == head + dim * rank + depth * (rank + dim)
    assert by_name["AdaptMLP"].trainable == head + depth * (2 * dim * hidden + hidden + dim)
    for row in rows:
        assert Path(row.file).stat().st_size == row.file_bytes
    if hasattr(arc_peft, "merge_adapter"):
        # Merging is exact up to float rounding.
        assert by_name["ARC"].merged_max_abs_diff < 1e-4
    assert (tmp_path / "results.md").read_text().startswith("| Method")


@pytest.mark.parametrize("adaptmlp", [80.1, 80.9])  # the README's run, and a closer one
def test_transfer_demo_plot_labels_do_not_overlap(
    tmp_path: Path, monkeypatch, adaptmlp: float
) -> None:
    """The README's plot: no method's label overlaps another's (ARC and AdaptMLP sit close)."""
    plt = pytest.importorskip("matplotlib.pyplot")
    from matplotlib.transforms import Bbox

    demo = importlib.import_module("transfer_demo")
    # The numbers of docs/assets/transfer_demo.png: ARC and AdaptMLP within a decade and 1 point.
    points = [
        ("Linear probe", 71.0, 330, 1_400),
        ("ARC_att", 75.8, 1_700, 8_600),
        ("ARC", 81.2, 3_000, 15_000),
        ("AdaptMLP", adaptmlp, 9_000, 38_000),
        ("Full fine-tuning", 89.0, 210_000, 820_000),
    ]
    rows = [
        demo.Row(method, acc, n, 0.0, f"{method}.safetensors", size, 1.0, True)
        for method, acc, n, size in points
    ]
    boxes_per_axes = []
    close = plt.close

    def measure_then_close(fig=None):
        renderer = fig.canvas.get_renderer()  # drawn by savefig, before close detaches it
        for ax in fig.axes:
            labels = [(t.get_text(), t.get_window_extent(renderer)) for t in ax.texts]
            # each point's marker (s=40: about 6 points wide) as a box in pixels
            half = 3 * fig.dpi / 72
            marks = [
                (t.get_text(), Bbox.from_extents(*(xy - half), *(xy + half)))
                for t, xy in zip(
                    ax.texts, ax.transData.transform([t.xy for t in ax.texts]), strict=True
                )
            ]
            boxes_per_axes.append((labels, marks, ax.get_window_extent(renderer)))
        close(fig)

    monkeypatch.setattr(plt, "close", measure_then_close)
    assert demo.save_plot(rows, tmp_path / "plot.png")
    assert len(boxes_per_axes) == 2
    for labels, marks, frame in boxes_per_axes:
        assert len(labels) == len(rows)
        for i, (a, box_a) in enumerate(labels):
            assert frame.contains(box_a.x0, box_a.y0) and frame.contains(box_a.x1, box_a.y1), a
            for b, box_b in labels[i + 1 :]:
                assert not box_a.overlaps(box_b), f"labels {a!r} and {b!r} overlap"
            for b, mark in marks:
                assert b == a or not box_a.overlaps(mark), f"label {a!r} covers the point of {b!r}"
