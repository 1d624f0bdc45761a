"""Which norm writes a site's input: the pre-norm a compiled training step folds into the adapter.

An input adapter reading a LayerNorm's output ``y = x̂·w + b`` needs ``y`` for the gradient of its
down projection. Eager training recovers it from the norm's own saved tensors
(``methods/lean.py``); under ``torch.compile`` the partitioner decides what is saved, and keeps a
second token-sized tensor per site (``y``, or its low-precision cast) next to the ``x̂`` the
norm's backward keeps anyway. Given the norm itself, the adapter can read ``x̂`` instead
(``Adapter.after_norm``), so nothing token-sized is added. That is only exact where the norm's
output *is* the site's input and nothing else reads it, which is what this module checks, on
the probe's record:

* the site's input tensor is the whole output of one module call, which ran one ``layer_norm``
  op, on that call's own input, over the last axis (the channels), and nothing else that makes
  a new tensor (a cast back to the input's dtype, the identity in the probe, is allowed);
* or an RMS norm over the last axis: one ``rms_norm`` op likewise, or the ops timm's and
  Hugging Face's RMS norms write out, ``x·rsqrt(mean(x², -1) + eps)`` then ``·w``, each reading
  what the one before made (a structure, whatever the module is called);
* the op's weight and bias (or ``None``) are the module's own parameters;
* every op reading the tensor runs inside the site's call (a block whose one norm feeds both
  attention and MLP, ViT-22B style, does not qualify), and the norm and the site each ran once.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .probe import Op, Recording

__all__ = ["PreNorm", "pre_norm"]

_LAYER_NORM = inspect.signature(F.layer_norm)
_RMS_NORM = inspect.signature(F.rms_norm)


@dataclass(frozen=True)
class PreNorm:
    """The LayerNorm or RMS norm module whose output is a site's input and nothing else's.

    Attributes:
        path: The norm module.
        eps: The ``eps`` its op ran with (``None``: ``F.rms_norm``'s default).
        weight: The name of its weight parameter on the module (``"weight"``), or ``""``.
        bias: The name of its bias parameter on the module, or ``""``.
        arg_key: Where its input sits in its call: ``("arg", i)`` or ``("kw", name)``.
        kind: ``"layer_norm"`` or ``"rms_norm"``.
    """

    path: str
    eps: float | None
    weight: str
    bias: str
    arg_key: tuple[str, Any]
    kind: str = "layer_norm"

    def normalized(self, x: Tensor, width: int) -> tuple[Tensor, Tensor | None]:
        """``(x̂, None)``, ``x̂`` the norm of ``x`` without its weight and bias so that its output
        is ``x̂·weight + bias``; for an RMS norm ``(x, r)`` with ``x̂ = x·r``, ``r`` its ``N×1``
        ``rsqrt`` (the product left to the reader, whose backward keeps ``x`` and ``r``, as the
        norm's does, rather than ``x̂``)."""
        if self.kind == "rms_norm":
            eps = torch.finfo(x.dtype).eps if self.eps is None else self.eps
            return x, torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        return F.layer_norm(x, (width,), None, None, self.eps), None  # type: ignore[arg-type]


def pre_norm(rec: Recording, site_call: int, x: int, width: int) -> PreNorm | None:
    """The ``PreNorm`` writing tensor ``x``, the input of the call ``site_call``, or ``None``."""
    index = rec.producer.get(x)
    if index is None:
        return None
    op = rec.ops[index]
    norm = rec.calls[op.call]
    site = rec.calls[site_call]
    if op.outputs != [x] or norm.outputs != [x] or not norm.inputs:
        return None
    x_in = norm.inputs[0][1]
    written = _rms_written_out(rec, op, x_in)
    if written is None and (op.name not in ("layer_norm", "rms_norm") or op.inputs[:1] != [x_in]):
        return None  # not a norm, or not of the module's own input
    ops = {op.index} if written is None else {o.index for o in written[0]}
    for other in rec.ops[norm.start : norm.end]:
        # Anything else the module does must hand its tensor back unchanged (open_clip's
        # ``x.to(orig_type)``, a no-op in the probe); a real op in between is not the norm.
        if other.index not in ops and not set(other.outputs) <= set(other.inputs):
            return None
    if rec.shapes[x][-1:] != (width,):
        return None
    for i in rec.consumers.get(x, ()):
        inside_norm = norm.start <= i < norm.end and set(rec.ops[i].outputs) <= {x}
        if not (site.start <= i < site.end or inside_norm):
            return None  # something besides the site reads the norm's output
    if sum(c.module is norm.module for c in rec.calls) != 1:
        return None
    if sum(c.module is site.module for c in rec.calls) != 1:
        return None
    if written is not None:
        _, eps, weight, kind = written
        arguments = {"weight": weight, "bias": None}
    else:
        kind = op.name
        try:
            bound = (_LAYER_NORM if kind == "layer_norm" else _RMS_NORM).bind(*op.args, **op.kwargs)
        except TypeError:
            return None
        bound.apply_defaults()
        arguments = {"bias": None, **bound.arguments}
        eps = arguments["eps"]
        if tuple(arguments["normalized_shape"]) != (width,):
            return None
    if not isinstance(eps, float) and not (kind == "rms_norm" and eps is None):
        return None
    # The op's weight and bias by their names on the module (the record's names of the state
    # the op read): a tensor that is not the module's own parameter (or a nested one's) fails.
    prefix = f"{norm.path}." if norm.path else ""
    params = [p for o in (written[0] if written is not None else [op]) for p in o.params]
    state = {id(t): n[len(prefix) :] for n, t in params if n.startswith(prefix)}
    names = []
    for key in ("weight", "bias"):
        value = arguments[key]
        name = state.get(id(value), ".") if isinstance(value, Tensor) else ""
        if "." in name:
            return None
        names.append(name)
    return PreNorm(norm.path, eps, names[0], names[1], norm.inputs[0][0], kind)


def _rms_written_out(
    rec: Recording, last: Op, x_in: int
) -> tuple[list[Op], float, Tensor | None, str] | None:
    """``(ops, eps, weight, "rms_norm")`` where ``last`` ends an RMS norm of tensor ``x_in``
    written out as timm's and Hugging Face's are: ``pow(x, 2)``, ``mean`` over the last axis
    keeping it, ``+ eps``, ``rsqrt``, ``x · r``, then ``· w`` (a parameter) or not. By the data
    flow, each op reading the one before; ``None`` for anything else."""

    def made(tid: int, name: str) -> Op | None:
        index = rec.producer.get(tid)
        found = rec.ops[index] if index is not None else None
        return found if found is not None and found.name == name else None

    if last.name != "mul":
        return None
    ops, weight = [last], None
    if len(last.inputs) == 1 and len(last.params) == 1:  # · w, then the normalised x
        weight = last.params[0][1]
        scaled = made(last.inputs[0], "mul")
        if scaled is None:
            return None
        ops.append(scaled)
    scaled = ops[-1]
    if len(scaled.inputs) != 2 or scaled.params or x_in not in scaled.inputs:
        return None
    r = scaled.inputs[1] if scaled.inputs[0] == x_in else scaled.inputs[0]
    rsqrt = made(r, "rsqrt")
    plus = made(rsqrt.inputs[0], "add") if rsqrt is not None and rsqrt.inputs else None
    if plus is None or len(plus.inputs) != 1 or len(plus.args) != 2:  # v + eps
        return None
    eps = plus.args[1]
    mean = made(plus.inputs[0], "mean")
    square = made(mean.inputs[0], "pow") if mean is not None and mean.inputs else None
    if square is None or square.inputs != [x_in] or square.args[1:] != (2,):
        return None
    dims = mean.kwargs.get("dim", mean.args[1] if len(mean.args) > 1 else None)
    dims = tuple(dims) if isinstance(dims, (list, tuple)) else (dims,)
    ndim = len(rec.shapes[x_in])
    if [d % ndim for d in dims if isinstance(d, int)] != [ndim - 1] or len(dims) != 1:
        return None
    if not mean.kwargs.get("keepdim", len(mean.args) > 2 and mean.args[2]):
        return None
    if not isinstance(eps, (int, float)) or isinstance(eps, bool):
        return None
    return [*ops, rsqrt, plus, mean, square], float(eps), weight, "rms_norm"
