"""Queries over one recorded forward (``Recording``): which ops read a
tensor, at which width and on which channel axis, which ops are attention and which tensor their
queries, keys and values come from. Site discovery (``discovery/sites.py``) and the generic
merge fold (``arc_peft.discovery.fold``) are built on these.
"""

from __future__ import annotations

from typing import Any

from .probe import Recording

__all__ = ["LAYERS", "NONLINEAR", "PLACEMENT_OPS", "SHAPE_OPS", "Finder"]

_MATMULS = {"matmul", "bmm", "einsum", "baddbmm"}
_ATTENTION = {"scaled_dot_product_attention", "multi_head_attention_forward"}
LAYERS = {"linear", "conv1d", "conv2d", "conv3d"}
# Parameterised ops that mix channels: what "through a learned layer" means for the queries, keys
# and values (a norm's affine, a learned bias or scale is parameterised too, but is no projection).
_PROJECTIONS = LAYERS | _MATMULS | {"addmm", "mm", "multi_head_attention_forward"}
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
NONLINEAR = {
    "gelu", "relu", "relu_", "silu", "silu_", "sigmoid", "tanh", "hardswish", "hardswish_",
    "hardsigmoid", "leaky_relu", "elu", "mish", "softplus", "glu", "relu6", "hardtanh",
    "hardtanh_", "erf", "softmax", "star_relu", "squared_relu", "abs", "quick_gelu",
}  # fmt: skip


class Finder:
    """Queries over one recorded forward: who reads a tensor, at which width and channel axis,
    which ops are attention and which tensor they attend over."""

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
        if op.name not in LAYERS or not op.params:
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
        # ops before the layers that keep each token's channels where they are: a norm, a
        # clamp (same shape), a class token or a mean token concatenated (same channel size)
        same_shape = []
        for index in self.readers(tid, stop, placement=True):
            found = self.layer_width(index)
            if found is None:
                op = self.rec.ops[index]
                if op.outputs and op.inputs and self._keeps_channels(op):
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
                if len(inner) == len(shape) and shape[axis] == width:
                    return found
                if len(inner) == len(shape) and shape[axis] > width:
                    others = [d for n, d in enumerate(shape) if n != axis % len(shape)]
                    if others == [d for n, d in enumerate(inner) if n != axis % len(inner)]:
                        return shape[axis], axis
                # reshaped on the way (an N, C, H, W input flattened to tokens): the input's
                # axis of that width, channels-first preferred
                axis = self.axis_of(tid, width, "conv", direct=False)
                if axis is not None:
                    return width, axis
        return None

    def _keeps_channels(self, op: Any) -> bool:
        """Whether ``op``'s output has its first input's rank and channel-axis sizes."""
        before = self.rec.shapes.get(op.inputs[0], ())
        after = self.rec.shapes.get(op.outputs[0], ())
        if before == after:
            return True
        return (
            len(before) == len(after) >= 3
            and before[-1] == after[-1]
            and op.name in ("cat", "concat", "add", "mean")
        )

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
        operands that a module takes (see ``call_of_tensor``); ``(None, None)`` for pooling
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
        return op.name in _PROJECTIONS and (op.name not in LAYERS or self.mixes_channels(op.index))

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
                    or op.name in NONLINEAR
                    or (op.name == "mul" and len(op.inputs) == 2)
                )
                if (
                    flag
                    and op.name in LAYERS
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
