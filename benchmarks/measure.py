"""How time and memory are measured.

* **Time**: every function runs once per repeat, in a rotating order, after warm-up calls
  (:func:`interleaved`); on a CPU the clock is the process's CPU time (with one thread: the work
  done, little disturbed by other processes), on CUDA wall time between synchronisations.
* **Saved for backward** (:func:`saved_bytes`): the bytes of distinct activation storage that the
  autograd graph holds once the forward pass is done, read off the graph itself (every node's
  saved tensors), weights excluded. Deterministic: the same figure on every run and machine.
  (Saved-tensor hooks are not used to count: arc_peft switches its recompute off under them, as
  activation checkpointing needs.)
* **Peak growth**: CPU — the growth of the peak resident set over two training steps, in a fresh
  process per method forked from a server that imported torch once, with glibc told to serve and
  return every block over 64 KiB by ``mmap`` (the peak of live memory, not of the heap's
  fragmentation); CUDA — ``torch.cuda.max_memory_allocated`` over two steps.
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import multiprocessing as mp
import platform
import statistics
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from arc_peft.methods.lean import lean_disabled

# -- time -----------------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(
    fns: dict[str, Callable[[], Any]],
    repeats: int,
    warmup: int,
    device: torch.device,
    timer: str = "cpu",
) -> dict[str, list[float]]:
    """Seconds per call of every function; all run once per repeat, in a rotating order."""
    clock = time.process_time if timer == "cpu" and device.type == "cpu" else time.perf_counter
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            sync(device)
            start = clock()
            fns[name]()
            sync(device)
            times[name].append(clock() - start)
    return times


def median(values: list[float]) -> float:
    return statistics.median(values) if values else math.nan


def spread(values: list[float]) -> float:
    """Half the range between the fastest and slowest repeat, relative to the median."""
    if len(values) < 2:
        return 0.0
    return (max(values) - min(values)) / (2 * median(values))


# -- the steps measured ---------------------------------------------------------------------------


@contextlib.contextmanager
def precision(dtype: str, device: torch.device) -> Iterator[None]:
    """``fp32`` or ``bf16`` (autocast)."""
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bf16"):
        yield


def infer_fn(model: nn.Module, x: torch.Tensor, dtype: str = "fp32") -> Callable[[], Any]:
    model.eval()

    def run() -> Any:
        with torch.inference_mode(), precision(dtype, x.device):
            return model(x)

    return run


def train_step_fn(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    dtype: str = "fp32",
    grads_to_input: bool = False,
    lean: bool = True,
) -> Callable[[], None]:
    """One AdamW step on the trainable parameters (forward under autocast for ``bf16``)."""
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)

    def run() -> None:
        inp = x.detach().requires_grad_(True) if grads_to_input else x
        with contextlib.nullcontext() if lean else lean_disabled():
            with precision(dtype, x.device):
                loss = F.cross_entropy(model(inp).float(), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
        optimizer.step()

    return run


# -- memory ---------------------------------------------------------------------------------------


def saved_bytes(
    model: nn.Module, x: torch.Tensor, dtype: str, grads_to_input: bool, lean: bool = True
) -> int:
    """Bytes of distinct activation storage the graph of one training forward holds."""
    model.train()
    weights = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    inp = x.detach().requires_grad_(True) if grads_to_input else x
    with contextlib.nullcontext() if lean else lean_disabled(), precision(dtype, x.device):
        out = model(inp)
    seen: dict[int, int] = {}
    stack, visited = [out.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in visited:
            continue
        visited.add(node)
        values = [getattr(node, n) for n in dir(node) if n.startswith("_saved_")]
        values += list(getattr(node, "saved_tensors", ()))  # custom autograd Functions
        for value in values:
            for t in value if isinstance(value, (tuple, list)) else (value,):
                if isinstance(t, torch.Tensor):
                    storage = t.untyped_storage()
                    if storage.data_ptr() not in weights:
                        seen[storage.data_ptr()] = storage.nbytes()
        stack.extend(n for n, _ in node.next_functions)
    del out
    return sum(seen.values())


def compiled_saved_bytes(
    model: nn.Module, x: torch.Tensor, dtype: str, grads_to_input: bool, lean: bool = True
) -> int:
    """Bytes of activations a ``torch.compile`` training graph keeps for its backward pass, as
    inductor's partitioner chooses them (its decompositions and min-cut partition), without
    generating code: deterministic, and the same choice on every device. Counted: the backward
    graph's inputs that are neither the forward's inputs (weights, the image) nor gradients."""
    import functools

    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.partitioners import min_cut_rematerialization_partition
    from torch._inductor.decomposition import select_decomp_table

    total = 0

    def backward(gm: torch.fx.GraphModule, _: Any) -> Callable:
        nonlocal total
        for node in gm.graph.find_nodes(op="placeholder"):
            value = node.meta.get("val")
            if isinstance(value, torch.Tensor) and not node.name.startswith(
                ("primals", "tangents")
            ):
                total += value.numel() * value.element_size()
        return make_boxed_func(gm.forward)

    backend = aot_autograd(
        fw_compiler=lambda gm, _: make_boxed_func(gm.forward),
        bw_compiler=backward,
        partition_fn=functools.partial(min_cut_rematerialization_partition, compiler="inductor"),
        decompositions=select_decomp_table(),
    )
    torch._dynamo.reset()
    try:
        model.train()
        inp = x.detach().requires_grad_(True) if grads_to_input else x
        with contextlib.nullcontext() if lean else lean_disabled(), precision(dtype, x.device):
            out = torch.compile(model, backend=backend, fullgraph=True)(inp)
        out.float().sum().backward()  # the backward graph is compiled at its first run
    finally:
        torch._dynamo.reset()
    return total


def _read_status(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) / 1024.0
    raise OSError(f"{field} not in /proc/self/status")


def _use_live_allocator() -> None:
    """glibc: serve every block over 64 KiB by mmap and give it back on free, so the resident set
    follows live memory instead of the heap's high-water mark (fragmentation)."""
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD (setting it also stops glibc raising it)
    libc.mallopt(-1, 64 * 1024)  # M_TRIM_THRESHOLD


def step_peak_mib(step: Callable[[], None], device: torch.device) -> float:
    """Peak memory growth (MiB) over two calls of ``step`` (the first also allocates the
    gradients and the optimizer state)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        for _ in range(2):
            step()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    try:  # Linux >= 4.0: reset the peak so that building the model does not count
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return math.nan
    base = _read_status("VmRSS:")
    for _ in range(2):
        step()
    return _read_status("VmHWM:") - base


def _worker(job: dict, queue: Any) -> None:
    """Runs in a fresh process forked from the fork server."""
    try:
        torch.set_num_threads(job["threads"])
        _use_live_allocator()
        queue.put({"ok": True, "mib": step_peak_mib(job["make_step"](), torch.device("cpu"))})
    except BaseException as exc:  # report, do not leave the parent waiting
        queue.put({"ok": False, "error": f"{type(exc).__name__}: {exc}"})


_CONTEXT: Any = None


def fresh_peak_mib(make_step: Callable[[], Callable[[], None]], threads: int) -> float:
    """:func:`step_peak_mib` of the step ``make_step()`` builds, in a fresh process (a forked
    copy of this one would inherit its heap). ``make_step`` must be picklable."""
    global _CONTEXT
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return math.nan
    if _CONTEXT is None:
        _CONTEXT = mp.get_context("forkserver")
        _CONTEXT.set_forkserver_preload(["torch", "timm", "arc_peft"])
    queue = _CONTEXT.Queue()
    proc = _CONTEXT.Process(
        target=_worker, args=({"make_step": make_step, "threads": threads}, queue)
    )
    proc.start()
    try:
        result = queue.get(timeout=3600)
    finally:
        proc.join(timeout=60)
    if not result["ok"]:
        raise RuntimeError(f"memory worker failed: {result['error']}")
    return float(result["mib"])
