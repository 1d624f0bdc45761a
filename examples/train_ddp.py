"""Multi-GPU / multi-node adapter training with torch DistributedDataParallel, via ``torchrun``.

The recipe and arguments are those of ``train_timm.py``; ``--batch-size`` is per process (the
global batch is ``batch size x processes``). One process per GPU on one machine::

    torchrun --standalone --nproc_per_node=8 examples/train_ddp.py \\
        --data PATH --model vit_base_patch16_224.augreg_in21k --pretrained --method arc

Two machines (run on each, with its ``--node_rank``)::

    torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 \\
        --rdzv_backend=c10d --rdzv_endpoint=HOST0:29500 examples/train_ddp.py --data PATH ...

Without GPUs it runs on the CPU with the gloo backend (``--nproc_per_node=2``); with GPUs each
process takes ``cuda:LOCAL_RANK`` and uses nccl. Notes:

- ``find_unused_parameters`` is not needed: :func:`arc_peft.freeze_backbone` leaves the
  adapter and the head trainable, and every one of those runs in every forward pass (with
  several adapters on one model, ``freeze_backbone(model, adapters="active")`` keeps it so).
- ARC's shared projection ``U`` is one parameter (held above the blocks that read it), so DDP
  reduces its gradient once.
- Every process starts from the same seed and DDP broadcasts rank 0's weights anyway; gradients
  are averaged, so the adapter is identical on every rank after each step. Only rank 0 writes
  the adapter file. ``--debug-dump-dir`` makes every rank dump its adapter and head weights
  (``rank<N>.safetensors``) so this can be checked.
"""

from __future__ import annotations

import json
import os

import torch
import torch.distributed as dist
from _common import (
    accuracy,
    default_device,
    fit_with_recipe,
    image_folder_classes,
    image_folder_loaders,
    predict,
    seed_everything,
)
from safetensors.torch import save_file
from torch.nn.parallel import DistributedDataParallel
from train_timm import build_model, build_parser, transforms

import arc_peft


def main(argv: list[str] | None = None) -> dict | None:
    parser = build_parser(__doc__)
    parser.add_argument("--debug-dump-dir", default=None, help="every rank dumps its weights here")
    parser.set_defaults(out=parser.get_default("out").with_name("arc_ddp"))
    args = parser.parse_args(argv)
    if "LOCAL_RANK" not in os.environ:
        parser.error("launch with torchrun, e.g. torchrun --nproc_per_node=2 examples/train_ddp.py")

    local_rank = int(os.environ["LOCAL_RANK"])
    use_cuda = torch.cuda.is_available() and args.device in (None, "cuda")
    if use_cuda:
        torch.cuda.set_device(local_rank)
    device = torch.device(f"cuda:{local_rank}") if use_cuda else default_device("cpu")
    dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        seed_everything(args.seed)
        model = build_model(args, len(image_folder_classes(args.data))).to(device)
        train, val, classes = image_folder_loaders(
            args.data,
            *transforms(args, model),
            args.batch_size,
            args.workers,
            args.seed,
            distributed=True,
        )
        if rank == 0:
            counts = arc_peft.count_parameters(model)
            print(f"{world} processes on {device.type}, {args.method}: {counts}")
        ddp = DistributedDataParallel(model, device_ids=[local_rank] if use_cuda else None)
        result = fit_with_recipe(
            ddp, train, args, device=device, progress=None if rank == 0 else False
        )
        if args.debug_dump_dir:
            os.makedirs(args.debug_dump_dir, exist_ok=True)
            state = dict(arc_peft.adapter_parameters(model))
            head = arc_peft.get_head(model)
            state.update({f"head.{k}": v for k, v in head.state_dict().items()})
            state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
            save_file(state, os.path.join(args.debug_dump_dir, f"rank{rank}.safetensors"))

        summary = None
        if rank == 0:
            # Evaluation on rank 0 alone (the validation set is small next to training).
            logits, labels = predict(model, val, device, amp=args.amp)
            args.out.mkdir(parents=True, exist_ok=True)
            path = args.out / "adapter.safetensors"
            arc_peft.save_adapter(model, path)
            summary = {
                "model": args.model,
                "method": args.method,
                "processes": world,
                "classes": classes,
                "steps": result.steps,
                "val_top1": accuracy(logits, labels),
                "adapter_file": str(path),
            }
            (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
            top1 = summary["val_top1"]
            print(f"{result.steps} steps per rank; val top-1 {top1:.2f}%; saved {path}")
        dist.barrier()  # nobody exits (and tears the group down) while rank 0 still writes
        return summary
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
