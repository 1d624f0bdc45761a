"""Per-task heads: each named adapter owns its classifier (any number of classes), switching the
active adapter switches the head, a mixed batch classifies each sample with its own task's head,
and files carry heads and ``freeze_backbone(also=...)`` modules to the adapter they load as."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import arc_peft
from arc_peft.state import TASKS_ATTR

from models import MATRIX, build, inputs, randomise_adapters

CLASSES = {"cifar": 7, "pets": 3}


def two_tasks(name: str) -> nn.Module:
    """A backbone with adapters "cifar" (7 classes) and "pets" (3), each with its own head."""
    model = build(name)
    for task, classes in CLASSES.items():
        arc_peft.inject_arc(model, arc_peft.ARCConfig(rank=4), name=task)
        arc_peft.add_head(model, task, classes)
    randomise_adapters(model, 3)
    with torch.no_grad():  # heads that visibly differ from the model's own
        for task in CLASSES:
            for p in arc_peft.get_head(model, task).parameters():
                p.normal_(0, 0.5)
    return model


@torch.no_grad()
@pytest.mark.parametrize("name", ["vit", "swin", "eva02", "tv_vit", "tv_swin"])
def test_switching_switches_the_head(name: str) -> None:
    model = two_tasks(name)
    x = inputs(name)
    base_width = model(x).shape[-1] if arc_peft.active_adapter(model) is None else None
    for task, classes in CLASSES.items():
        arc_peft.set_active_adapter(model, task)
        assert model(x).shape == (x.shape[0], classes)
        assert arc_peft.get_head(model) is arc_peft.get_head(model, task)
    arc_peft.set_active_adapter(model, None)
    assert model(x).shape[-1] == 5 != base_width
    # Nothing moves when the task changes: the state dict is the same whichever is active.
    keys = list(model.state_dict())
    arc_peft.set_active_adapter(model, "pets")
    assert list(model.state_dict()) == keys


@torch.no_grad()
@pytest.mark.parametrize("name", ["vit", "swin", "tv_vit", "tv_swin", "tv_swinv2"])
def test_mixed_batch_uses_each_samples_own_head(name: str) -> None:
    model = two_tasks(name)
    tasks = ["pets", "cifar", None, "pets", "cifar"]
    x = inputs(name, batch=len(tasks))
    with arc_peft.mixed_batch(model, tasks):
        logits = model(x)
    assert logits.shape == (5, 7)
    for i, task in enumerate(tasks):
        arc_peft.set_active_adapter(model, task)
        alone = model(x[i : i + 1])[0]
        width = alone.shape[-1]
        torch.testing.assert_close(logits[i, :width], alone, rtol=1e-5, atol=1e-5)
        assert torch.isneginf(logits[i, width:]).all()
    split = arc_peft.split_logits(logits, tasks, model)
    assert {k: v.shape for k, v in split.items()} == {
        "pets": (2, 3), "cifar": (2, 7), None: (1, 5)
    }  # fmt: skip
    assert torch.equal(split["pets"], logits[[0, 3], :3])
    # Without the model the -inf padding tells the widths.
    assert {k: v.shape for k, v in arc_peft.split_logits(logits, tasks).items()} == {
        k: v.shape for k, v in split.items()
    }


def test_padded_cross_entropy_is_each_tasks_own_loss() -> None:
    model = two_tasks("vit")
    tasks = ["pets", "cifar", "cifar", "pets"]
    labels = torch.tensor([2, 6, 0, 1])
    x = inputs("vit", batch=4)
    with torch.no_grad(), arc_peft.mixed_batch(model, tasks):
        loss = F.cross_entropy(model(x), labels, reduction="none")
    for i, task in enumerate(tasks):
        arc_peft.set_active_adapter(model, task)
        with torch.no_grad():
            alone = F.cross_entropy(model(x[i : i + 1]), labels[i : i + 1])
        torch.testing.assert_close(loss[i], alone, rtol=1e-5, atol=1e-5)


def test_mixed_batch_trains_every_head() -> None:
    model = two_tasks("vit")
    model.train()
    arc_peft.freeze_backbone(model, train_head=False)
    heads = [arc_peft.get_head(model, t) for t in CLASSES]
    for head in heads:
        head.requires_grad_(True)
    params_before = {id(p) for p in model.parameters()}
    with arc_peft.mixed_batch(model, ["pets", "cifar"]):
        assert {id(p) for p in model.parameters()} == params_before  # nothing unregistered
        loss = F.cross_entropy(model(inputs("vit")), torch.tensor([1, 5]))
    loss.backward()
    for head in heads:
        assert head.weight.grad is not None and head.weight.grad.abs().sum() > 0


def test_round_trip_keeps_tasks_apart(tmp_path: Path) -> None:
    model = two_tasks("vit")
    x = inputs("vit")
    want = {}
    for task in CLASSES:
        arc_peft.set_active_adapter(model, task)
        arc_peft.save_adapter(model, tmp_path / f"{task}.safetensors")
        with torch.no_grad():
            want[task] = model(x)
    shared = build("vit")
    for task in CLASSES:
        arc_peft.load_adapter(shared, tmp_path / f"{task}.safetensors", name=task)
    for task in CLASSES:
        arc_peft.set_active_adapter(shared, task)
        with torch.no_grad():
            assert torch.equal(shared(x), want[task])
    # Loaded again into the same names: replaced, not duplicated.
    arc_peft.load_adapter(shared, tmp_path / "pets.safetensors", name="pets")
    assert len(arc_peft.task_modules(shared, "pets")) == 1


def test_only_adapter_copies_a_fitting_head_into_the_model(tmp_path: Path) -> None:
    """A one-task model stays a plain model: the stored head is copied into its own head."""
    model = build("vit")
    arc_peft.inject_arc(model, arc_peft.ARCConfig(rank=4))
    arc_peft.save_adapter(model, tmp_path / "a.safetensors")
    fresh = build("vit", seed=1)
    head = fresh.head
    arc_peft.load_adapter(fresh, tmp_path / "a.safetensors")
    assert arc_peft.get_head(fresh) is head and torch.equal(head.weight, model.head.weight)
    assert not hasattr(fresh, TASKS_ATTR)


def hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


@torch.no_grad()
def test_delete_and_remove_restore_the_models_head() -> None:
    model = build("vit")
    plain = copy.deepcopy(model)
    x = inputs("vit")
    arc_peft.inject_arc(model, arc_peft.ARCConfig(rank=4), name="a")
    arc_peft.inject_arc(model, arc_peft.ARCConfig(rank=4), name="b")
    arc_peft.add_head(model, "a", 9)
    arc_peft.add_head(model, "b", 2)
    assert arc_peft.get_head(model).out_features == 9 and model(x).shape[-1] == 9
    arc_peft.delete_adapter(model, "a")  # "a" was active; now nothing is
    assert arc_peft.get_head(model) is model.head and model(x).shape[-1] == 5
    arc_peft.set_active_adapter(model, "b")
    assert model(x).shape[-1] == 2
    with arc_peft.disable_adapter(model):
        assert torch.equal(model(x), plain(x))  # the bare backbone, head included
    arc_peft.remove_arc(model)
    assert not hasattr(model, TASKS_ATTR) and hook_count(model) == hook_count(plain)
    assert list(model.state_dict()) == list(plain.state_dict())
    assert torch.equal(model(x), plain(x))


@torch.no_grad()
def test_merge_keeps_the_tasks_head_and_unmerge_restores() -> None:
    model = build("vit")
    arc_peft.inject_arc(model, arc_peft.ARCConfig(rank=4), name="pets")
    arc_peft.add_head(model, "pets", 3)
    randomise_adapters(model, 3)
    x = inputs("vit")
    want = model(x)
    arc_peft.merge_adapter(model, keep_original=True)
    torch.testing.assert_close(model(x), want, rtol=1e-4, atol=1e-5)
    assert model.head.out_features == 3 and not hasattr(model, TASKS_ATTR)
    arc_peft.unmerge_adapter(model)
    assert torch.equal(model(x), want)
    arc_peft.set_active_adapter(model, None)
    assert model(x).shape[-1] == 5


def test_freeze_also_modules_travel_with_the_adapter(tmp_path: Path) -> None:
    x = inputs("vit")
    want = {}
    for seed, task in enumerate(CLASSES):
        model = build("vit")
        arc_peft.inject_arc(model, arc_peft.ARCConfig(rank=4), name=task)
        arc_peft.freeze_backbone(model, also=["norm"])
        with torch.no_grad():
            model.norm.weight.normal_(generator=torch.Generator().manual_seed(seed))
        arc_peft.save_adapter(model, tmp_path / f"{task}.safetensors")
        info = arc_peft.read_adapter_info(tmp_path / f"{task}.safetensors")
        assert info.trained["modules"] == ["norm"]
        with torch.no_grad():
            want[task] = model(x)
    shared = build("vit")
    for task in CLASSES:
        arc_peft.load_adapter(shared, tmp_path / f"{task}.safetensors", name=task)
    for task in CLASSES:
        arc_peft.set_active_adapter(shared, task)
        with torch.no_grad():
            assert torch.equal(shared(x), want[task]), task
    assert {p for t in CLASSES for p in arc_peft.task_modules(shared, t)} == {"norm", "head"}
    # Saved again from the shared model, each task's file holds its own norm.
    for task in CLASSES:
        arc_peft.set_active_adapter(shared, task)
        arc_peft.save_adapter(shared, tmp_path / "again.safetensors", name=task)
        again = build("vit")
        arc_peft.load_adapter(again, tmp_path / "again.safetensors")
        with torch.no_grad():
            assert torch.equal(again(x), want[task]), task


def test_compiled_model_switches_heads_and_routes() -> None:
    model = two_tasks("vit")
    compiled = torch.compile(model, backend="eager")
    x = inputs("vit", batch=3)
    tasks = ["cifar", "pets", "cifar"]
    with torch.no_grad():
        for task, classes in CLASSES.items():
            arc_peft.set_active_adapter(model, task)
            assert torch.equal(compiled(x), model(x)) and compiled(x).shape[-1] == classes
        with arc_peft.mixed_batch(model, tasks):
            eager = model(x)
            got = compiled(x)
    assert torch.equal(got, eager) and got.shape == (3, 7)


def test_add_head_rejects_bad_input() -> None:
    model = build("vit")
    arc_peft.inject_arc(model, arc_peft.ARCConfig(rank=4), name="a")
    with pytest.raises(ValueError, match="num_classes=0"):
        arc_peft.add_head(model, "a", 0)
    with pytest.raises(KeyError, match="no adapter named 'b'"):
        arc_peft.add_head(model, "b", 3)
    with pytest.raises(TypeError, match="got str"):
        arc_peft.add_head(model, "a", "three")
    assert not hasattr(model, TASKS_ATTR)


@pytest.mark.parametrize("name", MATRIX)
def test_every_architecture_takes_a_task_head(name: str) -> None:
    model = build(name)
    arc_peft.inject_arc(model, arc_peft.ARCConfig(rank=2), name="t")
    arc_peft.add_head(model, "t", 11)
    with torch.no_grad():
        assert model(inputs(name)).shape[-1] == 11


def test_attention_pooling_is_not_a_classifier() -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        image_size=32, patch_size=8, vision_use_head=True,
    )  # fmt: skip
    tower = transformers.SiglipVisionModel(config)
    tower = getattr(tower, "vision_model", tower)  # transformers 4 nests the tower
    assert type(tower.head).__name__ == "SiglipMultiheadAttentionPoolingHead"
    assert arc_peft.get_head(tower) is None
    classifier = transformers.SiglipForImageClassification(
        transformers.SiglipConfig(vision_config=config.to_dict(), text_config={})
    )
    assert arc_peft.get_head(classifier) is classifier.classifier


def test_attention_pooling_is_recognised_by_what_it_computes(tmp_path) -> None:
    """AIMv2's pooling head holds no ``nn.MultiheadAttention``: its attention is written out.
    The probe finds it (queries from a learned token, keys and values from the tokens) and the
    site plan kept on the model says so; the class name plays no part."""
    transformers = pytest.importorskip("transformers")
    config = transformers.Aimv2VisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        image_size=32, patch_size=8, use_head=True,
    )  # fmt: skip
    model = transformers.Aimv2VisionModel(config)
    arc_peft.inject_arc(model, arc_peft.ARCConfig(rank=2))
    assert [x.path for x in arc_peft.site_plan(model).left_out] == ["head"]
    assert arc_peft.get_head(model) is None
    arc_peft.save_adapter(model, tmp_path / "a.safetensors")  # the pooling head is no classifier
    assert arc_peft.read_adapter_info(tmp_path / "a.safetensors").head is None


def test_a_classifier_named_like_attention_is_still_the_head() -> None:
    class AttentionFreeClassifier(nn.Linear):  # a name is no evidence either way
        pass

    model = build("tv_vit")
    model.heads = nn.Sequential(AttentionFreeClassifier(32, 5))
    arc_peft.inject_arc(model, arc_peft.ARCConfig(rank=2))
    assert arc_peft.get_head(model) is model.heads


@torch.no_grad()
def test_copies_and_pickles_keep_their_own_heads() -> None:
    import pickle

    model = two_tasks("vit")
    x = inputs("vit")
    arc_peft.set_active_adapter(model, "pets")
    want = model(x)
    for copied in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        arc_peft.set_active_adapter(model, "cifar")  # the original changes, the copy does not
        assert torch.equal(copied(x), want)
        arc_peft.set_active_adapter(copied, "cifar")
        assert torch.equal(copied(x), model(x)) and copied(x).shape[-1] == 7
        arc_peft.set_active_adapter(model, "pets")
