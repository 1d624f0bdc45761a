"""Many tasks on one backbone, then a standalone merged model for one of them.

Runs in a few seconds on a CPU, with no network: a tiny random timm ViT stands in for a pretrained
backbone, and three toy tasks are made of noisy images::

    python examples/multitask_merge.py --out multitask_out

1. Add three named adapters to one frozen backbone, one per task (ARC, ARC_att and AdaptMLP),
   each with its own classifier head, and train each briefly.
2. Switch between them (``set_active_adapter``: a flag, nothing is re-injected).
3. Serve a batch that mixes the three tasks in one forward pass (``mixed_batch``) and check it
   equals running each sample with its own adapter.
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


def train(model: nn.Module, head: nn.Linear, task: str, steps: int, seed: int) -> None:
    """Train adapter ``task`` and its head; everything else stays frozen."""
    arc_peft.set_active_adapter(model, task)
    params = [*arc_peft.adapter_parameters(model, task).values(), *head.parameters()]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        x, y = task_batch(task, 32, g)
        loss = nn.functional.cross_entropy(head(model(x)), y)
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

    # 1. Several named adapters on one backbone, each with its own head.
    results: dict[str, float] = {}
    heads: dict[str, nn.Linear] = {}
    for i, (task, config) in enumerate(CONFIGS.items()):
        arc_peft.inject_arc(model, config, name=task)
        heads[task] = nn.Linear(model.num_features, 2)
        train(model, heads[task], task, args.steps, seed=i)
    counts = arc_peft.count_parameters(model)
    print(
        f"backbone {counts.total - counts.adapter:,} parameters, three adapters {counts.adapter:,}"
    )

    # 2. Switching is a flag on each adapted module: the same adapter objects keep serving.
    g = torch.Generator().manual_seed(100)
    test = {task: task_batch(task, 128, g) for task in CONFIGS}
    with torch.no_grad():
        for task, head in heads.items():
            arc_peft.set_active_adapter(model, task)
            x, y = test[task]
            accuracy = (head(model(x)).argmax(1) == y).float().mean().item()
            results[f"accuracy_{task}"] = accuracy
            print(f"task {task:9s} ({CONFIGS[task].method:8s}) accuracy {accuracy:.2f}")

    # 3. One batch, three tasks: each sample goes through its own adapter, then its own head.
    tasks = ["updown", "redgreen", "leftright", "updown", None]
    batch = torch.stack([test[t or "updown"][0][i] for i, t in enumerate(tasks)])
    with torch.no_grad(), arc_peft.mixed_batch(model, tasks):
        features = model(batch)
    logits = [heads[t](f) if t else None for t, f in zip(tasks, features, strict=True)]
    worst = 0.0
    with torch.no_grad():
        for i, task in enumerate(tasks):
            arc_peft.set_active_adapter(model, task)
            alone = model(batch[i : i + 1])[0]
            worst = max(worst, (features[i] - alone).abs().max().item())
    print(f"mixed batch {tasks}: max |diff| to one-sample runs {worst:.1e}")
    predicted = [None if lg is None else lg.argmax().item() for lg in logits]
    labels = [None if t is None else test[t][1][i].item() for i, t in enumerate(tasks)]
    print(f"mixed-batch predictions {predicted}, labels {labels}")

    # 4. The bare backbone, without removing anything.
    with torch.no_grad(), arc_peft.disable_adapter(model):
        bare = model(batch)
    arc_peft.set_active_adapter(model, None)
    with torch.no_grad():
        assert torch.equal(bare, model(batch))
    print("disable_adapter: bare backbone features, bit-identical to no active adapter")

    # 5. A standalone model for one task: keep only its adapter, give it its head, merge. (Only
    # a model holding a single adapter merges: the others were trained on the unmerged weights.)
    def single_task_copy(task: str) -> nn.Module:
        copied = copy.deepcopy(model)
        for other in CONFIGS:
            if other != task:
                arc_peft.delete_adapter(copied, other)
        arc_peft.set_active_adapter(copied, task)
        copied.reset_classifier(2)
        copied.head.load_state_dict(heads[task].state_dict())
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
