"""Finding where adapters go, on architectures nobody registered: sites from one recorded forward.

The structure every vision transformer shares, read off a ``Recording``:

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

Registered targets (``arc_peft.register_target``) are the override: a module of a registered
type is a site of that position whatever the probe concluded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ..errors import UnsupportedModelError
from .graph import LAYERS, NONLINEAR, SHAPE_OPS, Finder
from .inputs import example_input
from .norms import PreNorm, pre_norm
from .probe import Recording, record
from .targets import get_target

__all__ = ["LeftOut", "Site", "SitePlan", "discover"]


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
        no_output: Why no adapter adding to the output can run here (a forward never reaches
            the hook at ``output_path``, see ``arc_peft.site_plan``); empty when one can.
        norm: The LayerNorm or RMS norm whose output is the input and nothing else's
            (``PreNorm``), or ``None``: where a compiled training step folds the norm into an
            input adapter.
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
    no_output: str = ""
    norm: PreNorm | None = None


@dataclass(frozen=True)
class LeftOut:
    """An attention module (or a block's MLP, ``position="mlp"``) that gets no adapter, and why."""

    path: str
    kind: str
    reason: str
    on_purpose: bool  # pooling / cross-attention / excluded by the user: not an error
    position: str = "attn"
    end: str = ""  # "output": only the adapters adding to the site's output are left out

    def describe(self) -> str:
        """``path (kind, its MLP)``: what is left out, for messages."""
        parts = [self.kind]
        if self.position == "mlp":
            parts.append("its MLP")
        if self.end == "output":
            parts.append("adapters adding to its output")
        return f"{self.path} ({', '.join(parts)})"


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
            lines.append(f"left out: {item.describe()}: {item.reason}")
        for position in ("attn", "mlp"):
            dead = [s for s in self.sites if s.position == position and s.no_output]
            if dead:
                label = "attention" if position == "attn" else "MLP"
                paths = ", ".join(s.path for s in dead[:4]) + (" ..." if len(dead) > 4 else "")
                lines.append(
                    f"{label} sites where no adapter adding to the output runs: {len(dead)} "
                    f"({paths}): {dead[0].no_output}"
                )
        return "\n".join(lines)


def _kind(module: nn.Module) -> str:
    cls = type(module)
    return f"{cls.__module__}.{cls.__qualname__}"


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
    finder = Finder(rec)
    # -- attention sites ----------------------------------------------------------------------
    attn_calls: dict[int, int] = {}  # module id -> call index of its first attention call
    attn_input: dict[int, int] = {}  # module id -> tid of the input it is adapted at
    left: dict[Any, LeftOut] = {}  # by module id (MLPs: ("mlp", id))
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
    layer_ops = [i for i, op in enumerate(rec.ops) if op.name in LAYERS and op.params]
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
            else:  # an MLP nothing can hook: say so rather than adapt the block partly
                owner = rec.calls[block]
                left[("mlp", id(owner.module))] = LeftOut(
                    owner.path, _kind(owner.module), "its MLP reads an input computed inline "
                    "by the block, which no module takes (no place for a hook)", False, "mlp",
                )  # fmt: skip
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
                _batch_axis(rec, x, axis), norm=_norm(rec, call, x, width, axis),
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
            left[("mlp", id(c.module))] = LeftOut(
                c.path, _kind(c.module), "no linear or convolution layer of its MLP reads its "
                "input on one channel axis", False, "mlp",
            )  # fmt: skip
            continue
        width, axis = layout
        keys = tuple(k for k, t in c.inputs if t == x)
        out_path = rec.calls[out_call].path if out_call is not None else ""
        sites.append(
            Site(
                "mlp", c.path, out_path, width, axis, keys, run, _kind(c.module),
                _batch_axis(rec, x, axis), norm=_norm(rec, in_call, x, width, axis),
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
    """The call directly inside ``outer`` on the way to ``inner`` (``inner`` if none, or if it is
    ``outer`` itself: an op the block runs inline)."""
    if inner == outer:
        return inner
    while rec.calls[inner].parent is not None and rec.calls[inner].parent != outer:
        inner = rec.calls[inner].parent
    return inner


def _inside(rec: Recording, block: int) -> set[int]:
    return {c.index for c in rec.calls if rec.contains(block, c.index)}


def _norm(rec: Recording, call: int, x: int | None, width: int, axis: int) -> PreNorm | None:
    # Channels-last inputs only: the adapter then acts on the axis the norm normalises.
    return pre_norm(rec, call, x, width) if axis == -1 and x is not None else None


def _renumber(sites: list[Site]) -> list[Site]:
    mapping: dict[int, int] = {}
    out = []
    for site in sites:
        mapping.setdefault(site.block, len(mapping))
        out.append(Site(**{**site.__dict__, "block": mapping[site.block]}))
    return out


def _mlp_input_call(
    finder: Finder, x: int, around: int, block: int, attn: int, end: int
) -> int | None:
    """The call an MLP whose first layer reads ``x`` is adapted at: the outermost one taking
    ``x`` that holds every projection reading it (``w0(x)``, ``w1(x)`` of a gated MLP), or
    taking a tensor ``x`` was computed from by per-token ops other than a norm (a clamp inside
    each projection module)."""
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
        if finder.projects(op) or len(sources) != 1 or op.name in NONLINEAR:
            break
        # ARC adapts what the MLP's layers read: a norm opening the MLP module (timm NormMlp,
        # torchvision MaxViT's Sequential) stays before the adapter, as the block's norm does,
        # unless no module takes the norm's output (ViTamin's gated MLP normalises inline)
        if "norm" in op.name and best is not None:
            break
        t = sources[0]
    return best


def _end_calls(finder: Finder, x: int, around: int, block: int, attn: int) -> list[int]:
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


def _out_call(finder: Finder, closing: Any, block: int, in_call: int | None) -> int | None:
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
