"""What the adapters' memory-lean training paths share: keep for the backward pass only what the
frozen backbone keeps anyway, plus the ``N×r`` bottleneck. The autograd Functions themselves
live with their methods (``methods/arc.py``, ``methods/adaptmlp.py``).

Plain autograd through ARC, ``x + dropout(x·U·diag(s))·Uᵀ + b``, saves the adapter's input ``x``
(an ``N×D`` token tensor) for the gradient of ``U``, plus the bottleneck and the dropout noise.
The frozen backbone saves no such tensor: a frozen linear keeps no input. In a pre-norm block
``x`` is a LayerNorm's output, and the LayerNorm has already saved its own input and statistics
for its backward pass. So ARC's lean Function saves the bottleneck after dropout (``N×r``) and the
dropout mask (``N×r`` booleans), and computes the one term that needs ``x`` — ``xᵀ·∂a``, the
``D×r`` gradient of ``U·diag(s)`` — from the norm's saved tensors (``input_grad_product``):
nothing token-sized is kept. Where the norm's module is known (``know_norms``, called by
``inject_arc``: its ``eps``, which the autograd node does not keep) the norm's output is
recomputed by the norm op itself, one op giving the same values, then multiplied as plain
autograd multiplies it; otherwise the norm's mean and affine terms are folded into the GEMM (a
few more ops, nothing token-sized recomputed in float32). A recomputed token-sized tensor is
transient, made and freed in the backward pass. Where no norm produced ``x`` it
saves ``x`` too: still what the gradients of ``U, s, b`` need, and less than plain autograd.
AdaptMLP's does the same for AdaptMLP (it saves only its bottleneck after dropout,
whose sign also says where ReLU and dropout let a gradient through).

How the norm is found: by the autograd node that produced ``x``, not by module — a table of the
ops whose saved tensors determine their output (``_NORMS``), through any chain of
permutations and transposes (channels-first sites, ``LayerNorm2d``). ``x``'s node is only looked
at in the forward pass; its saved tensors are read in the backward pass, before the norm's own
backward frees them (the norm's node runs after every consumer of its output). An RMS norm is
a product of tensors its own backward keeps (``x``, its ``rsqrt`` and ``w``): recomputed by the
same products (``_product``), exactly, with no ``eps`` to know. Any other producer (windows
partitioned after the norm, a routed sub-batch of a mixed-task batch, a cast) takes the saving
path, keeping ``x`` as the GEMM reads it (its bfloat16 copy under autocast), and so does
everything under saved-tensor hooks (activation checkpointing, which recomputes the whole
region anyway).

The forward pass runs the same torch ops as the modules' own ``forward``, in the same order and
under the same autocast state (casting weights itself where autocast would, so that the backward
pass reuses the casts: ``autocast_dtype``), so its outputs are identical to the plain path's.
Both passes are written for few ops per site (each op is a kernel launch on a GPU, where an
eager step of a small adapter is bound by launches; ``benchmarks/opcount.py`` counts them):
dropout in one op where the fused kernel gives at::dropout's values (two on a CPU elsewhere:
its mask drawn as booleans, then applied) and its gradient in one (``dropout_backward``), the
norm's output in one, casts folded into ``out=`` and mixed-dtype
ops. Gradients agree to float rounding (``tests/test_lean.py``: gradcheck in float64, every
architecture). Without autograd the plain path runs. Under ``torch.compile`` the autograd graph
these Functions read does not exist; there the runtime folds the site's pre-norm into the
adapter instead (``Adapter.after_norm`` and ``normalized_down_product`` here), so that the
compiler's partitioner has no token-sized tensor of the adapter's own to save.
"""

from __future__ import annotations

import contextlib
import functools
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "LEAN",
    "SECOND_ORDER_ERROR",
    "BackwardCasts",
    "autocast_dtype",
    "dropout_backward",
    "dropout_with_mask",
    "first_order_only",
    "input_grad_product",
    "know_norms",
    "lean_applies",
    "lean_disabled",
    "norm_source",
    "normalized_down_product",
    "recompute_source",
]


class _Switch:
    """Whether ``ARC`` trains through the lean path (on by default)."""

    enabled: bool = True


LEAN = _Switch()


@contextlib.contextmanager
def lean_disabled() -> Iterator[None]:
    """Train through plain autograd inside this block (to compare the two paths)."""
    before, LEAN.enabled = LEAN.enabled, False
    try:
        yield
    finally:
        LEAN.enabled = before


def _layer_norm(node: Any) -> tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor | None]:
    # native_layer_norm saves (input, mean, rstd, weight, bias); mean/rstd keep the normalised
    # dim as size 1, so they broadcast against the input (and follow it through permutes).
    return (
        node._saved_input,
        node._saved_result1,
        node._saved_result2,
        node._saved_weight,
        node._saved_bias,
    )


# The autograd nodes of normalisations whose saved tensors determine their output, by the op's
# name (derivatives.yaml): each gives ``(x, mean, rstd, w, b)`` with output
# ``(x - mean)·rstd·w + b`` (``w``, ``b`` on the last axis, or None). The norm's own backward
# needs these saved tensors anyway, so keeping them costs nothing. (GroupNorm is not one: it does
# not save its bias, which its backward does not need.)
_NORMS: dict[str, Callable[[Any], tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor | None]]] = {
    "NativeLayerNormBackward0": _layer_norm,
}
# Pure layout changes between the norm and the adapter, replayed on the recomputed tensor.
_VIEWS: dict[str, Callable[[Any, Tensor], Tensor]] = {
    "PermuteBackward0": lambda node, y: y.permute(node._saved_dims),
    "TransposeBackward0": lambda node, y: y.transpose(node._saved_dim0, node._saved_dim1),
}


def _has_saved(node: Any, names: tuple[str, ...]) -> bool:
    # Looked up on the class: reading the attribute on the node would unpack the saved tensor,
    # which under activation checkpointing means recomputing the checkpointed region.
    return all(hasattr(type(node), f"_saved_{n}") for n in names)


_NEEDS = {
    "NativeLayerNormBackward0": ("input", "result1", "result2", "weight", "bias"),
    "MulBackward0": ("self", "other"),
    "PermuteBackward0": ("dims",),
    "TransposeBackward0": ("dim0", "dim1"),
}


def _product(node: Any, depth: int = 0) -> bool:
    """Whether ``node`` is a product (``MulBackward0``) whose output its saved tensors determine:
    each factor saved, or itself such a product. An RMS norm is one, ``(x·rsqrt(mean(x²)+eps))·w``
    as ``F.rms_norm``, timm's and Hugging Face's RMS norms compute it: the inner product keeps
    ``x`` and the ``rsqrt`` for its own backward, the outer one ``w`` (a frozen ``w`` needs no
    copy of the inner product). A factor autograd did not save needs a gradient, so it is the
    output of the node on its edge."""
    if type(node).__name__ != "MulBackward0" or depth > 3:
        return False
    for index, name in enumerate(("_saved_self", "_saved_other")):
        if getattr(node, name) is None:
            edge = node.next_functions[index]
            if edge[1] != 0 or not _product(edge[0], depth + 1):
                return False
    return True


def _product_value(node: Any) -> Tensor:
    """The output of a ``_product`` node, recomputed by the same products on the same tensors:
    the same values (a float product does not depend on its operands' order)."""
    factors = []
    for index, name in enumerate(("_saved_self", "_saved_other")):
        saved = getattr(node, name)
        if saved is None:
            saved = _product_value(node.next_functions[index][0])
        factors.append(saved)
    return torch.mul(*factors)


def _product_inputs(node: Any) -> list[Tensor]:
    """The saved tensors a ``_product`` node's recompute reads."""
    out = []
    for index, name in enumerate(("_saved_self", "_saved_other")):
        saved = getattr(node, name)
        out += [saved] if saved is not None else _product_inputs(node.next_functions[index][0])
    return out


def recompute_source(x: Tensor) -> tuple[Any, ...] | None:
    """The chain of autograd nodes (norm first, then layout changes) that recomputes ``x`` from
    tensors its producer saved anyway, or ``None`` when ``x`` was not produced that way (or the
    norm's channel axis does not end up last in ``x``, where the adapter reads channels). The
    producer: a LayerNorm (``_NORMS``), or a product of saved tensors (``_product``: RMS norms),
    which is recomputed exactly whatever its layout."""
    node, chain = x.grad_fn, []
    while node is not None:
        name = type(node).__name__
        if not _has_saved(node, _NEEDS.get(name, ("?",))):
            return None
        chain.append(node)
        if name == "MulBackward0":
            if not _product(node):
                return None
            chain.reverse()
            return tuple(chain)
        if name in _NORMS:
            if len(node._saved_normalized_shape) != 1:
                return None
            chain.reverse()
            return tuple(chain) if _channel_ends_last(chain[1:], x.dim()) else None
        if name not in _VIEWS:
            return None
        edges = node.next_functions
        if not edges or edges[0][1] != 0:
            return None
        node = edges[0][0]
    return None


def _channel_ends_last(views: list[Any], ndim: int) -> bool:
    axis = ndim - 1  # the norm normalises (and its affine acts on) its last axis
    for node in views:
        if type(node).__name__ == "PermuteBackward0":
            axis = [d % ndim for d in node._saved_dims].index(axis)
        else:
            pair = (node._saved_dim0 % ndim, node._saved_dim1 % ndim)
            axis = pair[1] if axis == pair[0] else pair[0] if axis == pair[1] else axis
    return axis == ndim - 1


def _saved_tensor_hooks_active() -> bool:
    """Whether saved tensors are being packed (activation checkpointing, CPU offloading): then
    reading the norm's saved input would unpack it a second time, which checkpointing forbids, so
    the input is saved instead (inside a checkpointed region nothing is kept anyway)."""
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    return top is None or top(False) is not None


class _KnownNorm:
    """A normalisation module found in an adapted model, by its weight: the autograd node of
    ``native_layer_norm`` keeps the op's input, statistics, weight and bias but not its ``eps``,
    which is read from the module holding that weight. ``checked``: per ``eps``, whether
    recomputing with it reproduced the saved statistics bit for bit (checked once: a module
    whose ``eps`` attribute is not what its forward passes gets the general path)."""

    __slots__ = ("checked", "module")

    def __init__(self, module: nn.Module) -> None:
        self.module = weakref.ref(module)
        self.checked: dict[float, bool] = {}


# By id(weight). An entry goes when its weight does (weakref.finalize), before the id can be
# reused, so an entry found by a live weight's id is that weight's.
_KNOWN_NORMS: dict[int, _KnownNorm] = {}


def know_norms(model: nn.Module) -> None:
    """Remember the normalisation modules of ``model`` (any module with a float ``eps`` and a
    ``weight`` parameter), so that a lean backward pass recomputes a norm's output in one op
    (``native_layer_norm`` with its ``eps``) instead of several. Called by ``inject_arc`` and
    ``freeze_backbone``; a norm not known (in a deep copy made after injecting, until
    ``freeze_backbone`` sees it) takes the general path: the same gradients, a few more ops."""
    for module in model.modules():
        eps, weight = getattr(module, "eps", None), getattr(module, "weight", None)
        if not isinstance(eps, float) or not isinstance(weight, nn.Parameter):
            continue
        known = _KNOWN_NORMS.get(id(weight))
        if known is not None:
            known.module = weakref.ref(module)
            continue
        _KNOWN_NORMS[id(weight)] = _KnownNorm(module)
        weakref.finalize(weight, _KNOWN_NORMS.pop, id(weight), None)


def _replay_views(chain: tuple[Any, ...], *tensors: Tensor) -> tuple[Tensor, ...]:
    """``tensors`` laid out as the adapter's input: the chain's layout changes replayed."""
    for node in chain[1:]:
        view = _VIEWS[type(node).__name__]
        tensors = tuple(view(node, t) for t in tensors)
    return tensors


def _recompute_output(chain: tuple[Any, ...]) -> Tensor | None:
    """The norm's output recomputed by the norm itself (one op, the same values; a product by
    its products), laid out as the adapter's input; ``None`` where a LayerNorm's ``eps`` is not
    known (``know_norms``)."""
    node = chain[0]
    if type(node).__name__ == "MulBackward0":
        return _replay_views(chain, _product_value(node))[0]
    x, mean, rstd, w, b = _NORMS[type(node).__name__](node)
    known = _KNOWN_NORMS.get(id(w)) if w is not None else None
    module = known.module() if known is not None else None
    eps = getattr(module, "eps", None) if getattr(module, "weight", None) is w else None
    if known is None or not isinstance(eps, float) or known.checked.get(eps) is False:
        return None
    out, mean2, rstd2 = torch.native_layer_norm(x, node._saved_normalized_shape, w, b, eps)
    if eps not in known.checked:
        known.checked[eps] = torch.equal(mean2, mean) and torch.equal(rstd2, rstd)
        if not known.checked[eps]:
            return None
    return _replay_views(chain, out)[0]


def _recompute_inputs(chain: tuple[Any, ...]) -> list[Tensor]:
    """The saved tensors the recompute of ``chain`` reads (its second derivatives run through
    them)."""
    node = chain[0]
    if type(node).__name__ == "MulBackward0":
        return _product_inputs(node)
    return [_NORMS[type(node).__name__](node)[0]]


def _recompute(chain: tuple[Any, ...]) -> tuple[Tensor, ...]:
    """The norm's ``(x, mean, rstd, w, b)`` laid out as the adapter's input."""
    x, mean, rstd, w, b = _NORMS[type(chain[0]).__name__](chain[0])
    return (*_replay_views(chain, x, mean, rstd), w, b)


def dropout_with_mask(a: Tensor, p: float) -> tuple[Tensor, Tensor]:
    """``nn.Dropout`` in training (the same random draws, so the same outputs) and the mask it
    drew, as booleans: a quarter of a float32 noise tensor to keep."""
    if a.device.type != "cpu":  # at::dropout runs the fused kernel off the CPU
        return torch.native_dropout(a, p, True)
    if p == 1:  # at::dropout's special case (the noise below would divide by zero)
        return a * a.new_zeros(()), torch.zeros_like(a, dtype=torch.bool)
    if a.numel() and _native_dropout_matches(p, a.dtype):
        # One op. On a CPU at::dropout takes its unfused path, but the fused op draws the same
        # booleans and multiplies by the same factor wherever the rounded factors agree.
        return torch.native_dropout(a, p, True)
    # at::dropout's CPU path draws ``bernoulli_(1 - p)`` into a float noise tensor, divides it
    # by ``1 - p`` and multiplies. The draws do not depend on the tensor's dtype, so they are
    # drawn straight into the boolean mask, and the mask applied with the noise's value in one
    # op (``dropout_backward``, which multiplies by the same rounded factor): two ops, not four,
    # the same values.
    mask = torch.empty_like(a, dtype=torch.bool).bernoulli_(1 - p)
    return dropout_backward(a, mask, p), mask


@functools.lru_cache(maxsize=64)
def _native_dropout_matches(p: float, dtype: torch.dtype) -> bool:
    """Whether ``native_dropout``'s CPU kernel gives ``at::dropout``'s values for ``p`` in
    ``dtype``. Both draw ``bernoulli_(1 - p)`` from the same generator; the fused op multiplies
    by ``1/(1-p)`` rounded to ``dtype`` as a product rounds it, at::dropout by its noise
    tensor's value, ``1`` divided by ``1 - p`` in ``dtype``. Where the two roundings agree the
    outputs are identical for every input (for bfloat16 and float16 always; for float32 at 0.1,
    the default, but not at about a quarter of all ``p``)."""
    one = torch.ones((), dtype=dtype)
    return bool(one.mul(1 / (1 - p)) == one.div(1 - p))


def autocast_dtype(t: Tensor) -> torch.dtype | None:
    """The dtype autocast casts ``t`` to for a GEMM here, or ``None`` (autocast off for its
    device, or ``t`` not eligible: autocast leaves float64 and non-float tensors alone)."""
    device = t.device.type
    try:
        enabled = torch.is_autocast_enabled(device)
    except RuntimeError:  # a device type autocast has no state for (meta): never enabled
        return None
    if not enabled or not t.is_floating_point():
        return None
    if t.dtype == torch.float64:
        return None
    return torch.get_autocast_dtype(device)


class _NormalizedDown(torch.autograd.Function):
    """``x̂ @ W`` in ``low`` precision (or ``x``'s), with ``x̂ = x`` (a LayerNorm's normalised
    input) or ``x̂ = x·scale`` (an RMS norm's input and its ``N×1`` ``rsqrt``), whose backward
    pass reads ``x`` itself: the gradient of ``W`` is computed in ``x``'s dtype from the tensor
    the norm's backward keeps. (A low-precision cast of ``x`` read there would be one more
    token-sized tensor to keep: the compiler merges the backward's cast with the forward's and
    saves it. So would be ``x·scale``, read by a GEMM: the compiler does not recompute a GEMM's
    operand. So the row scale is applied to the ``N×r`` side of each product instead.)"""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: Tensor, scale: Tensor | None, weight: Tensor, low: torch.dtype | None
    ) -> Tensor:
        ctx.save_for_backward(x, scale, weight)
        xw = x @ weight if low is None else x.to(low) @ weight.to(low)
        return xw if scale is None else xw * scale.to(xw.dtype)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x, scale, weight = ctx.saved_tensors
        grad_x = grad_scale = grad_w = None
        # x̂ = x·scale scales rows: (x·scale)ᵀ·g = xᵀ·(scale·g) and ∂x = (scale·g)·Wᵀ.
        scaled = grad if scale is None else grad * scale.to(grad.dtype)
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            grad_x = (scaled @ weight.to(grad.dtype).t()).to(x.dtype)
            if scale is not None and ctx.needs_input_grad[1]:
                # Σ_d (g·Wᵀ)[n,d]·x[n,d], from ∂x = scale·(g·Wᵀ) (scale, an rsqrt, is > 0):
                # transient token-sized products, where keeping x·W would add N×r per site.
                grad_scale = (grad_x * x).sum(-1, keepdim=True).div_(scale).to(scale.dtype)
        if ctx.needs_input_grad[2]:
            grad_w = (x.t() @ scaled.to(x.dtype)).to(weight.dtype)
        return grad_x, grad_scale, grad_w, None


def normalized_down_product(
    x_hat: Tensor,
    norm_weight: Tensor | None,
    norm_bias: Tensor | None,
    weight: Tensor,
    scale: Tensor | None = None,
) -> Tensor:
    """``(x̂·w + b) @ W``, a down projection of a norm's output, as ``x̂ @ (w∘W) + b @ W`` for
    ``x̂`` of shape ``N × D`` (a LayerNorm's normalised input; with ``scale``, ``N × 1``, an RMS
    norm's input, ``x̂`` being ``x_hat·scale``), the norm's ``w``, ``b`` (``D``, or ``None``) and
    ``W`` (``D × r``). The same product to float rounding, in the precision autocast would give
    it; its backward pass reads only what the norm's own backward keeps, where ``y @ W`` would
    keep ``y`` (or its cast) as well. For compiled training (``Adapter.after_norm``): there the
    compiler chooses what to save and cannot see this."""
    low = autocast_dtype(weight)
    folded = weight if norm_weight is None else weight * norm_weight.unsqueeze(1)
    a = _NormalizedDown.apply(x_hat, scale, folded, low)
    if norm_bias is None:
        return a
    with torch.autocast(x_hat.device.type, enabled=False):
        offset = norm_bias.to(weight.dtype) @ weight  # r values, in the weight's precision
    return a + offset.to(a.dtype)


class BackwardCasts:
    """The low-precision copy of a weight that several sites share (ARC's ``U``), made once per
    backward pass instead of once per site: each lean backward pass casts it for its GEMMs, and
    the sites sharing it run in the same backward pass. Kept for one backward pass only (keyed
    by autograd's graph task and the weight's version), so a weight changed between steps, in
    place or through ``.data``, is never read stale."""

    def __init__(self) -> None:
        self._entry: tuple[tuple[int, int, int, torch.dtype], Tensor] | None = None

    def cast(self, t: Tensor, dtype: torch.dtype) -> Tensor:
        """``t.to(dtype)``, cast at most once per backward pass."""
        if t.dtype == dtype:
            return t
        current = getattr(torch._C, "_current_graph_task_id", None)
        task = current() if current is not None else -1
        if task < 0:  # not in a backward pass (or a torch without the call): cast every time
            return t.to(dtype)
        key = (task, id(t), t._version, dtype)
        if self._entry is not None and self._entry[0] == key:
            return self._entry[1]
        low = t.to(dtype)
        self._entry = (key, low)
        return low

    def __getstate__(self) -> dict[str, Any]:
        return {}  # a cast belongs to one backward pass: never pickled or copied

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._entry = None


def dropout_backward(grad: Tensor, mask: Tensor, p: float) -> Tensor:
    """The gradient through ``dropout_with_mask``: ``grad`` where the mask kept a value, times
    the factor the forward pass multiplied by, in one op (three to rebuild the noise and
    multiply). The factor is the noise's value: ``1/(1-p)`` rounded to ``grad``'s dtype on a
    CPU, as at::dropout's noise tensor holds it (so the product is the one plain autograd
    computes); ``1/(1-p)`` elsewhere, as the fused kernel's own backward."""
    cpu = mask.device.type == "cpu"
    scale = _dropout_scale(p, grad.dtype if cpu else None)
    return torch.ops.aten.native_dropout_backward(grad, mask, scale)


@functools.lru_cache(maxsize=64)
def _dropout_scale(p: float, dtype: torch.dtype | None) -> float:
    """``1/(1-p)``, rounded to ``dtype`` as at::dropout's ``div_`` rounds it (computed once:
    not an op per call)."""
    if p == 1:
        return 0.0
    if dtype is None:
        return 1.0 / (1.0 - p)
    return torch.ones((), dtype=dtype).div_(1 - p).item()


def input_grad_product(
    source: tuple[Any, ...] | None,
    x_dtype: torch.dtype,
    flat: Tensor | None,
    da: Tensor,
    dim: int,
    da_sum: Tensor | None = None,
) -> Tensor:
    """``inputᵀ·da`` (``D×r``, possibly a transposed view), with the input saved or recomputed
    from its norm. The products on the norm's own input run as ``r×D`` (``daᵀ·input``, read
    transposed): the faster layout for these shapes. ``da_sum``: ``da.sum(0)`` where the caller
    computes it anyway (a bias gradient), reused for the norm's bias term: one op less."""
    if flat is None:
        recomputed = _recompute_output(source)
        if recomputed is not None:
            # The norm's output again (cast as autocast casts it for the forward's GEMM), then
            # the product plain autograd computes on it, as r×D.
            flat = recomputed.to(x_dtype).reshape(-1, dim).to(da.dtype)
            return (da.t() @ flat).t()
        x, mean, rstd, w, b = _recompute(source)
        if x.dtype == mean.dtype:  # the norm ran in its input's precision (float32)
            x, mean, rstd = x.reshape(-1, dim), mean.reshape(-1, 1), rstd.reshape(-1, 1)
            # input = (x - mean)·rstd·w + b, so per channel d and column k
            #   Σ_n input[n,d]·da[n,k] = w[d]·Σ_n (x[n,d] - mean[n])·rstd[n]·da[n,k]
            #                            + b[d]·Σ_n da[n,k]:
            # one GEMM on the norm's own input, w and b applied to the D×r result.
            if da.dtype == x.dtype and x.dtype.itemsize >= 4:
                # The mean's term as a second, 1×r product, subtracted inside the GEMM:
                # nothing token-sized recomputed.
                scaled = da * rstd
                out = torch.addmm(scaled.t() @ mean, scaled.t(), x, beta=-1).t()
            else:
                # Autocast: the GEMM in da's precision, as plain autograd's on its low-precision
                # copy of the input (three times faster than in float32). The input is centred
                # in its own precision before it is rounded (a transient token-sized tensor,
                # never saved): rounding x itself would lose the difference to the mean where
                # the mean is large against the deviation. Each is computed in the wider
                # precision and rounded as it is written (``out=``): one op, not two.
                centred = torch.sub(x, mean, out=x.new_empty(x.shape, dtype=da.dtype))
                scaled = torch.mul(da, rstd, out=da.new_empty(da.shape))
                out = (scaled.t() @ centred).t()
                wide = torch.promote_types(rstd.dtype, da.dtype)
                # Widened as w multiplies it (mixed-dtype op): one op where a cast and an
                # in-place product are two, the same values.
                out = out.to(wide) if w is None else torch.mul(out, w[:, None].to(wide))
                w = None
            if w is not None:
                out.mul_(w[:, None])
            if b is not None:
                out.addr_(b, da.sum(0, dtype=out.dtype) if da_sum is None else da_sum)
            return out
        # Another precision: rebuild the input as the norm output it (then cast like autocast).
        flat = (x - mean).mul_(rstd)
        flat = flat * w if w is not None else flat
        flat = (flat + b if b is not None else flat).to(x_dtype).reshape(-1, dim)
    return flat.to(da.dtype).t() @ da  # as plain autograd computes it


def lean_applies(x: Tensor, params: tuple[Tensor, ...]) -> bool:
    """Whether a lean Function should run: autograd records, not compiling, switched on, and
    something needs a gradient."""
    if not LEAN.enabled or not torch.is_grad_enabled() or torch.compiler.is_compiling():
        return False
    return x.requires_grad or any(p.requires_grad for p in params)


def norm_source(x: Tensor) -> tuple[Any, ...] | None:
    """What a lean Function keeps instead of its input ``x``: the autograd chain recomputing ``x``
    from its norm's saved tensors (``recompute_source``), or ``None`` to save ``x`` itself (no
    such norm, or saved-tensor hooks are packing)."""
    if not x.requires_grad or _saved_tensor_hooks_active():
        return None
    return recompute_source(x)


SECOND_ORDER_ERROR = (
    "arc_peft: a second derivative (autograd.grad(..., create_graph=True), then a backward pass "
    "through its result: a gradient penalty, MAML) reached the memory-lean training path of an "
    "adapter, whose backward pass is not differentiable. Run that forward pass under "
    "arc_peft.methods.lean.lean_disabled() (plain autograd), which differentiates twice exactly"
)


class _SecondOrderRefused(torch.autograd.Function):
    """Passes the lean backward's gradients on; differentiating them again raises. Its inputs
    include what the gradients truly depend on, so that any second backward pass that needs
    them reaches this node (autograd skips nodes with no path to the inputs asked for)."""

    @staticmethod
    def forward(ctx: Any, links: int, *tensors: Tensor) -> tuple[Tensor, ...]:  # type: ignore[override]
        return tuple(g.clone() for g in tensors[links:])

    @staticmethod
    def backward(ctx: Any, *grads: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        raise RuntimeError(SECOND_ORDER_ERROR)


def first_order_only(backward: Callable[..., tuple[Tensor | None, ...]]) -> Callable[..., Any]:
    """Decorates a lean Function's ``backward``. It computes its gradients from tensors its
    forward pass produced outside autograd, so differentiating them again would silently miss
    terms (0.065 off a gradient penalty through a ViT). Under ``create_graph=True`` (grad mode
    on in the backward pass) the gradients are computed as usual and tied to a node that
    raises if a second backward pass reaches it; first derivatives are unaffected. The
    Function's ``ctx.source`` is the norm chain its input is recomputed from (or ``None``)."""

    @functools.wraps(backward)
    def wrapped(ctx: Any, *grads: Tensor) -> tuple[Tensor | None, ...]:
        if not torch.is_grad_enabled():
            return backward(ctx, *grads)
        with torch.no_grad():
            out = backward(ctx, *grads)
        tensors = [g for g in out if g is not None]
        if not tensors:
            return out
        # Linked to: the incoming gradients, the saved inputs and the norm input the adapter's
        # input is recomputed from (every path a second derivative can take through this
        # node), and a fresh leaf so that the outputs require grad in any case.
        source = getattr(ctx, "source", None)
        norm_input = _recompute_inputs(source) if source is not None else ()
        links = [torch.zeros((), requires_grad=True)] + [
            t
            for t in (*grads, *ctx.saved_tensors, *norm_input)
            if isinstance(t, Tensor) and t.requires_grad
        ]
        tied = iter(_SecondOrderRefused.apply(len(links), *links, *tensors))
        return tuple(None if g is None else next(tied) for g in out)

    return wrapped
