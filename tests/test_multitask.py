"""Many adapters on one backbone: switching, disabling, deleting, mixed batches, the example."""

from __future__ import annotations

import copy
import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import arc_peft
from arc_peft import AdaptMLPConfig, ARCConfig
from arc_peft.runtime.slots import iter_slots

from models import MATRIX, build, check_mixed_batch, inputs, randomise_adapters

ROOT = Path(__file__).resolve().parents[1]


def three_tasks(name: str) -> nn.Module:
    """A backbone with three named adapters: ARC, AdaptMLP, and ARC on one block's attention."""
    model = build(name)
    arc_peft.inject_arc(model, arc_peft.ARCConfig(rank=4), name="arc")
    arc_peft.inject_arc(model, arc_peft.AdaptMLPConfig(bottleneck=4), name="mlp")
    arc_peft.inject_arc(
        model, arc_peft.ARCConfig(rank=2, positions=("attn",), blocks=[-1]), name="last"
    )
    randomise_adapters(model, 11)
    return model


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_state_equal(model: nn.Module, expected: dict[str, torch.Tensor]) -> None:
    state = model.state_dict()
    assert list(state) == list(expected)
    for key, value in expected.items():
        assert torch.equal(state[key], value), key


def adapter_ids(model: nn.Module) -> list[int]:
    return [id(a) for _, _, slot in iter_slots(model) for a in slot.values()]


def hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


# -- mixed-task batches ----------------------------------------------------------------------------


@torch.no_grad()
@pytest.mark.parametrize("name", MATRIX)
def test_mixed_batch_equals_each_sample_alone(name):
    model = three_tasks(name)
    tasks = ["mlp", None, "arc", "last", "arc"]
    x = inputs(name, batch=len(tasks))
    check_mixed_batch(model, tasks, x, differs_by=1e-3)
    # Leaving the block restores the previous mode.
    assert all(slot.routing is None for _, _, slot in iter_slots(model))


def test_mixed_batch_rejects_unknown_names_and_wrong_batch_size():
    model = three_tasks("vit")
    with pytest.raises(KeyError, match="nope"), arc_peft.mixed_batch(model, ["arc", "nope"]):
        pass
    with pytest.raises(ValueError, match="at least one"), arc_peft.mixed_batch(model, []):
        pass
    x = inputs("vit", batch=4)
    for tasks in (["arc"] * 3, ["arc"] * 2, ["arc"]):  # 2 and 1 divide 4: must not pass silently
        with pytest.raises(ValueError, match="batch"), arc_peft.mixed_batch(model, tasks):
            model(x)
    assert all(slot.routing is None for _, _, slot in iter_slots(model))
    assert not model._forward_pre_hooks  # the batch-size check is gone with the block


# -- switching, disabling, deleting ----------------------------------------------------------------


@torch.no_grad()
@pytest.mark.parametrize("name", ["vit", "swin", "eva02_swiglu", "tv_vit", "tv_swin"])
def test_switching_disabling_and_deleting(name):
    x = inputs(name)
    plain = build(name)
    backbone_out = plain(x)
    plain_state = snapshot(plain)

    model = build(name)
    arc_peft.inject_arc(model, arc_peft.ARCConfig(rank=4), name="arc")
    randomise_adapters(model, 11)
    with_arc = snapshot(model)
    arc_out = model(x)
    arc_peft.inject_arc(model, arc_peft.AdaptMLPConfig(bottleneck=4), name="mlp")
    arc_peft.inject_arc(
        model, arc_peft.ARCConfig(rank=2, positions=("attn",), blocks=[0]), name="first"
    )
    # also changes "arc": it is put back before the deletions below
    randomise_adapters(model, seed=12)
    assert arc_peft.active_adapter(model) == "arc"  # the first injected stays active

    ids, hooks = adapter_ids(model), hook_count(model)
    outs = {}
    for task in ("arc", "mlp", "first", None, "mlp", "arc"):
        arc_peft.set_active_adapter(model, task)
        assert arc_peft.active_adapter(model) == task
        out = model(x)
        if task in outs:
            assert torch.equal(out, outs[task])
        outs[task] = out
        # Switching re-injects nothing: same adapter objects, same hooks.
        assert adapter_ids(model) == ids and hook_count(model) == hooks
    assert torch.equal(outs[None], backbone_out)
    # Each task's output is what a model holding only that adapter computes.
    for task in ("arc", "mlp", "first"):
        alone = copy.deepcopy(model)
        for other in ("arc", "mlp", "first"):
            if other != task:
                arc_peft.delete_adapter(alone, other)
        arc_peft.set_active_adapter(alone, task)
        assert torch.equal(alone(x), outs[task]), task
        assert (outs[task] - backbone_out).abs().max() > 1e-3, task

    arc_peft.set_active_adapter(model, "mlp")
    with arc_peft.disable_adapter(model):
        assert torch.equal(model(x), backbone_out)
        with arc_peft.disable_adapter(model):
            pass
        assert torch.equal(model(x), backbone_out)  # nesting restores the outer state
    assert torch.equal(model(x), outs["mlp"])

    # Deleting leaves no trace: back to the exact state before each adapter was added.
    with torch.no_grad():  # put "arc" back to the values snapshotted before "mlp" was added
        for key, param in arc_peft.adapter_parameters(model, "arc").items():
            param.copy_(with_arc[key])
    arc_peft.delete_adapter(model, "first")
    arc_peft.delete_adapter(model, "mlp")
    assert_state_equal(model, with_arc)
    assert arc_peft.active_adapter(model) is None  # "mlp" was active and is gone
    arc_peft.set_active_adapter(model, "arc")
    assert torch.equal(model(x), arc_out)
    arc_peft.delete_adapter(model, "arc")
    assert_state_equal(model, plain_state)
    assert hook_count(model) == 0
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())
    assert [n for n, _ in model.named_modules()] == [n for n, _ in plain.named_modules()]
    assert torch.equal(model(x), backbone_out)


def test_verbs_name_what_is_wrong():
    model = three_tasks("vit")
    with pytest.raises(KeyError, match="nope"):
        arc_peft.set_active_adapter(model, "nope")
    with pytest.raises(KeyError, match="nope"):
        arc_peft.delete_adapter(model, "nope")
    with pytest.raises(ValueError, match="no adapters"):
        arc_peft.set_active_adapter(build("vit"), None)
    with pytest.raises(ValueError, match="no adapters"), arc_peft.disable_adapter(build("vit")):
        pass


@torch.no_grad()
def test_adapters_loaded_from_files_share_one_backbone(tmp_path):
    trained = {}
    for seed, task in ((1, "cifar"), (2, "svhn")):
        model = build("vit")
        arc_peft.inject_arc(model, arc_peft.ARCConfig(rank=4), name=task)
        randomise_adapters(model, seed=seed)
        arc_peft.save_adapter(model, tmp_path / f"{task}.safetensors", include_head=False)
        trained[task] = model

    shared = build("vit")
    for task in trained:
        arc_peft.load_adapter(shared, tmp_path / f"{task}.safetensors", name=task)
    assert list(arc_peft.adapter_configs(shared)) == ["cifar", "svhn"]
    x = inputs("vit", batch=3)
    tasks = ["svhn", "cifar", None]
    with arc_peft.mixed_batch(shared, tasks):
        mixed = shared(x)
    for i, task in enumerate(tasks):
        reference = trained[task](x[i : i + 1]) if task else build("vit")(x[i : i + 1])
        torch.testing.assert_close(mixed[i : i + 1], reference, rtol=1e-5, atol=1e-5)


# -- the example -----------------------------------------------------------------------------------


def test_multitask_merge_example_runs(tmp_path, capsys):
    path = ROOT / "examples" / "multitask_merge.py"
    spec = importlib.util.spec_from_file_location("multitask_merge_example", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules.pop(spec.name, None)
    spec.loader.exec_module(module)
    results = module.main(["--out", str(tmp_path), "--steps", "5"])
    assert "merged model == adapted model" in capsys.readouterr().out
    assert results["mixed_batch_diff"] < 1e-5 and results["merge_diff"] < 1e-4
    assert (tmp_path / "merged_updown.pt").is_file()


@pytest.mark.parametrize("name", ["vit", "swin"])
def test_a_mixed_batch_trains_every_task_and_its_head(name):
    model = build(name)
    arc_peft.inject_arc(model, ARCConfig(rank=4), name="a")
    arc_peft.add_head(model, "a", 5)
    arc_peft.inject_arc(model, AdaptMLPConfig(bottleneck=4), name="b")
    arc_peft.add_head(model, "b", 7)
    randomise_adapters(model)
    arc_peft.freeze_backbone(model)
    tasks = ["a", "b", "b", "a"]
    x = inputs(name, 4)
    with arc_peft.mixed_batch(model, tasks):
        logits = model(x)
    torch.nn.functional.cross_entropy(logits, torch.tensor([0, 6, 1, 4])).backward()
    heads = {n: arc_peft.get_head(model, n) for n in ("a", "b")}
    for task in ("a", "b"):
        params = [*arc_peft.adapter_parameters(model, task).values(), *heads[task].parameters()]
        assert all(p.requires_grad for p in params), task
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params), task
    # The counts agree with what trains: every adapter, every task head, nothing else.
    counts = arc_peft.count_parameters(model)
    assert counts.trainable == counts.adapter + counts.head
    assert counts.head == sum(p.numel() for h in heads.values() for p in h.parameters())


def test_one_active_task_trains_alone():
    model = build("vit")
    arc_peft.inject_arc(model, ARCConfig(rank=4), name="a")
    arc_peft.inject_arc(model, ARCConfig(rank=4), name="b")
    arc_peft.add_head(model, "b", 3)
    randomise_adapters(model)
    arc_peft.freeze_backbone(model)
    model(inputs("vit")).sum().backward()  # "a" is active: "b" does not run
    assert all(p.grad is not None for p in arc_peft.adapter_parameters(model, "a").values())
    assert all(p.grad is None for p in arc_peft.adapter_parameters(model, "b").values())
    assert all(p.grad is None for p in arc_peft.get_head(model, "b").parameters())
