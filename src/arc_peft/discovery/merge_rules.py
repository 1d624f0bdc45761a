"""Exact merge rules for the built-in module types whose layout the generic fold
(``discovery/fold.py``) cannot see through: a key bias kept in a separate ``q_bias`` / ``v_bias``
pair, cosine attention, RoPE, a functional that pads. Each folds an input adapter's affine map
``x -> x·M + b`` (any method whose ``Adapter.affine()`` is not ``None``) into the module's input
linears. ``BUILTIN_RULES`` says which module type gets which rule; ``discovery/targets.py``
registers them on first use. They never decide *where* adapters go.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..errors import MergeError

__all__ = ["BUILTIN_RULES", "PADS_INPUT", "MergeFn", "get_tensor"]

# A merge function receives the adapted module and an input adapter's affine map
# ``x -> x @ M + b`` (``Adapter.affine()``) and returns ``{parameter or buffer name (relative to
# the module): new tensor}`` without changing anything, or raises ``arc_peft.MergeError``
# naming why an exact merge is impossible.
MergeFn = Callable[[nn.Module, Tensor, Tensor], "dict[str, Tensor]"]


# Every site below reads the adapted input through one or more linear maps ``y = x·Wᵀ + c`` and
# nothing else, so ``x -> x·M + b`` folds in as ``W' = W·Mᵀ`` (``= W·M``: ARC's M is symmetric)
# and ``c' = c + W·b``. What differs per layout is where each row block's bias ``c`` lives, and
# whether a row block without a bias may simply lose its offset ``W·b`` (keys in plain
# softmax(q·kᵀ) attention) or makes the merge impossible.

# Marks a merge function whose module zero-pads its input *after* the adapter has run (see
# ``_pads_input``); ``arc_peft.merge_adapter`` reads it.
PADS_INPUT = "pads_input"

_KEY_FREE = "a key offset adds a constant to each query's scores, which softmax ignores"
_COSINE_KEY = (
    "cosine attention normalises every key, so the key offset W_k·b changes the attention; an "
    "exact merge would need a persistent key bias, which this layout does not have"
)
_ROPE_KEY = (
    "EVA attention rotates keys by position (RoPE) and may normalise them (qk_norm), so the key "
    "offset W_k·b changes the attention; an exact merge would need a persistent key bias, which "
    "this layout does not have (its k_bias is a non-persistent zero buffer)"
)
_NORM_KEY = "keys are normalised (qk_norm), so the key offset W_k·b changes the attention"


@dataclass(frozen=True)
class _Rows:
    """A block of output rows of one input linear, and where their bias lives.

    Attributes:
        role: What the rows compute (``"query"``, ``"value"``, ``"hidden"``...), for messages.
        rows: The rows of the weight (``None``: all).
        bias: Name (relative to the site) of the tensor that biases these rows; ``None``: none.
        bias_rows: The entries of ``bias`` that belong to ``rows`` (``None``: all).
        free: Why the offset ``W·b`` of these rows may be dropped when ``bias`` is ``None``;
            ``None`` when it matters.
        needed: Why it matters, for the error message (when not ``free``).
    """

    role: str
    rows: slice | None = None
    bias: str | None = None
    bias_rows: slice | None = None
    free: str | None = None
    needed: str = "the layer has no bias parameter to absorb it"


def get_tensor(module: nn.Module, name: str) -> Tensor | None:
    """The parameter or buffer ``name`` (dotted, relative to ``module``), or ``None``."""
    for getter in (module.get_parameter, module.get_buffer):
        try:
            return getter(name)
        except AttributeError:
            continue
    return None


def _fold(
    module: nn.Module, M: Tensor, b: Tensor, linears: list[tuple[str, list[_Rows]]]
) -> dict[str, Tensor]:
    """Fold ``x -> x·M + b`` into the linear weights ``linears`` (name, row blocks) of ``module``.

    Computes in float64 on ``M``'s device (the caller casts back) and changes nothing.
    """
    M, b = M.to(torch.float64), b.to(device=M.device, dtype=torch.float64)
    out: dict[str, Tensor] = {}
    for weight_name, parts in linears:
        weight = module.get_parameter(weight_name).detach()
        if weight.dim() != 2 or weight.shape[1] != M.shape[0]:
            raise MergeError(
                f"{weight_name} has shape {tuple(weight.shape)}, expected (out, {M.shape[0]}) "
                "to match the adapter's width"
            )
        w64 = weight.to(device=M.device, dtype=torch.float64)
        out[weight_name] = w64 @ M.t()
        shift = w64 @ b
        for part in parts:
            offset = shift[part.rows or slice(None)]
            if part.bias is None:
                if part.free is not None or not bool(offset.any()):
                    continue
                raise MergeError(
                    f"the {part.role} rows of {weight_name} would need the bias W·b "
                    f"(max |W·b| = {offset.abs().max().item():.3g}) but {part.needed}. "
                    "An exact merge is possible only when W·b is zero there (e.g. adapter bias 0)"
                )
            if part.bias not in out:
                bias = get_tensor(module, part.bias).detach()
                out[part.bias] = bias.to(device=M.device, dtype=torch.float64, copy=True)
            out[part.bias][part.bias_rows or slice(None)] += offset
    return out


def _thirds(rows: int) -> tuple[slice, slice, slice]:
    third = rows // 3
    return slice(0, third), slice(third, 2 * third), slice(2 * third, rows)


def _fused_qkv(
    module: nn.Module, bias: str | None, key_free: str | None, key_needed: str = ""
) -> list[_Rows]:
    """Row blocks of a fused ``qkv`` linear whose bias (if any) is the tensor ``bias``."""
    q, k, v = _thirds(module.qkv.out_features)
    return [
        _Rows("query", q, bias, q),
        _Rows("key", k, bias, k, free=key_free, needed=key_needed or "the layer has no bias"),
        _Rows("value", v, bias, v),
    ]


def _split_bias_qkv(module: nn.Module, key_free: str | None, key_needed: str) -> list[_Rows]:
    """Row blocks of a bias-free fused ``qkv`` with separate ``q_bias`` / ``v_bias`` parameters
    and no persistent key bias (BEiT, EVA, Swin V2)."""
    if module.qkv.bias is not None:
        raise MergeError("unexpected layout: qkv has its own bias as well as q_bias/v_bias")
    q, k, v = _thirds(module.qkv.out_features)
    has_bias = module.q_bias is not None
    return [
        _Rows("query", q, "q_bias" if has_bias else None),
        _Rows("key", k, None, free=key_free, needed=key_needed),
        _Rows("value", v, "v_bias" if has_bias else None),
    ]


def _bias_of(module: nn.Module, linear: str) -> str | None:
    return f"{linear}.bias" if getattr(module, linear).bias is not None else None


def _gate(module: nn.Module) -> list[tuple[str, list[_Rows]]]:
    """timm's optional attention gate ``sigmoid(gate(x))``: one more linear reading ``x``."""
    if getattr(module, "gate", None) is None:
        return []
    return [("gate.weight", [_Rows("gate", bias=_bias_of(module, "gate"))])]


def _require_linear(module: nn.Module, *names: str) -> None:
    for name in names:
        layer = module.get_submodule(name)
        if type(layer) is not nn.Linear:
            raise MergeError(
                f"{name} is a {type(layer).__name__}, not an nn.Linear (e.g. use_conv=True): "
                "only linear input layers can absorb the adapter"
            )


def _merge_timm_attention(module: nn.Module, M: Tensor, b: Tensor) -> dict[str, Tensor]:
    key_free = _KEY_FREE if isinstance(module.k_norm, nn.Identity) else None
    parts = _fused_qkv(module, _bias_of(module, "qkv"), key_free, _NORM_KEY)
    return _fold(module, M, b, [("qkv.weight", parts), *_gate(module)])


def _merge_window_attention(module: nn.Module, M: Tensor, b: Tensor) -> dict[str, Tensor]:
    # timm Swin pads the feature map *before* the attention module: padded tokens reach the
    # adapter (and become b) both before and after merging, so padding is no concern here.
    parts = _fused_qkv(module, _bias_of(module, "qkv"), _KEY_FREE)
    return _fold(module, M, b, [("qkv.weight", parts)])


def _merge_beit_attention(module: nn.Module, M: Tensor, b: Tensor) -> dict[str, Tensor]:
    # Relative position biases are added to the scores: a key offset is still softmax-invariant.
    return _fold(module, M, b, [("qkv.weight", _split_bias_qkv(module, _KEY_FREE, ""))])


def _merge_swinv2_attention(module: nn.Module, M: Tensor, b: Tensor) -> dict[str, Tensor]:
    return _fold(module, M, b, [("qkv.weight", _split_bias_qkv(module, None, _COSINE_KEY))])


def _merge_eva_attention(module: nn.Module, M: Tensor, b: Tensor) -> dict[str, Tensor]:
    # The module cannot tell whether its caller passes rope=: EVA-02 always does, so the key
    # offset is never treated as free here.
    if module.qkv is not None:
        linears = [("qkv.weight", _split_bias_qkv(module, None, _ROPE_KEY))]
    else:
        linears = [
            ("q_proj.weight", [_Rows("query", bias=_bias_of(module, "q_proj"))]),
            ("k_proj.weight", [_Rows("key", bias=_bias_of(module, "k_proj"), needed=_ROPE_KEY)]),
            ("v_proj.weight", [_Rows("value", bias=_bias_of(module, "v_proj"))]),
        ]
    return _fold(module, M, b, [*linears, *_gate(module)])


def _merge_multihead_attention(module: nn.Module, M: Tensor, b: Tensor) -> dict[str, Tensor]:
    bias = "in_proj_bias" if module.in_proj_bias is not None else None
    # bias_k appends a learned key that would not receive the offset: then it is not free.
    key_free = _KEY_FREE if module.bias_k is None else None
    key_needed = "the attention has an extra learned key (add_bias_kv=True)"
    q, k, v = _thirds(3 * module.embed_dim)
    if module.in_proj_weight is not None:
        parts = [
            _Rows("query", q, bias, q),
            _Rows("key", k, bias, k, free=key_free, needed=key_needed),
            _Rows("value", v, bias, v),
        ]
        return _fold(module, M, b, [("in_proj_weight", parts)])
    return _fold(
        module,
        M,
        b,
        [
            ("q_proj_weight", [_Rows("query", bias=bias, bias_rows=q)]),
            ("k_proj_weight", [_Rows("key", bias=bias, bias_rows=k, free=key_free)]),
            ("v_proj_weight", [_Rows("value", bias=bias, bias_rows=v)]),
        ],
    )


def _pads_input(fn: MergeFn) -> MergeFn:
    """Mark ``fn``: its module zero-pads the adapted input internally (torchvision's shifted
    window attention, when the feature map is not a multiple of the window). Padded zeros stay
    zeros unmerged but become ``b`` merged, so ``arc_peft.merge_adapter`` refuses such a
    merge unless ``b == 0`` or the caller states that its inputs are never padded."""
    setattr(fn, PADS_INPUT, True)
    return fn


@_pads_input
def _merge_tv_window_attention(module: nn.Module, M: Tensor, b: Tensor) -> dict[str, Tensor]:
    parts = _fused_qkv(module, _bias_of(module, "qkv"), _KEY_FREE)
    return _fold(module, M, b, [("qkv.weight", parts)])


@_pads_input
def _merge_tv_window_attention_v2(module: nn.Module, M: Tensor, b: Tensor) -> dict[str, Tensor]:
    # torchvision zeroes the key third of qkv.bias at every call (cosine attention), so that
    # third cannot carry W_k·b even though the parameter exists.
    bias = _bias_of(module, "qkv")
    q, k, v = _thirds(module.qkv.out_features)
    needed = _COSINE_KEY + " (torchvision zeroes the key part of qkv.bias at every call)"
    parts = [_Rows("query", q, bias, q), _Rows("key", k, needed=needed), _Rows("value", v, bias, v)]
    return _fold(module, M, b, [("qkv.weight", parts)])


def _merge_fc1(module: nn.Module, M: Tensor, b: Tensor) -> dict[str, Tensor]:
    # GluMlp packs value and gate in fc1's rows: both halves read x linearly, one fold covers both.
    _require_linear(module, "fc1")
    return _fold(module, M, b, [("fc1.weight", [_Rows("hidden", bias=_bias_of(module, "fc1"))])])


def _merge_swiglu(module: nn.Module, M: Tensor, b: Tensor) -> dict[str, Tensor]:
    return _fold(
        module,
        M,
        b,
        [
            ("fc1_g.weight", [_Rows("gate", bias=_bias_of(module, "fc1_g"))]),
            ("fc1_x.weight", [_Rows("hidden", bias=_bias_of(module, "fc1_x"))]),
        ],
    )


def _merge_first_linear(module: nn.Module, M: Tensor, b: Tensor) -> dict[str, Tensor]:
    _require_linear(module, "0")
    return _fold(module, M, b, [("0.weight", [_Rows("hidden", bias=_bias_of(module, "0"))])])


# (module, class name, position, rule, library): imported on first use, not at ``import arc_peft``
# (importing the timm and torchvision modules that define these classes costs seconds).
BUILTIN_RULES: tuple[tuple[str, str, str, MergeFn, str], ...] = (
    ("timm.layers", "Attention", "attn", _merge_timm_attention, "timm"),
    ("timm.models.beit", "Attention", "attn", _merge_beit_attention, "timm"),
    ("timm.models.swin_transformer", "WindowAttention", "attn", _merge_window_attention, "timm"),
    (
        "timm.models.swin_transformer_v2",
        "WindowAttention",
        "attn",
        _merge_swinv2_attention,
        "timm",
    ),
    ("timm.models.eva", "EvaAttention", "attn", _merge_eva_attention, "timm"),
    ("timm.layers", "Mlp", "mlp", _merge_fc1, "timm"),
    ("timm.layers", "GluMlp", "mlp", _merge_fc1, "timm"),
    ("timm.layers", "SwiGLU", "mlp", _merge_swiglu, "timm"),
    ("torch.nn", "MultiheadAttention", "attn", _merge_multihead_attention, "torch"),
    (
        "torchvision.models.swin_transformer",
        "ShiftedWindowAttention",
        "attn",
        _merge_tv_window_attention,
        "torchvision",
    ),
    (
        "torchvision.models.swin_transformer",
        "ShiftedWindowAttentionV2",
        "attn",
        _merge_tv_window_attention_v2,
        "torchvision",
    ),
    (
        "torchvision.models.vision_transformer",
        "MLPBlock",
        "mlp",
        _merge_first_linear,
        "torchvision",
    ),
    ("torchvision.ops", "MLP", "mlp", _merge_first_linear, "torchvision"),
)
