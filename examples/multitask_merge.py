"""Many tasks on one backbone, then a standalone merged model for one of them.

Runs in a few seconds on a CPU, with no network: a tiny random timm ViT stands in for a pretrained
backbone, and three toy tasks are made of noisy images::

    python examples/multitask_merge.py --out multitask_out

1. Add three named adapters to one frozen backbone, one per task (ARC, ARC_att and AdaptMLP),
   each with its own classifier head (``add_head``), and train each briefly.
2. Switch between them (``set_active_adapter``: a flag, nothing is re-injected); the model
   runs the active task's head.
3. Serve a batch that mixes the three tasks in one forward pass (``mixed_batch``): each sample
   goes through its own adapter and its own head; check it equals running each sample alone.
4. Run the bare backbone (``disable_adapter``).
5. Fold one ARC task into a copy of the backbone (``merge_adapter``), save its state dict, and
   reload it into a fresh plain timm model: same predictions, zero extra inference cost.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import timm
import torch
from torch import Tensor, nn

import arc_peft

MODEL = "vit_tiny_patch16_224"
MODEL_KWARGS = dict(img_size=32, patch_size=8, embed_dim=64, depth=4, num_heads=4)

# Toy tasks: two classes each, told apart by a different pattern in noisy images.
PATTERNS = {
    "updown": torch.ones(3, 32, 32).index_fill_(1, torch.arange(16, 32), 0.0),
    "leftright": torch.ones(3, 32, 32).index_fill_(2, torch.arange(16, 32), 0.0),
    "redgreen": torch.stack([torch.ones(32, 32), -torch.ones(32, 32), torch.zeros(32, 32)]),
}
CONFIGS = {
    "updown": arc_peft.ARCConfig(rank=8),
    "leftright": arc_peft.ARCConfig(rank=8, positions=("attn",)),
    "redgreen": arc_peft.AdaptMLPConfig(bottleneck=8),
}


def task_batch(task: str, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """``n`` noisy images showing the task's pattern (label 1) or its negative (label 0)."""
    labels = torch.randint(0, 2, (n,), generator=generator)
    sign = (2 * labels - 1).float()[:, None, None, None]
    return torch.randn(n, 3, 32, 32, generator=generator) + 0.5 * sign * PATTERNS[task], labels


def backbone(num_classes: int = 0) -> nn.Module:
    """The stand-in for a pretrained model (``num_classes=0``: the model returns features)."""
    return timm.create_model(MODEL, pretrained=False, num_classes=num_classes, **MODEL_KWARGS)


def train(model: nn.Module, task: str, steps: int, seed: int) -> None:
    """Train adapter ``task`` and its own head; everything else stays frozen."""
    arc_peft.set_active_adapter(model, task)
    head = arc_peft.get_head(model)  # the active task's head
    params = [*arc_peft.adapter_parameters(model, task).values(), *head.parameters()]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        x, y = task_batch(task, 32, g)
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("multitask_out"))
    parser.add_argument("--steps", type=int, default=30, help="training steps per task")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Run the demo; returns the accuracies and the two equivalence checks' max differences."""
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = backbone().eval()
    arc_peft.freeze_backbone(model, train_head=False)

    # 1. Several named adapters on one backbone, each with its own head (a backbone built with
    # num_classes=0 returns features; each task head maps them to its two classes).
    results: dict[str, float] = {}
    for i, (task, config) in enumerate(CONFIGS.items()):
        arc_peft.inject_arc(model, config, name=task)
        arc_peft.add_head(model, task, 2)
        train(model, task, args.steps, seed=i)
    counts = arc_peft.count_parameters(model)
    print(
        f"backbone {counts.total - counts.adapter:,} parameters, three adapters {counts.adapter:,}"
    )

    # 2. Switching is a flag on each adapted module: the same adapter objects keep serving.
    g = torch.Generator().manual_seed(100)
    test = {task: task_batch(task, 128, g) for task in CONFIGS}
    with torch.no_grad():
        for task in CONFIGS:
            arc_peft.set_active_adapter(model, task)
            x, y = test[task]
            accuracy = (model(x).argmax(1) == y).float().mean().item()
            results[f"accuracy_{task}"] = accuracy
            print(f"task {task:9s} ({CONFIGS[task].method:8s}) accuracy {accuracy:.2f}")

    # 3. One batch, three tasks: each sample goes through its own adapter and its own head.
    tasks = ["updown", "redgreen", "leftright", "updown"]
    batch = torch.stack([test[t][0][i] for i, t in enumerate(tasks)])
    with torch.no_grad(), arc_peft.mixed_batch(model, tasks):
        logits = model(batch)  # (4, 2): row i from task i's head
    worst = 0.0
    with torch.no_grad():
        for i, task in enumerate(tasks):
            arc_peft.set_active_adapter(model, task)
            alone = model(batch[i : i + 1])[0]
            worst = max(worst, (logits[i] - alone).abs().max().item())
    print(f"mixed batch {tasks}: max |diff| to one-sample runs {worst:.1e}")
    predicted = logits.argmax(1).tolist()
    labels = [test[t][1][i].item() for i, t in enumerate(tasks)]
    print(f"mixed-batch predictions {predicted}, labels {labels}")

    # 4. The bare backbone, without removing anything.
    with torch.no_grad(), arc_peft.disable_adapter(model):
        bare = model(batch)
    arc_peft.set_active_adapter(model, None)
    with torch.no_grad():
        assert torch.equal(bare, model(batch))
    print("disable_adapter: bare backbone features, bit-identical to no active adapter")

    # 5. A standalone model for one task: keep only its adapter and merge; its head becomes the
    # model's own. (Only a model holding a single adapter merges: the others were trained on
    # the unmerged weights.)
    def single_task_copy(task: str) -> nn.Module:
        copied = copy.deepcopy(model)
        for other in CONFIGS:
            if other != task:
                arc_peft.delete_adapter(copied, other)
        arc_peft.set_active_adapter(copied, task)
        return copied

    try:
        arc_peft.merge_adapter(single_task_copy("redgreen"))
    except arc_peft.MergeError as err:
        print(f"merging AdaptMLP is refused: ...{str(err)[-120:]}")
    task = "updown"
    standalone = single_task_copy(task)
    x = test[task][0]
    with torch.no_grad():
        adapted = standalone(x)
    arc_peft.merge_adapter(standalone)
    path = args.out / f"merged_{task}.pt"
    torch.save(standalone.state_dict(), path)

    fresh = backbone(num_classes=2).eval()  # a plain timm model: no arc_peft needed to run it
    fresh.load_state_dict(torch.load(path, weights_only=True), strict=True)
    with torch.no_grad():
        diff = (fresh(x) - adapted).abs().max().item()
    print(f"merged model == adapted model (max |diff| {diff:.1e}), saved to {path}")
    results.update(mixed_batch_diff=worst, merge_diff=diff)
    return results


if __name__ == "__main__":
    main()
