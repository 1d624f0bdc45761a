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
* the op's weight and bias (or ``None``) are the module's own parameters;
* every op reading the tensor runs inside the site's call (a block whose one norm feeds both
  attention and MLP, ViT-22B style, does not qualify), and the norm and the site each ran once.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch.nn.functional as F
from torch import Tensor

from .probe import Recording

__all__ = ["PreNorm", "pre_norm"]

_LAYER_NORM = inspect.signature(F.layer_norm)


@dataclass(frozen=True)
class PreNorm:
    """The LayerNorm module whose output is a site's input and nothing else's.

    Attributes:
        path: The norm module.
        eps: The ``eps`` its ``layer_norm`` op ran with.
        weight: The name of its weight parameter on the module (``"weight"``), or ``""``.
        bias: The name of its bias parameter on the module, or ``""``.
        arg_key: Where its input sits in its call: ``("arg", i)`` or ``("kw", name)``.
    """

    path: str
    eps: float
    weight: str
    bias: str
    arg_key: tuple[str, Any]


def pre_norm(rec: Recording, site_call: int, x: int, width: int) -> PreNorm | None:
    """The ``PreNorm`` writing tensor ``x``, the input of the call ``site_call``, or ``None``."""
    index = rec.producer.get(x)
    if index is None:
        return None
    op = rec.ops[index]
    norm = rec.calls[op.call]
    site = rec.calls[site_call]
    if op.name != "layer_norm" or op.outputs != [x] or norm.outputs != [x]:
        return None
    if not norm.inputs or op.inputs[:1] != [norm.inputs[0][1]]:
        return None  # not the module's own input
    for other in rec.ops[norm.start : norm.end]:
        # Anything else the module does must hand its tensor back unchanged (open_clip's
        # ``x.to(orig_type)``, a no-op in the probe); a real op in between is not the norm.
        if other is not op and not set(other.outputs) <= set(other.inputs):
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
    try:
        bound = _LAYER_NORM.bind(*op.args, **op.kwargs)
    except TypeError:
        return None
    bound.apply_defaults()
    shape, eps = bound.arguments["normalized_shape"], bound.arguments["eps"]
    if tuple(shape) != (width,) or not isinstance(eps, float):
        return None
    # The op's weight and bias by their names on the module (the record's names of the state
    # the op read): a tensor that is not the module's own parameter (or a nested one's) fails.
    prefix = f"{norm.path}." if norm.path else ""
    state = {id(t): n[len(prefix) :] for n, t in op.params if n.startswith(prefix)}
    names = []
    for key in ("weight", "bias"):
        value = bound.arguments[key]
        name = state.get(id(value), ".") if isinstance(value, Tensor) else ""
        if "." in name:
            return None
        names.append(name)
    return PreNorm(norm.path, eps, names[0], names[1], norm.inputs[0][0])
