"""Two CPU processes (gloo): DDP keeps ranks identical and its file is the plain model's; FSDP2
(``fully_shard``, of the whole model, per block or per module) trains, gathers on save, and loads
before or after sharding.

Each test spawns its ranks; a rank raises on any failed check, which fails the test.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import arc_peft

from models import build, inputs

WORLD = 2
ARC = arc_peft.ARCConfig(rank=4, dropout=0.0)

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed/gloo"
)


def _spawn(fn, tmp_path: Path) -> None:
    mp.spawn(fn, args=(str(tmp_path),), nprocs=WORLD, join=True)


def _init(rank: int, tmp: str) -> None:
    # A file rendezvous rather than a fixed TCP port: other test runs on the machine cannot
    # take it between choosing and binding.
    torch.set_num_threads(1)
    store = Path(tmp) / "rendezvous"
    dist.init_process_group("gloo", init_method=store.as_uri(), rank=rank, world_size=WORLD)


def _adapted() -> nn.Module:
    model = build("vit")  # the same seed on every rank
    arc_peft.inject_arc(model, ARC)
    arc_peft.freeze_backbone(model)
    return model


def _step(model: nn.Module, rank: int, steps: int = 2) -> None:
    """A few SGD steps on rank-specific data (so only synchronised gradients keep ranks equal)."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.5)
    for step in range(steps):
        x = inputs("vit", batch=2, seed=10 * rank + step)
        loss = nn.functional.cross_entropy(model(x), torch.tensor([0, 1]))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def _same_on_all_ranks(tensor: torch.Tensor) -> bool:
    gathered = [torch.empty_like(tensor) for _ in range(WORLD)]
    dist.all_gather(gathered, tensor.contiguous())
    return all(torch.equal(g, gathered[0]) for g in gathered)


# -- DDP -----------------------------------------------------------------------------------------


def _ddp_rank(rank: int, tmp: str) -> None:
    _init(rank, tmp)
    try:
        model = _adapted()
        before = {k: v.clone() for k, v in arc_peft.adapter_parameters(model).items()}
        ddp = nn.parallel.DistributedDataParallel(model)
        with pytest.raises(ValueError, match="wrapped in DistributedDataParallel"):
            arc_peft.inject_arc(ddp, ARC, name="late")
        _step(ddp, rank)
        for name, param in arc_peft.adapter_parameters(model).items():
            assert not torch.equal(param, before[name]) or "attn" in name, name
            assert _same_on_all_ranks(param.detach()), name
        path = os.path.join(tmp, "ddp.safetensors")
        if rank == 0:
            arc_peft.save_adapter(ddp, path)
            info = arc_peft.read_adapter_info(path)
            assert info.backbone["architecture"].endswith("VisionTransformer"), info
            fresh = arc_peft.load_adapter(build("vit"), path)
            x = inputs("vit")
            with torch.no_grad():
                torch.testing.assert_close(fresh.eval()(x), model.eval()(x), rtol=0, atol=0)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_ddp_ranks_stay_identical_and_save_the_plain_model(tmp_path: Path) -> None:
    _spawn(_ddp_rank, tmp_path)


# -- FSDP2 ---------------------------------------------------------------------------------------


def _fully_shard():
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:
        return None
    return fully_shard


def _shard(model: nn.Module, units: str) -> nn.Module:
    """Shard the whole model (``"model"``), each block then the root (``"block"``, the usual
    recipe), or each block's attention and MLP modules then the root (``"module"``). ARC's
    shared ``U`` is held by the model, above the blocks, so it falls in the root's unit."""
    fully_shard = _fully_shard()
    for block in model.blocks if units != "model" else ():
        if units == "block":
            fully_shard(block)
        else:
            fully_shard(block.attn)
            fully_shard(block.mlp)
    fully_shard(model)
    return model


def _fsdp_rank(rank: int, tmp: str) -> None:
    _init(rank, tmp)
    try:
        x = inputs("vit")
        path = os.path.join(tmp, "fsdp.safetensors")
        for units in ("model", "block", "module"):
            model = _shard(_adapted(), units)
            with pytest.raises(ValueError, match="already sharded"):
                arc_peft.inject_arc(model, ARC, name="late")
            _step(model, rank)
            with torch.no_grad():
                expected = model.eval()(x)
            arc_peft.save_adapter(model, path)  # every rank: gathers the shards; rank 0 writes
            dist.barrier()
            info = arc_peft.read_adapter_info(path)
            assert info.backbone["architecture"].endswith(".VisionTransformer"), info

            plain = arc_peft.load_adapter(build("vit"), path)  # no sharding at all
            before = _shard(arc_peft.load_adapter(build("vit"), path), units)
            after = _shard(_adapted(), units)
            with torch.no_grad():
                after(x)  # after a forward pass the root unit holds unsharded parameters
            arc_peft.load_adapter(after, path)
            with torch.no_grad():
                for loaded in (plain, before, after):
                    torch.testing.assert_close(loaded.eval()(x), expected, rtol=1e-6, atol=1e-6)
            dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(_fully_shard() is None, reason="this torch has no FSDP2 (fully_shard)")
def test_fsdp2_trains_saves_and_loads_before_or_after_sharding(tmp_path: Path) -> None:
    _spawn(_fsdp_rank, tmp_path)
