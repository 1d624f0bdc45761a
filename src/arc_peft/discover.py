"""Finding where adapters go, on architectures nobody registered: sites from one recorded forward.

The structure every vision transformer shares, read off a :class:`~arc_peft.probe.Recording`:

* **Attention** is an op that mixes tokens by their content: ``scaled_dot_product_attention``,
  ``multi_head_attention_forward``, or a product of two activations (``q @ kᵀ``, ``attn @ v``).
  Its *input* is the latest tensor that the queries, keys and values are all computed from
  through a learned layer. When no such tensor exists (the queries are a learned latent, or come
  from another stream) it is attention pooling or cross-attention: left out, and said so.
* The attention **site** is the outermost module called with that input, so the adapter sits on
  the branch (after the block's norm, before the projections) exactly as in the paper.
* An **MLP** is what follows the attention inside the same block: a linear / 1×1 layer from width
  ``D`` through a nonlinearity to a layer that maps back to ``D``. Its site reads its input at
  the outermost module called with the first layer's input and adds its output at the outermost
  module returning the last layer's output: one module (timm ``Mlp``) or two (Hugging Face
  ``intermediate`` / ``output``).
* The **channel axis** comes from the layer that reads the input: last for a linear, 1 for a
  convolution (channels-first hybrids).
* A **block** is a run of attention sites followed by the MLP sites after them.

Registered targets (:func:`arc_peft.register_target`) are the override: a module of a registered
type is a site of that position whatever the probe concluded.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .errors import UnsupportedModelError
from .probe import Recording, record
from .targets import get_target
from .zoo import example_input

__all__ = ["LeftOut", "Site", "SitePlan", "discover"]

_MATMULS = {"matmul", "bmm", "einsum", "baddbmm"}
_ATTENTION = {"scaled_dot_product_attention", "multi_head_attention_forward"}
_LAYERS = {"linear", "conv1d", "conv2d", "conv3d"}
# Parameterised ops that mix channels: what "through a learned layer" means for the queries, keys
# and values (a norm's affine, a learned bias or scale is parameterised too, but is no projection).
_PROJECTIONS = _LAYERS | _MATMULS | {"addmm", "mm", "multi_head_attention_forward"}
# Ops that move or select tokens but leave each token's channel vector as it is: a per-token map
# of the channels (ARC, its merged form) commutes with them.
SHAPE_OPS = {
    "view", "reshape", "flatten", "unflatten", "permute", "transpose", "contiguous", "unsqueeze",
    "squeeze", "getitem", "movedim", "__get__", "to", "type_as", "float", "clone", "expand",
    "chunk", "split", "unbind", "narrow", "select", "roll", "index_select", "view_as",
    "reshape_as", "flip", "tensor_split", "swapaxes", "mT",
}  # fmt: skip
# For *placing* an adapter on a module's input, zero padding is transparent as well: the padded
# tokens are not adapted, exactly as if the adapter ran inside just before the layers. (For
# merging it is not: a merged bias would reach the padded tokens; see fold.py.)
PLACEMENT_OPS = SHAPE_OPS | {"pad"}
_NONLINEAR = {
    "gelu", "relu", "relu_", "silu", "silu_", "sigmoid", "tanh", "hardswish", "hardswish_",
    "hardsigmoid", "leaky_relu", "elu", "mish", "softplus", "glu", "relu6", "hardtanh",
    "hardtanh_", "erf", "softmax", "star_relu", "squared_relu", "abs", "quick_gelu",
}  # fmt: skip


@dataclass(frozen=True)
class Site:
    """One place an adapter attaches.

    Attributes:
        position: ``"attn"`` or ``"mlp"``.
        path: The module whose input the adapter reads (and, for ARC, replaces).
        output_path: The module whose output receives an output adapter's (AdaptMLP's) term;
            usually ``path`` itself, a later sibling for two-ended MLPs.
        width: Channels ``D`` of the input.
        axis: The channel axis of the input: ``-1`` (tokens, channels last) or ``1``
            (channels first, ``N, C, H, W``).
        arg_keys: Where the input sits in the module's call: ``("arg", i)`` / ``("kw", name)``;
            several when the same tensor is passed more than once (``attn(x, x, x)``).
        block: Index of the block (a run of attention sites and the MLPs after them).
        kind: The module class, for messages.
        batch_axis: The axis of the input that holds the samples: ``0``, or ``1`` for
            sequence-first inputs (``nn.MultiheadAttention(batch_first=False)``: ``L, N, E``).
            A mixed-task batch routes samples along it.
    """

    position: str
    path: str
    output_path: str
    width: int
    axis: int
    arg_keys: tuple[tuple[str, Any], ...]
    block: int
    kind: str
    batch_axis: int = 0


@dataclass(frozen=True)
class LeftOut:
    """An attention module that gets no adapter, and why."""

    path: str
    kind: str
    reason: str
    on_purpose: bool  # pooling / cross-attention / excluded by the user: not an error


@dataclass
class SitePlan:
    """Everything discovery found in a model."""

    sites: list[Site]
    left_out: list[LeftOut] = field(default_factory=list)
    num_blocks: int = 0

    def summary(self) -> str:
        """One line per position and a line per module left out, for messages and docs."""
        lines = []
        for position in ("attn", "mlp"):
            chosen = [s for s in self.sites if s.position == position]
            kinds = sorted({s.kind for s in chosen})
            label = "attention" if position == "attn" else "MLP"
            lines.append(f"{label} sites: {len(chosen)} ({', '.join(kinds) or 'none'})")
        for item in self.left_out:
            lines.append(f"left out: {item.path} ({item.kind}): {item.reason}")
        return "\n".join(lines)


def _kind(module: nn.Module) -> str:
    cls = type(module)
    return f"{cls.__module__}.{cls.__qualname__}"


class _Finder:
    def __init__(self, rec: Recording) -> None:
        self.rec = rec

    # -- helpers -----------------------------------------------------------------------------

    def call_of_tensor(self, tid: int, around: int) -> int | None:
        """The innermost call enclosing op-context ``around`` whose main input is ``tid``, or
        reaches it through shape ops (and zero padding) only; failing that, the one module call
        that reads ``tid`` as its input (a ``qkv`` linear called inside the attention).

        Innermost, because in a post-norm block the attention's input is the residual stream,
        which is also the input of the block and of the stage around it."""
        best = None
        for call in self.rec.enclosing(around):
            main = self.rec.calls[call].main_input
            if main is not None and (main == tid or tid in self.shape_closure(main, True)):
                best = call
                break
        if best is None:
            readers = {
                c.index
                for c in self.rec.calls
                if c.main_input == tid and self.rec.contains(around, c.index)
            }
            if len(readers) == 1 and len(self.readers(tid)) == 1:
                reader = readers.pop()
                # it projects the input itself (a qkv linear), not just normalises it
                if any(
                    self.projects(self.rec.ops[i])
                    and self.rec.contains(reader, self.rec.ops[i].call)
                    for i in self.readers(tid)
                ):
                    best = reader
        return best

    def shape_closure(self, tid: int, placement: bool = False) -> set[int]:
        """``tid`` and everything computed from it by shape ops alone."""
        allowed = PLACEMENT_OPS if placement else SHAPE_OPS
        seen, todo = {tid}, [tid]
        while todo:
            for index in self.rec.consumers.get(todo.pop(), ()):
                op = self.rec.ops[index]
                if op.name in allowed and not op.params:
                    for out in op.outputs:
                        if out not in seen:
                            seen.add(out)
                            todo.append(out)
        return seen

    def readers(self, tid: int, stop: int | None = None, placement: bool = False) -> list[int]:
        """Indices of the ops that read ``tid`` (through shape ops) and are not shape ops."""
        allowed = PLACEMENT_OPS if placement else SHAPE_OPS
        found = []
        for t in self.shape_closure(tid, placement):
            for index in self.rec.consumers.get(t, ()):
                op = self.rec.ops[index]
                if stop is not None and index >= stop:
                    continue
                if not (op.name in allowed and not op.params):
                    found.append(index)
        return sorted(set(found))

    def layer_width(self, index: int) -> tuple[int, str] | None:
        """``(input channels, "linear" | "conv" | "mha")`` of a reading layer op."""
        op = self.rec.ops[index]
        if op.name == "multi_head_attention_forward":
            return self.rec.shapes[op.inputs[0]][-1], "mha"
        if op.name not in _LAYERS or not op.params:
            return None
        weight = op.params[0][1]
        if op.name == "linear":
            return int(weight.shape[1]), "linear"
        groups = op.args[6] if len(op.args) > 6 else op.kwargs.get("groups", 1)
        return int(weight.shape[1]) * int(groups), "conv"

    def axis_of(self, tid: int, width: int, layer: str, direct: bool) -> int | None:
        shape = self.rec.shapes[tid]
        if len(shape) < 2:
            return None
        first, last = (len(shape) > 2 and shape[1] == width), shape[-1] == width
        # A layer reading the input directly says where its channels are; through reshapes
        # (channels-first input flattened for a linear) prefer the channels-first axis.
        channels_last = direct and layer in ("linear", "mha")
        order = (-1, 1) if channels_last else (1, -1)
        for axis in order:
            if (axis == -1 and last) or (axis == 1 and first):
                return axis
        return None

    def input_layout(
        self, tid: int, stop: int, seen: set[int] | None = None
    ) -> tuple[int, int] | None:
        """``(width, channel axis)`` of an input from the first layer reading it."""
        seen = set() if seen is None else seen
        seen.add(tid)
        direct = {i for i in self.rec.consumers.get(tid, ())}
        same_shape = []  # per-element / per-token ops before the layers: a norm, a clamp
        for index in self.readers(tid, stop, placement=True):
            found = self.layer_width(index)
            if found is None:
                op = self.rec.ops[index]
                shapes = {self.rec.shapes.get(t) for t in op.inputs[:1] + op.outputs[:1]}
                if op.outputs and len(shapes) == 1:
                    same_shape.append(op.outputs[0])
                continue
            width, layer = found
            axis = self.axis_of(tid, width, layer, index in direct)
            if axis is not None:
                return width, axis
        # split into channel groups before the layers (one projection per head): the layer's
        # kind says the axis, the input's size on it the width
        shape = self.rec.shapes[tid]
        for index in self.readers(tid, stop, placement=True):
            found = self.layer_width(index)
            if found is None or len(shape) < 3:
                continue
            width, layer = found
            axis = -1 if layer in ("linear", "mha") else 1
            if shape[axis] % width == 0 and shape[axis] > width:
                return shape[axis], axis
        # normalised (or clamped) inside the module before its first layer: the layer reading
        # that output says; when that reads a slice of the channels (SHViT's partial attention),
        # the input's size on the channel axis is the width
        for out in same_shape:
            if out not in seen:
                found = self.input_layout(out, stop, seen)
                if found is None:
                    continue
                width, axis = found
                inner = self.rec.shapes[out]
                if len(inner) == len(shape) and shape[axis] > width:
                    others = [d for n, d in enumerate(shape) if n != axis % len(shape)]
                    if others == [d for n, d in enumerate(inner) if n != axis % len(inner)]:
                        return shape[axis], axis
                return found
        return None

    # -- attention ---------------------------------------------------------------------------

    def is_attention(self, index: int) -> bool:
        return bool(self.operands(index))

    def operands(self, index: int) -> list[int]:
        """The activations attention op ``index`` combines (queries, keys, values); empty when
        the op is no attention."""
        op = self.rec.ops[index]
        fi = self.rec.from_input
        if op.name in _ATTENTION:
            return list(op.inputs[:3])
        if op.name in _MATMULS and not op.params and len(op.inputs) >= 2:
            a, b = op.inputs[-2], op.inputs[-1]
            return [a, b] if a in fi and b in fi and len(self.rec.shapes[a]) >= 3 else []
        if op.name == "sum" and op.inputs and not op.params:
            return self.separable(index)
        return []

    def separable(self, index: int) -> list[int]:
        """Separable (linear-cost) attention, MobileViTv2's: ``sum(softmax(q) * k)`` over the
        tokens, with ``q`` and ``k`` activations: ``[scores, keys]``."""
        rec = self.rec
        total = rec.ops[index]
        mul = rec.producer.get(total.inputs[0])
        if mul is None or rec.ops[mul].name != "mul" or len(rec.ops[mul].inputs) != 2:
            return []
        pair = list(rec.ops[mul].inputs)
        if not all(t in rec.from_input for t in pair):
            return []
        for t in pair:
            source = self._through_pass(t)
            soft = rec.producer.get(source)
            if soft is None or rec.ops[soft].name != "softmax":
                continue
            rank = len(rec.shapes[total.inputs[0]])
            dims = {_dim(rec.ops[soft], rank), _dim(total, rank)}
            if len(dims) == 1 and None not in dims:
                return pair
        return []

    def _through_pass(self, tid: int) -> int:
        """``tid``, followed back through dropout and shape ops to where it was computed."""
        while True:
            producer = self.rec.producer.get(tid)
            if producer is None:
                return tid
            op = self.rec.ops[producer]
            if op.name not in ("dropout", "contiguous", "clone") or not op.inputs:
                return tid
            tid = op.inputs[0]

    def attention_inputs(self, index: int) -> list[int]:
        """The tensors every operand of attention op ``index`` is computed from through a learned
        projection, latest first, within the innermost enclosing call that has any; empty for
        pooling / cross-attention."""
        op = self.rec.ops[index]
        operands = self.operands(index)
        wanted = len(operands)
        operands = [t for t in operands if t in self.rec.from_input]
        if not operands or len(operands) < wanted:
            return []
        for call in self.rec.enclosing(op.call):
            main = self.rec.calls[call].main_input
            floor = (main - 1) if main is not None else -1
            common = set.intersection(*(self.rec.ancestors(t, floor) for t in operands))
            found = []
            for candidate in sorted(common & self.rec.from_input, reverse=True):
                through = self.rec.descendants(candidate, stop=index, learned=self.projects)
                ok = all(
                    (t == candidate and bool(op.params)) or through.get(t, False) for t in operands
                )
                if ok:
                    found.append(candidate)
            if found:
                return found
            # Queries from another stream of the same image (a global query passed in), keys and
            # values from this call's input: self-attention over that input.
            keys = operands[1:]
            if main is not None and all(
                self.rec.descendants(main, stop=index, learned=self.projects).get(t, False)
                for t in keys
            ):
                return [main]
        return []

    def attention_site(self, index: int) -> tuple[int | None, int | None]:
        """``(input tid, site call)`` of attention op ``index``: the latest common input of its
        operands that a module takes (see :meth:`call_of_tensor`); ``(None, None)`` for pooling
        and cross-attention, ``(tid, None)`` when no module takes any such input."""
        candidates = self.attention_inputs(index)
        around = self.rec.ops[index].call
        for x in candidates:
            call = self.call_of_tensor(x, around)
            if call is not None and call != 0:
                return x, call
        return (candidates[0] if candidates else None), None

    # -- MLPs --------------------------------------------------------------------------------

    def projects(self, op: Any) -> bool:
        """Whether parameterised op ``op`` is a learned projection: it mixes channels."""
        return op.name in _PROJECTIONS and (op.name not in _LAYERS or self.mixes_channels(op.index))

    def mixes_channels(self, index: int) -> bool:
        """Whether layer op ``index`` mixes channels: a linear or an ungrouped convolution (a
        depthwise convolution mixes tokens, as a positional encoding or local mixer does)."""
        op = self.rec.ops[index]
        if op.name == "linear":
            return True
        groups = op.args[6] if len(op.args) > 6 else op.kwargs.get("groups", 1)
        return int(groups) == 1

    def mlp_after(self, layer: int, end: int, block: int) -> int | None:
        """The op that closes an MLP opened by layer op ``layer``: reached through a
        nonlinearity, mapping back to the first layer's input width, inside call ``block``."""
        rec = self.rec
        first = rec.ops[layer]
        found = self.layer_width(layer)
        if found is None:
            return None
        width = found[0]
        start = first.outputs[0]
        flags = {start: False}
        todo = [start]
        best = None
        while todo:
            current = todo.pop()
            for index in rec.consumers.get(current, ()):
                if index >= end or not rec.contains(block, rec.ops[index].call):
                    continue
                op = rec.ops[index]
                flag = (
                    flags[current]
                    or op.name in _NONLINEAR
                    or (op.name == "mul" and len(op.inputs) == 2)
                )
                if (
                    flag
                    and op.name in _LAYERS
                    and op.params
                    and self.mixes_channels(index)
                    and int(op.params[0][1].shape[0]) == width
                    and (best is None or index < best)
                ):
                    best = index
                    continue
                for out in op.outputs:
                    if out not in flags or (flag and not flags[out]):
                        flags[out] = flag
                        todo.append(out)
        return best


def _dim(op: Any, rank: int) -> int | None:
    """The (non-negative) ``dim`` argument of a softmax / sum op, ``None`` if not one int."""
    dim = op.args[1] if len(op.args) > 1 else op.kwargs.get("dim")
    if isinstance(dim, (list, tuple)) and len(dim) == 1:
        dim = dim[0]
    return dim % rank if isinstance(dim, int) else None


def _paths_match(path: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(path, p) for p in patterns)


def discover(model: nn.Module, example: Any = None) -> SitePlan:
    """Run one probe forward of ``model`` and return every adapter site it has.

    Args:
        model: The backbone.
        example: An input to probe with (a tensor, a tuple of arguments or a dict of keyword
            arguments); default: an image batch of the size the model says it takes.

    Raises:
        UnsupportedModelError: the probe forward failed, or the model has no self-attention.
    """
    if example is None:
        example = example_input(model)
    try:
        rec = record(model, example)
    except Exception as exc:
        shape = tuple(example.shape) if hasattr(example, "shape") else type(example).__name__
        raise UnsupportedModelError(
            f"arc_peft could not run a probe forward of {type(model).__name__} on an input of "
            f"shape {shape} ({type(exc).__name__}: {exc}). Pass example_input=... (a tensor, a "
            "tuple of arguments or a dict of keyword arguments the model accepts)"
        ) from exc
    return _plan(model, rec)


def _plan(model: nn.Module, rec: Recording) -> SitePlan:
    finder = _Finder(rec)
    # -- attention sites ----------------------------------------------------------------------
    attn_calls: dict[int, int] = {}  # module id -> call index of its first attention call
    attn_input: dict[int, int] = {}  # module id -> tid of the input it is adapted at
    left: dict[int, LeftOut] = {}
    for index, op in enumerate(rec.ops):
        if not finder.is_attention(index):
            continue
        if any(rec.contains(c, op.call) for c in attn_calls.values()):
            continue  # inside a site already found (q @ k then attn @ v)
        x, call = finder.attention_site(index)
        if call is None or call == 0:
            owner = rec.calls[op.call]
            if id(owner.module) not in left:
                reason = (
                    "attention pooling or cross-attention (its queries do not come from the "
                    "same input as its keys and values)"
                    if x is None
                    else "its query/key/value input is computed inline by the model itself, "
                    "not passed to a module"
                )
                left[id(owner.module)] = LeftOut(owner.path, _kind(owner.module), reason, x is None)
            continue
        module = rec.calls[call].module
        attn_calls.setdefault(id(module), call)
        attn_input.setdefault(id(module), x)
    # An op that looked like pooling inside a module already adapted (a sub-product of its own
    # attention) is part of that site, not a module left out.
    for key in list(left):
        owner = next(c.index for c in rec.calls if id(c.module) == key)
        if key not in attn_calls and any(rec.contains(c, owner) for c in attn_calls.values()):
            del left[key]

    # Registered targets override the probe.
    order: list[tuple[int, str, int]] = []  # (call index, position, tid of input)
    forced: dict[int, str] = {}
    for call in rec.calls:
        target = get_target(call.module)
        if target is not None and target.override and id(call.module) not in forced:
            forced[id(call.module)] = target.position
            if call.main_input is not None:
                order.append((call.index, target.position, call.main_input))
    for key, call in attn_calls.items():
        if key not in forced:
            order.append((call, "attn", attn_input[key]))
    order.sort()

    # -- blocks and MLP sites -----------------------------------------------------------------
    layer_ops = [i for i, op in enumerate(rec.ops) if op.name in _LAYERS and op.params]
    attn_sites = [(c, x) for c, p, x in order if p == "attn"]
    runs: list[int] = []  # run index per attention site
    for n, (call, _) in enumerate(attn_sites):
        if n == 0:
            runs.append(0)
            continue
        prev_end = rec.calls[attn_sites[n - 1][0]].end
        between = any(prev_end <= i < rec.calls[call].start for i in layer_ops)
        runs.append(runs[-1] + 1 if between else runs[-1])
    found_mlps: list[tuple[int, int, int, int]] = []  # (start op, I call, O call, run)
    registered_mlps = [(c, x) for c, p, x in order if p == "mlp"]
    for n, (call, _) in enumerate(attn_sites):
        end = rec.calls[attn_sites[n + 1][0]].start if n + 1 < len(attn_sites) else len(rec.ops)
        earlier = [c for m, (c, _) in enumerate(attn_sites) if runs[m] < runs[n]]
        others = [c for m, (c, _) in enumerate(attn_sites) if runs[m] != runs[n]]
        cursor = rec.calls[call].end
        for layer in layer_ops:
            if layer < cursor or layer >= end:
                continue
            block = rec.lca(call, rec.ops[layer].call)
            # The layer's block must not hold earlier blocks (then it is a stage, and the layer
            # a later conv stage's); attention modules it calls directly are runs of one block
            # (TNT's inner and outer attention, each with its MLP).
            if block == 0 or any(
                rec.contains(block, c) and rec.calls[c].parent != block for c in earlier
            ):
                continue
            # nor does the part of the block the layer is in: then the layer belongs to
            # a later block of its own (the next stage's conv blocks before its attention)
            part = _child_toward(rec, block, rec.ops[layer].call)
            if any(rec.contains(part, c) for c in others):
                continue
            if not finder.mixes_channels(layer):
                continue
            closing = finder.mlp_after(layer, end, block)
            if closing is None:
                continue
            if rec.lca(rec.ops[layer].call, rec.ops[closing].call) not in _inside(rec, block):
                continue
            first = rec.ops[layer]
            x = first.inputs[0]
            in_call = _mlp_input_call(finder, x, first.call, block, call, end)
            out_call = _out_call(finder, rec.ops[closing], block, in_call)
            if in_call is not None:
                found_mlps.append((layer, in_call, out_call, runs[n]))
            cursor = closing + 1
    # -- assemble -----------------------------------------------------------------------------
    sites: list[Site] = []
    run_of_attn = {c: runs[n] for n, (c, _) in enumerate(attn_sites)}
    for call, position, x in order:
        c = rec.calls[call]
        x = c.main_input  # the tensor the hook sees (the site's input reaches the layers from it)
        target = get_target(c.module)
        layout = finder.input_layout(x, c.end)
        if target is not None and target.override and target.width is not None:
            width = int(target.width(c.module))
            axis = layout[1] if layout and layout[0] == width else -1
        elif layout is None:
            left[id(c.module)] = LeftOut(
                c.path, _kind(c.module), "no linear or convolution layer reads its input", False
            )
            continue
        else:
            width, axis = layout
        if position == "attn":
            block = run_of_attn.get(call, 0)
        else:
            block = max([r for a, r in run_of_attn.items() if a < call], default=0)
        keys = tuple(k for k, t in c.inputs if t == x) or (c.inputs[0][0],)
        sites.append(
            Site(
                position, c.path, c.path, width, axis, keys, block, _kind(c.module),
                _batch_axis(rec, x, axis),
            )
        )  # fmt: skip
    forced_runs = {
        max([r for a, r in run_of_attn.items() if a < c], default=0) for c, _ in registered_mlps
    }
    for _start, in_call, out_call, run in found_mlps:
        if run in forced_runs:
            continue  # a registered MLP type overrides what the probe found in its block
        c = rec.calls[in_call]
        x = c.main_input
        layout = finder.input_layout(
            x, rec.calls[in_call].end if out_call == in_call else len(rec.ops)
        )
        if layout is None:
            continue
        width, axis = layout
        keys = tuple(k for k, t in c.inputs if t == x)
        out_path = rec.calls[out_call].path if out_call is not None else ""
        sites.append(
            Site(
                "mlp", c.path, out_path, width, axis, keys, run, _kind(c.module),
                _batch_axis(rec, x, axis),
            )
        )  # fmt: skip
    # One site per module (a module called several times is adapted once).
    unique: dict[str, Site] = {}
    for site in sites:
        unique.setdefault(site.path, site)
    sites = sorted(unique.values(), key=lambda s: (s.block, s.position != "attn"))
    sites = _renumber(sites)
    # Attention modules of a discovered type that never ran cannot be placed: say so.
    site_paths = {s.path for s in sites}
    kinds = {type(rec.calls[c].module) for c, p, _ in order if p == "attn"}
    ran = {id(c.module) for c in rec.calls}
    for path, module in model.named_modules():
        if type(module) in kinds and id(module) not in ran and path not in site_paths:
            left[id(module)] = LeftOut(
                path, _kind(module), "it was not called by the probe forward", False
            )
    return SitePlan(sites, list(left.values()), len({s.block for s in sites}))


def _batch_axis(rec: Recording, tid: int, channel_axis: int) -> int:
    """Which axis of tensor ``tid`` holds the probe's samples: ``1`` for a sequence-first
    ``(L, N, D)`` input, else ``0`` (``N, ...``, or sample-major windows ``N * k, ...``).

    Read from the sizes: the axis of the probe batch's size, where the other leading axis does
    not have it."""
    model_input = rec.calls[0].main_input if rec.calls else None
    shape = rec.shapes.get(tid, ())
    if model_input is None or len(shape) < 3 or channel_axis % len(shape) == 1:
        return 0
    batch = rec.shapes[model_input][0] if rec.shapes[model_input] else 1
    first, second = shape[0], shape[1]
    if second == batch and first % batch != 0:
        return 1
    if batch == 1 and second == 1 and first != 1:
        return 1
    return 0


def _child_toward(rec: Recording, outer: int, inner: int) -> int:
    """The call directly inside ``outer`` on the way to ``inner`` (``inner`` if none)."""
    while rec.calls[inner].parent is not None and rec.calls[inner].parent != outer:
        inner = rec.calls[inner].parent
    return inner


def _inside(rec: Recording, block: int) -> set[int]:
    return {c.index for c in rec.calls if rec.contains(block, c.index)}


def _renumber(sites: list[Site]) -> list[Site]:
    mapping: dict[int, int] = {}
    out = []
    for site in sites:
        mapping.setdefault(site.block, len(mapping))
        out.append(Site(**{**site.__dict__, "block": mapping[site.block]}))
    return out


def _mlp_input_call(
    finder: _Finder, x: int, around: int, block: int, attn: int, end: int
) -> int | None:
    """The call an MLP whose first layer reads ``x`` is adapted at: the outermost one taking
    ``x`` that holds every projection reading it (``w0(x)``, ``w1(x)`` of a gated MLP), or
    taking a tensor ``x`` was computed from by per-token ops (a norm inside the MLP module, a
    clamp inside each projection module)."""
    rec = finder.rec
    best = None
    t: int | None = x
    while t is not None:
        readers = finder.readers(t, end)
        layers = [i for i in readers if finder.projects(rec.ops[i])]
        for call in _end_calls(finder, t, around, block, attn):
            inside = [i for i in readers if rec.contains(call, rec.ops[i].call)]
            # a call that also adds its input back (``x + mlp(x)``) holds the skip connection:
            # an adapter on its input would change the residual stream, not the branch
            skip = any(
                sum(u in rec.from_input for u in rec.ops[i].inputs) > 1
                for i in inside
                if not finder.projects(rec.ops[i])
            )
            if not skip and all(rec.contains(call, rec.ops[i].call) for i in layers):
                best = call
                break
        producer = rec.producer.get(t)
        if producer is None:
            break
        op = rec.ops[producer]
        sources = [i for i in op.inputs if i in rec.from_input]
        if finder.projects(op) or len(sources) != 1 or op.name in _NONLINEAR:
            break
        t = sources[0]
    return best


def _end_calls(finder: _Finder, x: int, around: int, block: int, attn: int) -> list[int]:
    """The calls inside ``block`` (not ``block``, not containing the attention site) whose main
    input reaches ``x`` through shape ops, outermost first."""
    rec = finder.rec
    found = []
    for call in rec.enclosing(around):
        if call == block:
            break
        if rec.contains(call, attn):
            break
        main = rec.calls[call].main_input
        if main is not None and (main == x or x in finder.shape_closure(main)):
            found.append(call)
    return found[::-1]


# a clamp of the output, even by buffers (Gemma4 clippable linears), is part of the layer
_PASS = SHAPE_OPS | {"dropout", "identity", "clone", "contiguous", "clamp"}


def _out_call(finder: _Finder, closing: Any, block: int, in_call: int | None) -> int | None:
    """The outermost call inside ``block`` returning the closing layer's output (through
    dropout and shape ops only) with the shape of the MLP's input."""
    rec = finder.rec
    reach = {closing.outputs[0]}
    todo = [closing.outputs[0]]
    while todo:
        for index in rec.consumers.get(todo.pop(), ()):
            op = rec.ops[index]
            if op.name in _PASS and (not op.params or op.name == "clamp"):
                for out in op.outputs:
                    if out not in reach:
                        reach.add(out)
                        todo.append(out)
    best = None
    for call in rec.enclosing(closing.call):
        if call == block:
            break
        c = rec.calls[call]
        if c.index != in_call and in_call is not None and rec.contains(call, in_call):
            break
        if c.outputs and c.outputs[0] in reach:
            best = call
    if best is not None and in_call is not None:
        want = rec.shapes[rec.calls[in_call].main_input]
        if rec.shapes[rec.calls[best].outputs[0]] != want:
            return None
    return best
