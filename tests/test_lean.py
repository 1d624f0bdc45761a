"""ARC's memory-lean training path (arc_peft.methods.lean) computes what plain autograd computes.

Checked: float64 gradcheck of every path (input recomputed from a LayerNorm, through permutations,
or saved); identical outputs and equal gradients against plain autograd on every
architecture of the model matrix, in float32 and under bfloat16 autocast, with dropout, with
activation checkpointing and with a mixed-task batch; and that it keeps less for the backward
pass (bytes saved, a deterministic measure — no timing here).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from timm.layers import LayerNorm2d
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import arc_peft
from arc_peft.methods import lean
from arc_peft.methods.adaptmlp.layers import AdaptMLP, _LeanAdaptMLP
from arc_peft.methods.arc.layers import ARC, SharedProjection, _LeanARC
from arc_peft.methods.lean import lean_disabled, recompute_source

from models import MATRIX, build, inputs, randomise_adapters


def _arc_params(dim: int = 6, rank: int = 3, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randn(shape, generator=g, dtype=torch.float64, requires_grad=True)
        for shape in ((dim, rank), (rank,), (dim,))
    ]


def _plain_arc(x, u, s, b):
    return x + (x @ (u * s)) @ u.t() + b


def test_gradcheck_recomputed_from_layer_norm():
    g = torch.Generator().manual_seed(1)
    x_in = torch.randn(2, 4, 6, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, generator=g, dtype=torch.float64, requires_grad=True)
    bn = torch.randn(6, generator=g, dtype=torch.float64, requires_grad=True)
    u, s, b = _arc_params()

    def fn(x_in, w, bn, u, s, b):
        x = F.layer_norm(x_in, (6,), w, bn)
        source = recompute_source(x)
        assert source is not None and len(source) == 1
        return _LeanARC.apply(x, u, s, b, 0.0, source)

    assert torch.autograd.gradcheck(fn, (x_in, w, bn, u, s, b))
    expected = _plain_arc(F.layer_norm(x_in, (6,), w, bn), u, s, b)
    torch.testing.assert_close(fn(x_in, w, bn, u, s, b), expected)


class _CountOp(TorchDispatchMode):
    """Counts the calls of one aten op (``native_layer_norm``: the recompute of a known norm's
    output; ``_to_copy``: casts)."""

    def __init__(self, op: object = torch.ops.aten.native_layer_norm.default) -> None:
        super().__init__()
        self.op, self.calls = op, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls += func is self.op
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("channels_first", [False, True], ids=["tokens", "channels_first"])
def test_gradcheck_norm_output_recomputed_by_the_known_norm(channels_first):
    g = torch.Generator().manual_seed(1)
    # timm's LayerNorm2d permutes around layer_norm; the slot then moves channels last.
    norm = (LayerNorm2d if channels_first else nn.LayerNorm)(6).double()
    with torch.no_grad():
        norm.weight.copy_(torch.randn(6, generator=g, dtype=torch.float64))
        norm.bias.copy_(torch.randn(6, generator=g, dtype=torch.float64))
    lean.know_norms(norm)  # as inject_arc does for the model's norms
    shape = (2, 6, 2, 3) if channels_first else (2, 4, 6)
    x_in = torch.randn(shape, generator=g, dtype=torch.float64, requires_grad=True)
    u, s, b = _arc_params()

    def fn(x_in, w, bn, u, s, b):  # w, bn: the norm's own parameters
        x = norm(x_in).movedim(1, -1) if channels_first else norm(x_in)
        source = recompute_source(x)
        assert source is not None and len(source) == (3 if channels_first else 1)
        return _LeanARC.apply(x, u, s, b, 0.0, source)

    inputs_ = (x_in, norm.weight, norm.bias, u, s, b)
    assert torch.autograd.gradcheck(fn, inputs_)
    out = fn(*inputs_)
    counter = _CountOp()
    with counter:
        out.sum().backward()
    assert counter.calls == 1  # the recompute: the norm's own backward is not native_layer_norm


class _MisstatedNorm(nn.LayerNorm):
    """Its ``eps`` attribute is not the one its forward passes: the recompute must notice."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, 1e-5)


@pytest.mark.parametrize("norm_class", [nn.LayerNorm, _MisstatedNorm])
def test_a_known_norm_is_recomputed_in_one_op_and_a_misstated_eps_is_not_trusted(norm_class):
    net = nn.Sequential(norm_class(64, eps=0.5), ARC(64, 8, dropout=0.2)).train()
    randomise_adapters(net, 3)
    lean.know_norms(net)
    x = torch.randn(4, 10, 64)

    def grads(plain: bool) -> tuple[list[torch.Tensor], int]:
        counter = _CountOp()
        torch.manual_seed(0)
        with lean_disabled() if plain else torch.enable_grad():
            out = net(x.clone().requires_grad_())
        with counter:
            out.square().sum().backward()
        found = [p.grad.clone() for p in net.parameters()]
        net.zero_grad(set_to_none=True)
        return found, counter.calls

    expected, _ = grads(plain=True)
    for step in range(2):
        got, recomputes = grads(plain=False)
        for a, e in zip(got, expected, strict=True):
            torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-5 * e.abs().max().item())
        if norm_class is nn.LayerNorm:
            assert recomputes == 1
        else:  # checked once against the saved statistics, then never tried again
            assert recomputes == (1 if step == 0 else 0)


def test_a_copy_made_after_injecting_knows_its_norms_after_freeze_backbone():
    model = _randomised(build("vit"), arc_peft.ARCConfig(rank=4, dropout=0.1))
    twin = copy.deepcopy(model)  # new norm weights, which inject_arc never saw

    def recomputes(net: nn.Module) -> int:
        out = net(inputs("vit"))
        counter = _CountOp()
        with counter:
            out.square().mean().backward()
        net.zero_grad(set_to_none=True)
        return counter.calls

    expected = recomputes(model)
    assert expected >= 3  # every site but the first (its input needs no gradient)
    assert recomputes(twin) == 0  # still right: the general path
    arc_peft.freeze_backbone(twin)
    assert recomputes(twin) == expected


def test_shared_u_cast_once_per_backward_pass_is_never_stale():
    """Under autocast the backward passes of the sites sharing ``U`` cast it once per backward
    pass; a ``U`` changed between steps (here through ``.data``, which autograd's version
    counter does not see) is cast again."""
    model = _randomised(build("vit"), arc_peft.ARCConfig(rank=4, dropout=0.1))
    x = inputs("vit")
    shared = [m for m in model.modules() if isinstance(m, SharedProjection)]
    assert shared
    for _ in range(2):
        with torch.no_grad():
            for m in shared:
                m.projection.data.copy_(torch.randn_like(m.projection))
        _assert_paths_agree(model, x, autocast=True)


def test_gradcheck_recomputed_through_permutes_channels_first():
    # timm's LayerNorm2d (permute, layer_norm, permute back), then the slot's movedim.
    g = torch.Generator().manual_seed(2)
    x_in = torch.randn(2, 6, 2, 3, generator=g, dtype=torch.float64, requires_grad=True)
    u, s, b = _arc_params()

    def fn(x_in, u, s, b):
        x = F.layer_norm(x_in.permute(0, 2, 3, 1), (6,)).permute(0, 3, 1, 2)
        x = x.movedim(1, -1)
        source = recompute_source(x)
        assert source is not None and len(source) == 3
        return _LeanARC.apply(x, u, s, b, 0.0, source)

    assert torch.autograd.gradcheck(fn, (x_in, u, s, b))


def _rms_hf(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    # Hugging Face's RMS norms: the weight first, the statistics written out.
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))


@pytest.mark.parametrize(
    ("variant", "weight_grad"),
    [("torch", False), ("torch", True), ("torch_no_weight", False), ("hf", False), ("hf", True)],
)
def test_gradcheck_recomputed_from_an_rms_norm(variant, weight_grad):
    """An RMS norm's output is a product of tensors its backward keeps (``x``, the ``rsqrt``,
    ``w``): recomputed by the same products, exactly, so the input is not saved."""
    g = torch.Generator().manual_seed(6)
    x_in = torch.randn(2, 4, 6, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, generator=g, dtype=torch.float64, requires_grad=weight_grad)
    u, s, b = _arc_params()

    def rms(x_in, w):
        if variant == "hf":
            return _rms_hf(x_in, w)
        return F.rms_norm(x_in, (6,), None if variant == "torch_no_weight" else w, 1e-6)

    def fn(x_in, w, u, s, b):
        x = rms(x_in, w)
        source = recompute_source(x)
        assert source is not None
        assert torch.equal(lean._recompute_output(source), x)  # the same values, exactly
        return _LeanARC.apply(x, u, s, b, 0.0, source)

    assert torch.autograd.gradcheck(fn, (x_in, w, u, s, b))
    torch.testing.assert_close(fn(x_in, w, u, s, b), _plain_arc(rms(x_in, w), u, s, b))
    # Nothing of the size of x saved by the lean Function: the bottleneck is 2×4×3.
    out = fn(x_in, w, u, s, b)
    assert all(t is None or t.numel() < x_in.numel() for t in out.grad_fn.saved_tensors[3:])
    # A second derivative through the recompute is refused, as from a LayerNorm.
    (grad_x,) = torch.autograd.grad(out.square().sum(), (x_in,), create_graph=True)
    with pytest.raises(RuntimeError, match="lean_disabled"):
        torch.autograd.grad(grad_x.square().sum(), (x_in,))


def test_rms_norm_vit_trains_at_the_floor_on_the_lean_path():
    """A timm ViT with RMS norms (AIMv2): every site after the first recomputes its input from
    the norm, the two paths agree, and the lean path keeps about what the floor keeps."""
    timm = pytest.importorskip("timm")

    def make() -> nn.Module:
        torch.manual_seed(0)
        kw = {"embed_dim": 32, "depth": 2, "num_heads": 2, "img_size": 28, "num_classes": 5}
        return timm.create_model("aimv2_large_patch14_224", pretrained=False, **kw)

    model = _randomised(make(), arc_peft.ARCConfig(rank=4, dropout=0.3))
    found = []
    original = lean.recompute_source

    def spy(x):
        source = original(x)
        found.append(source is not None)
        return source

    x = torch.randn(4, 3, 28, 28)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(lean, "recompute_source", spy)
        _assert_paths_agree(model, x)
    assert found == [True] * 3  # 4 sites; the first one's input needs no gradient
    floor = make().train()
    arc_peft.freeze_backbone(floor)
    x.requires_grad_()  # the floor: gradients flow to the image
    floor_bytes = _saved_bytes(floor, x)
    lean_bytes = _saved_bytes(model, x)
    with lean_disabled():
        plain_bytes = _saved_bytes(model, x)
    # Measured 1.033 and 1.121: what the lean path keeps beyond the floor is its bottlenecks.
    assert lean_bytes <= 1.04 * floor_bytes and plain_bytes >= 1.1 * floor_bytes


def test_gradcheck_saved_input_when_no_norm_produced_it():
    g = torch.Generator().manual_seed(4)
    x_in = torch.randn(5, 6, generator=g, dtype=torch.float64, requires_grad=True)
    u, s, b = _arc_params()

    def fn(x_in, u, s, b):
        x = x_in * 2.0  # no norm: the input itself is saved
        assert recompute_source(x) is None
        return _LeanARC.apply(x, u, s, b, 0.0, None)

    assert torch.autograd.gradcheck(fn, (x_in, u, s, b))


@pytest.mark.parametrize("from_norm", [True, False], ids=["recomputed", "saved"])
def test_gradcheck_adaptmlp(from_norm):
    g = torch.Generator().manual_seed(5)

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64, requires_grad=True)

    x_in, w_down, b_down, w_up, b_up = rand(2, 4, 6), rand(3, 6), rand(3), rand(6, 3), rand(6)

    def fn(x_in, w_down, b_down, w_up, b_up):
        x = F.layer_norm(x_in, (6,)) if from_norm else x_in * 2.0
        source = recompute_source(x)
        assert (source is not None) == from_norm
        return _LeanAdaptMLP.apply(x, w_down, b_down, w_up, b_up, 0.1, 0.0, source)

    assert torch.autograd.gradcheck(fn, (x_in, w_down, b_down, w_up, b_up))


def test_dropout_mask_is_the_one_nn_dropout_draws():
    u, s, b = (t.detach().float().requires_grad_() for t in _arc_params(rank=40))
    x = torch.randn(64, 6, requires_grad=True)
    p = 0.5
    torch.manual_seed(0)
    got = _LeanARC.apply(x, u, s, b, p, None)
    torch.manual_seed(0)
    expected = x + F.dropout(x @ (u * s), p, True) @ u.t() + b
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    grads = torch.autograd.grad(got.square().sum(), (x, u, s, b))
    expected_grads = torch.autograd.grad(expected.square().sum(), (x, u, s, b))
    for a, e in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_dropout_with_mask_is_f_dropout_bit_for_bit(dtype):
    # p = 0.15, 0.45 and 0.999: float32 rounds the two factors differently (the two-op path);
    # the others, and every p in the other precisions, take the one-op native_dropout.
    x = (torch.randn(3000, dtype=torch.float64) * 3).to(dtype).view(60, 50)
    one_op = 0
    for p in (0.05, 0.1, 0.15, 0.3, 0.45, 0.5, 0.9, 0.999):
        torch.manual_seed(7)
        expected = F.dropout(x, p, True)
        after_expected = torch.rand(4)
        torch.manual_seed(7)
        with _CountOp(torch.ops.aten.native_dropout.default) as count:
            got, mask = lean.dropout_with_mask(x, p)
        after_got = torch.rand(4)
        assert torch.equal(got, expected), p
        assert torch.equal(after_got, after_expected), p  # the generator advanced alike
        zero = x == 0  # where the output is 0 whatever the mask says
        assert mask.dtype == torch.bool and torch.equal(mask | zero, (expected != 0) | zero)
        one_op += count.calls
    assert one_op == (5 if dtype == torch.float32 else 8)


@pytest.mark.parametrize("p", [0.5, 1.0])
@pytest.mark.parametrize("adapter", ["arc", "adaptmlp"])
def test_lean_dropout_is_nn_dropout_including_p_one(adapter, p):
    # Through a module (p = 1 is allowed by nn.Dropout, though not by the configs).
    module = ARC(6, 40, dropout=p) if adapter == "arc" else AdaptMLP(6, 40, dropout=p)
    net = nn.Sequential(nn.LayerNorm(6), module).train()
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for param in net.parameters():
            param.copy_(torch.randn(param.shape, generator=g))
    x = torch.randn(64, 6, generator=g)

    def run(plain: bool) -> list:
        x_in = x.clone().requires_grad_()
        torch.manual_seed(0)
        with lean_disabled() if plain else torch.enable_grad():
            out = net(x_in)
            out.square().sum().backward()
        grads = [x_in.grad] + [param.grad.clone() for param in net.parameters()]
        net.zero_grad(set_to_none=True)
        return [out.detach(), *grads]

    lean_, plain = run(False), run(True)
    assert torch.equal(lean_[0], plain[0]) and lean_[0].isfinite().all()
    for a, e in zip(lean_[1:], plain[1:], strict=True):  # float32 rounding, summed differently
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-5 * e.abs().max().item())


def _randomised(model: nn.Module, config: arc_peft.AdapterConfig) -> nn.Module:
    arc_peft.inject_arc(model, config)
    arc_peft.freeze_backbone(model)
    randomise_adapters(model, 5)
    return model.train()


def _step(model: nn.Module, x: torch.Tensor, plain: bool, autocast: bool = False) -> tuple:
    torch.manual_seed(7)  # the same dropout masks on both paths
    with lean_disabled() if plain else torch.enable_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = model(x)
        out.float().square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out, grads


def _assert_paths_agree(model: nn.Module, x: torch.Tensor, autocast: bool = False) -> None:
    plain_out, plain_grads = _step(model, x, plain=True, autocast=autocast)
    lean_out, lean_grads = _step(model, x, plain=False, autocast=autocast)
    assert torch.equal(lean_out, plain_out)  # the same ops in the same order
    assert set(lean_grads) == set(plain_grads) and plain_grads
    if not autocast:
        for name, grad in plain_grads.items():
            torch.testing.assert_close(lean_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
        return
    # Under bfloat16 the two paths round differently: the lean path's gradients must be about as
    # close to the float32 ones as plain autograd's in bfloat16 are, give or take a few bfloat16
    # ulps (8 significant bits) of the gradient's size: rounding, not a bug.
    _, exact = _step(model, x, plain=True)
    for name, grad in plain_grads.items():
        rounding = (grad - exact[name]).abs().max().item()
        ulps = 2**-6 * exact[name].abs().max().item()
        assert (lean_grads[name] - exact[name]).abs().max().item() <= 2 * rounding + ulps, name


# Models whose every attention and MLP input is a LayerNorm's output, with no re-layout between
# (Swin partitions windows after the norm; Swin V2 is post-norm: those sites save their input).
PRE_NORM = ("vit", "deit", "deit3", "dinov2", "clip", "eva02", "eva02_swiglu", "beit", "tv_vit")


@pytest.mark.parametrize("name", MATRIX)
def test_lean_and_plain_paths_agree_on_every_architecture(name, monkeypatch):
    model = _randomised(build(name), arc_peft.ARCConfig(rank=4, dropout=0.3))
    found = []

    def spy(x):
        source = recompute_source(x)
        found.append(source is not None)
        return source

    monkeypatch.setattr(lean, "recompute_source", spy)
    _assert_paths_agree(model, inputs(name))
    assert found  # the lean path ran
    if name in PRE_NORM:
        # Every site whose input needs a gradient (all but the first: the frozen patch
        # embedding's output needs none) reads a LayerNorm's output, recomputed in backward.
        assert all(found) and len(found) >= 3, found


@pytest.mark.parametrize("name", ["vit", "swin", "eva02_swiglu", "tv_vit"])
def test_adaptmlp_lean_and_plain_paths_agree(name):
    config = arc_peft.AdaptMLPConfig(bottleneck=4, dropout=0.3)
    _assert_paths_agree(_randomised(build(name), config), inputs(name))
    _assert_paths_agree(_randomised(build(name), config), inputs(name), autocast=True)


@pytest.mark.parametrize("name", ["vit", "swin", "eva02"])
def test_lean_and_plain_paths_agree_under_bf16_autocast(name):
    model = _randomised(build(name), arc_peft.ARCConfig(rank=4, dropout=0.1))
    _assert_paths_agree(model, inputs(name), autocast=True)


@pytest.mark.parametrize("offset", [0.0, 100.0])
def test_bf16_gradients_from_a_norm_input_far_from_zero(offset):
    """Under bfloat16 autocast the gradient of ``U·diag(s)`` is a bfloat16 product on the norm's
    input, centred first: its rounding stays that of plain autograd's bfloat16 copy of the norm
    output even where the input's mean is a hundred times its deviation (rounding the input
    itself would leave the gradient no correct bit)."""
    g = torch.Generator().manual_seed(3)
    model = nn.Sequential(nn.LayerNorm(64), ARC(64, 8, dropout=0.2))
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(0.5 * torch.randn(param.shape, generator=g) + (param.dim() == 1))
    x = offset + torch.randn(4, 50, 64, generator=g)

    def grads(plain: bool, autocast: bool, dtype: torch.dtype = torch.float32) -> list:
        net = copy.deepcopy(model).to(dtype).train()
        x_in = x.to(dtype).requires_grad_()
        torch.manual_seed(0)  # the same dropout mask everywhere
        with lean_disabled() if plain else torch.enable_grad():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                out = net(x_in)
            out.float().square().mean().backward()
        return [x_in.grad] + [p.grad for p in net.parameters()]

    exact = grads(plain=True, autocast=False, dtype=torch.float64)
    plain, lean_ = grads(plain=True, autocast=True), grads(plain=False, autocast=True)
    for e, p, le in zip(exact, plain, lean_, strict=True):
        rounding = (p.double() - e).abs().max().item()
        assert (le.double() - e).abs().max().item() <= 2 * rounding + 2**-8 * e.abs().max().item()


def test_lean_path_with_activation_checkpointing():
    model = _randomised(build("vit"), arc_peft.ARCConfig(rank=4, dropout=0.1))
    x = inputs("vit")
    _, plain_grads = _step(model, x, plain=True)
    model.set_grad_checkpointing(True)
    _, lean_grads = _step(model, x, plain=False)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(lean_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_lean_path_in_a_mixed_task_batch():
    model = build("vit")
    for task in ("a", "b"):
        arc_peft.inject_arc(model, arc_peft.ARCConfig(rank=4, dropout=0.0), name=task)
    model = _randomised(model, arc_peft.ARCConfig(rank=4, dropout=0.0))
    for param in arc_peft.adapter_parameters(model).values():
        param.requires_grad_(True)  # every task trains in a mixed batch
    x = inputs("vit", batch=3)
    results = []
    for plain in (True, False):
        with arc_peft.mixed_batch(model, ["a", "b", "default"]):
            results.append(_step(model, x, plain=plain))
    (plain_out, plain_grads), (lean_out, lean_grads) = results
    torch.testing.assert_close(lean_out, plain_out)
    assert any(".a." in n for n in plain_grads) and any(".b." in n for n in plain_grads)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(lean_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def _saved_bytes(model: nn.Module, x: torch.Tensor) -> int:
    """Bytes of distinct activation storage the autograd graph of ``model(x)`` holds for the
    backward pass (read off the graph: saved-tensor hooks would switch the recompute off)."""
    weights = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    seen: dict[int, int] = {}
    stack, visited = [model(x).grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in visited:
            continue
        visited.add(node)
        names = [n for n in dir(node) if n.startswith("_saved_")]
        values = [getattr(node, n) for n in names] + list(getattr(node, "saved_tensors", ()))
        for value in values:
            for t in value if isinstance(value, (tuple, list)) else (value,):
                if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in weights:
                    seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        stack.extend(next_node for next_node, _ in node.next_functions)
    return sum(seen.values())


def test_lean_path_keeps_no_copy_of_the_norm_output():
    """With the lean path, ARC keeps about what the frozen backbone keeps (the floor: frozen
    backbone, gradients flowing to the input); plain autograd keeps each site's input more."""
    x = inputs("vit", batch=4)
    floor = build("vit").train()
    arc_peft.freeze_backbone(floor)
    floor_bytes = _saved_bytes(floor, x.clone().requires_grad_())
    model = _randomised(build("vit"), arc_peft.ARCConfig(rank=4))
    lean_bytes = _saved_bytes(model, x)
    with lean_disabled():
        plain_bytes = _saved_bytes(model, x)
    tokens = x.shape[0] * 17  # 4×4 patches + the class token
    site_input = tokens * 32 * 4  # N×D float32
    sites = len(arc_peft.runtime.slots.iter_slots(model))
    assert plain_bytes - lean_bytes >= (sites - 1) * site_input
    assert lean_bytes <= 1.03 * floor_bytes


class _Doubled(nn.Module):
    """A site input no norm produced (the lean path then saves it)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2.0


@pytest.mark.parametrize("adapter", ["arc", "adaptmlp"])
def test_a_saved_input_is_kept_in_the_gemms_precision_under_autocast(adapter):
    """Where the lean path must save its float32 input, under bf16 autocast it keeps the bf16
    copy its GEMM reads (as plain autograd does), not the float32 tensor: half the bytes."""
    module = ARC(32, 4, dropout=0.1) if adapter == "arc" else AdaptMLP(32, 4, dropout=0.1)
    net = nn.Sequential(_Doubled(), module).train()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for param in net.parameters():
            param.copy_(torch.randn(param.shape, generator=g))
    x = torch.randn(64, 32, generator=g, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lean_bytes = _saved_bytes(net, x)
        with lean_disabled():
            plain_bytes = _saved_bytes(net, x)
    assert lean_bytes <= plain_bytes
    # The bf16 copy of the 64×32 input is among them (its float32 original is not).
    assert lean_bytes < 64 * 32 * 4
    for plain in (True, False):  # and the values are those of plain autograd
        torch.manual_seed(1)
        with lean_disabled() if plain else torch.enable_grad():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = net(x)
            (grad,) = torch.autograd.grad(out.float().square().sum(), (x,))
        if plain:
            expected_out, expected_grad = out, grad
    assert torch.equal(out, expected_out) and grad.dtype == torch.float32
    torch.testing.assert_close(grad, expected_grad, rtol=2e-2, atol=2e-2 * grad.abs().max().item())


def test_plain_path_without_autograd_and_under_the_switch():
    model = _randomised(build("vit"), arc_peft.ARCConfig(rank=4))
    x = inputs("vit")
    calls = []
    original = _LeanARC.apply

    def counting(*args):
        calls.append(1)
        return original(*args)

    _LeanARC.apply = counting  # type: ignore[method-assign]
    try:
        with torch.no_grad():
            model(x)
        with lean_disabled():
            model(x)
        assert not calls
        copy.deepcopy(model)(x)
        assert calls
    finally:
        _LeanARC.apply = original  # type: ignore[method-assign]


def test_inference_under_autocast_rounds_u_diag_s_as_written():
    """Without autograd, ``U·diag(s)`` is written in bfloat16 (one op) rather than computed
    in float32 and cast for the GEMM (two): the same output as with autograd recording."""
    net = nn.Sequential(nn.LayerNorm(64), ARC(64, 8, dropout=0.0)).eval()
    randomise_adapters(net, 4)
    x = torch.randn(2, 10, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16), lean_disabled():
        recorded = net(x)
    counter = _CountOp(torch.ops.aten._to_copy.default)
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad(), counter:
        out = net(x)
    assert torch.equal(out, recorded)
    assert counter.calls == 2  # the site's input for the down product, U for the up product


@pytest.mark.parametrize("name", ["hf_vit", "hf_dinov2", "hf_swin", "oc_tower", "oc_clip_visual"])
def test_lean_and_plain_paths_agree_on_other_ecosystems(name):
    from ecosystems import ECOSYSTEMS

    spec = ECOSYSTEMS[name]
    pytest.importorskip(spec.library)
    model = spec.build()
    arc_peft.inject_arc(model, arc_peft.ARCConfig(rank=4, dropout=0.2), example_input=spec.inputs())
    arc_peft.freeze_backbone(model, train_head=False)
    randomise_adapters(model, 5)
    model.train()
    x = spec.inputs()
    results = []
    for plain in (True, False):
        torch.manual_seed(7)
        with lean_disabled() if plain else torch.enable_grad():
            out = spec.call(model, x)
            out.square().mean().backward()
        results.append(
            (out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        )
        model.zero_grad(set_to_none=True)
    (plain_out, plain_grads), (lean_out, lean_grads) = results
    assert torch.equal(lean_out, plain_out) and plain_grads
    for pname, grad in plain_grads.items():
        torch.testing.assert_close(lean_grads[pname], grad, rtol=1e-4, atol=1e-6, msg=pname)


def test_lean_path_under_ddp(tmp_path):
    """DistributedDataParallel (one gloo process) reduces the lean path's gradients as usual."""
    import torch.distributed as dist

    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1
    )
    try:
        model = _randomised(build("vit"), arc_peft.ARCConfig(rank=4, dropout=0.1))
        reference = copy.deepcopy(model)
        ddp = nn.parallel.DistributedDataParallel(model)
        x = inputs("vit")
        _, expected = _step(reference, x, plain=True)
        _, got = _step(ddp, x, plain=False)
        assert set(got) == {f"module.{n}" for n in expected}
        for name, grad in expected.items():
            torch.testing.assert_close(got[f"module.{name}"], grad, rtol=1e-4, atol=1e-6)
    finally:
        dist.destroy_process_group()


def _gradient_penalty(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    x = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(model(x).square().sum(), x, create_graph=True)
    return grad.square().sum()


@pytest.mark.parametrize("method", ["arc", "adaptmlp"])
def test_double_backward_through_the_lean_path_raises_and_plain_autograd_is_exact(method):
    """A gradient penalty through ARC's lean path was silently wrong (0.065 off plain autograd
    in float64): its backward pass is not differentiable. It now raises, naming the fix; the
    first derivatives under create_graph=True are still the plain ones."""
    config = (
        arc_peft.ARCConfig(rank=4, dropout=0.0)
        if method == "arc"
        else arc_peft.AdaptMLPConfig(bottleneck=4, dropout=0.0)
    )
    model = build("vit").double()
    for block in model.blocks:
        block.attn.fused_attn = False
    arc_peft.inject_arc(model, config)
    randomise_adapters(model, 0)
    model.double().train()
    x = inputs("vit").double()
    params = list(arc_peft.adapter_parameters(model).values())
    with lean_disabled():
        penalty = _gradient_penalty(model, x)
        expected = torch.autograd.grad(penalty, params)
    penalty = _gradient_penalty(model, x)
    torch.testing.assert_close(penalty, _gradient_penalty_plain(model, x))
    with pytest.raises(RuntimeError, match="lean_disabled"):
        torch.autograd.grad(penalty, params)
    with lean_disabled():  # the documented fix
        torch.testing.assert_close(
            torch.autograd.grad(_gradient_penalty(model, x), params), expected
        )


def _gradient_penalty_plain(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with lean_disabled():
        return _gradient_penalty(model, x)


def test_gradgradcheck_of_the_lean_functions_raises():
    u, s, b = _arc_params()
    x = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    with pytest.raises(RuntimeError, match="not differentiable"):
        torch.autograd.gradgradcheck(lambda *a: _LeanARC.apply(*a, 0.0, None), (x, u, s, b))
    g = torch.Generator().manual_seed(3)
    down_w, down_b, up_w, up_b = (
        torch.randn(shape, generator=g, dtype=torch.float64, requires_grad=True)
        for shape in ((3, 6), (3,), (6, 3), (6,))
    )
    with pytest.raises(RuntimeError, match="not differentiable"):
        torch.autograd.gradgradcheck(
            lambda *a: _LeanAdaptMLP.apply(*a, 0.5, 0.0, None), (x, down_w, down_b, up_w, up_b)
        )
    assert torch.autograd.gradgradcheck(_plain_arc, (x, u, s, b))  # what plain autograd gives
