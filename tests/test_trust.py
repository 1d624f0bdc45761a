"""Trust: every hostile file is an AdapterFileError (model unchanged, bounded memory), saves are
atomic and tidy, and an adapted model survives pickling, wrappers and freezing."""

from __future__ import annotations

import copy
import dataclasses
import io
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch
from torch import nn

import arc_peft
from arc_peft import AdapterFileError, AdaptMLPConfig, ARCConfig, cli
from arc_peft.io.saving import _serialize

from models import MATRIX, build, inputs, randomise_adapters

ARC = ARCConfig(rank=4)
ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{ROOT / 'tests'}"}


def adapted(name: str = "vit", config=ARC, seed: int = 0) -> nn.Module:
    model = build(name)
    arc_peft.inject_arc(model, config)
    randomise_adapters(model, seed)
    return model.eval()


def snapshot(model: nn.Module) -> tuple:
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    hooks = [
        (len(m._forward_pre_hooks), len(m._forward_hooks), m.training) for m in model.modules()
    ]
    return state, arc_peft.adapter_configs(model), [n for n, _ in model.named_modules()], hooks


def assert_unchanged(model: nn.Module, before: tuple) -> None:
    state, configs, names, hooks = snapshot(model)
    assert list(state) == list(before[0])
    for key, value in before[0].items():
        assert torch.equal(state[key], value), key
    assert (configs, names, hooks) == before[1:]


def rewrite(src: Path, dst: Path, meta=None, tensors=None) -> Path:
    """``src`` re-serialised after ``meta(metadata)`` / ``tensors(tensors)`` edits."""
    raw = src.read_bytes()
    size = int.from_bytes(raw[:8], "little")
    metadata = json.loads(raw[8 : 8 + size])["__metadata__"]
    state = safetensors.torch.load(raw)
    if meta is not None:
        meta(metadata)
    if tensors is not None:
        tensors(state)
    dst.write_bytes(_serialize(state, metadata))
    return dst


def edit_header(src: Path, dst: Path, mutate) -> Path:
    raw = src.read_bytes()
    size = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + size])
    mutate(header)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    dst.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + size :])
    return dst


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    path = tmp_path / "vit.safetensors"
    arc_peft.save_adapter(adapted(), path)
    return path


def rejected(model: nn.Module, path: Path, match: str, **kwargs) -> AdapterFileError:
    before = snapshot(model)
    with pytest.raises(AdapterFileError, match=match) as info:
        arc_peft.load_adapter(model, path, **kwargs)
    assert_unchanged(model, before)
    return info.value


# -- the fuzzer ----------------------------------------------------------------------------------


def test_fuzzed_files_are_refused_cleanly_in_bounded_memory() -> None:
    """~250 mutated files and the fixed resource cases (rank 10**9 in a 6 KB file, a 1.5 GB
    file, /dev/zero, a FIFO...), in a fresh process so that its peak memory is its own."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "trust_fuzz.py"), "--seed", "0", "--cases", "250"],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=600,  # a hang (a FIFO read forever) fails here instead of blocking the suite
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout)
    assert summary["failures"] == []
    outcomes = summary["outcomes"]
    assert any("load loaded" in k for k in outcomes)  # the mutations are not all fatal
    assert sum(n for k, n in outcomes.items() if "load refused" in k) > 150
    assert sum(n for k, n in outcomes.items() if k.startswith("fixed-")) >= 8
    # Before the fix, rank=10**6 in a 6 KB file cost +381 MB, a 1.5 GB file +1.5 GB.
    assert summary["peak_rss_growth_mb"] < 150, summary


# -- each defect found by hand -------------------------------------------------------------------


@pytest.mark.parametrize("version", ["²", "①", "9" * 5000, "-1", " 1", "1.0"])
def test_format_version_that_is_not_ascii_digits(saved: Path, tmp_path: Path, version) -> None:
    bad = rewrite(
        saved, tmp_path / "bad.safetensors", meta=lambda m: m.update(format_version=version)
    )
    with pytest.raises(AdapterFileError, match="format_version"):
        arc_peft.read_adapter_info(bad)
    rejected(build("vit"), bad, "format_version")


@pytest.mark.parametrize(
    "backbone",
    [
        {"architecture": "x", "num_blocks": 2, "widths": [1]},
        {"architecture": "x", "num_blocks": 2, "widths": {"attn": "x"}},
        {"architecture": 5, "num_blocks": 2, "widths": {}},
        {"architecture": "x", "num_blocks": -1, "widths": {}},
    ],
)
def test_malformed_backbone_fingerprint(saved: Path, tmp_path: Path, backbone) -> None:
    def edit(meta):
        meta["backbone"] = json.dumps(backbone)

    bad = rewrite(saved, tmp_path / "bad.safetensors", meta=edit)
    with pytest.raises(AdapterFileError, match="backbone must be"):
        arc_peft.read_adapter_info(bad)
    rejected(build("vit"), bad, "backbone must be")


def test_unhashable_dtype_and_lone_surrogate(saved: Path, tmp_path: Path) -> None:
    def dtype(header):
        header["blocks.0.arc_peft.attn.bias"]["dtype"] = ["F32"]

    bad = edit_header(saved, tmp_path / "dtype.safetensors", dtype)
    rejected(build("vit"), bad, "corrupt header entry")

    def surrogate(header):
        header["__metadata__"]["name"] = "\ud800"

    bad = edit_header(saved, tmp_path / "surrogate.safetensors", surrogate)
    with pytest.raises(AdapterFileError, match="surrogate"):
        arc_peft.read_adapter_info(bad)
    rejected(build("vit"), bad, "surrogate")


def test_config_that_selects_missing_blocks(saved: Path, tmp_path: Path) -> None:
    def edit(meta):
        meta["config"] = json.dumps({**json.loads(meta["config"]), "blocks": [7]})

    bad = rewrite(saved, tmp_path / "bad.safetensors", meta=edit)
    error = rejected(build("vit"), bad, r"does not fit this model.*out of range")
    assert "blocks=(7,)" in str(error)


@pytest.mark.parametrize(
    "config, field, value",
    [
        (ARC, "rank", 10**6),
        (ARC, "rank", 10**9),
        (AdaptMLPConfig(bottleneck=4), "bottleneck", 10**6),
    ],
)
def test_huge_claimed_rank_is_refused_before_anything_is_built(
    tmp_path: Path, config, field: str, value: int
) -> None:
    path = tmp_path / "a.safetensors"
    arc_peft.save_adapter(adapted(config=config), path)

    def edit(meta):
        meta["config"] = json.dumps({**json.loads(meta["config"]), field: value})

    bad = rewrite(path, tmp_path / "bad.safetensors", meta=edit)
    # Refused by the config's own check against the model's widths, on the meta device.
    rejected(build("vit"), bad, rf"does not fit this model.*{field}={value} is not below the site")


def test_special_paths(tmp_path: Path) -> None:
    model = build("vit")
    rejected(model, Path("/dev/zero"), "not a regular file")
    rejected(model, tmp_path, "not a regular file .a directory")
    fifo = tmp_path / "fifo.safetensors"
    os.mkfifo(fifo)
    rejected(model, fifo, "not a regular file .a FIFO")  # would block forever in open()
    with pytest.raises(AdapterFileError, match="NUL"):
        arc_peft.read_adapter_info("a\0b.safetensors")


def test_header_size_and_tensor_count_are_bounded(saved: Path, tmp_path: Path) -> None:
    raw = saved.read_bytes()
    huge = tmp_path / "huge.safetensors"
    huge.write_bytes((59 * 2**20).to_bytes(8, "little") + raw[8:])
    with open(huge, "r+b") as handle:
        handle.truncate(60 * 2**20)
    rejected(build("vit"), huge, "header claims 61,865,984 bytes")

    def many(header):
        for i in range(arc_peft.io.format.MAX_TENSORS + 1):
            header[f"x{i}"] = {"dtype": "U8", "shape": [0], "data_offsets": [0, 0]}

    bad = edit_header(saved, tmp_path / "many.safetensors", many)
    rejected(build("vit"), bad, "tensors; this reader accepts at most")


def test_large_wrong_file_is_refused_from_its_header(saved: Path) -> None:
    """A valid adapter followed by 1.5 GB (sparse): refused without reading the data."""
    with open(saved, "r+b") as handle:
        handle.truncate(1_500_000_000)
    rejected(build("vit"), saved, "unexpected bytes after the tensor data")


@pytest.mark.parametrize(
    "file_dtype, value, model_dtype",
    [
        (torch.float64, 1e300, torch.float32),
        (torch.float32, 7e4, torch.float16),
        (torch.float32, 3.4e38, torch.bfloat16),
    ],
)
def test_values_that_overflow_the_model_dtype(
    saved: Path, tmp_path: Path, file_dtype, value: float, model_dtype
) -> None:
    def edit(tensors):
        for key in tensors:
            tensors[key] = tensors[key].to(file_dtype)
        tensors["blocks.1.arc_peft.mlp.bias"][3] = value

    bad = rewrite(saved, tmp_path / "bad.safetensors", tensors=edit)
    model = build("vit").to(model_dtype)
    rejected(model, bad, r"blocks\.1\.arc_peft\.mlp\.bias holds NaN or infinite values")


def test_float8_files_load_and_float8_nan_is_refused(saved: Path, tmp_path: Path) -> None:
    def to_f8(tensors):
        for key in tensors:
            tensors[key] = tensors[key].to(torch.float8_e4m3fn)

    f8 = rewrite(saved, tmp_path / "f8.safetensors", tensors=to_f8)
    model = arc_peft.load_adapter(build("vit"), f8)
    stored = safetensors.torch.load_file(str(f8))["blocks.1.arc_peft.mlp.bias"]
    loaded = model.state_dict()["blocks.1.arc_peft.mlp.default.bias"]
    assert torch.equal(loaded, stored.float())

    def poison(tensors):
        to_f8(tensors)
        tensors["blocks.1.arc_peft.mlp.bias"][0] = float("nan")

    rejected(build("vit"), rewrite(saved, tmp_path / "nan.safetensors", tensors=poison), "NaN")


# -- names ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["training", "forward", "active", "_modules", "-x", "a.b", ""])
def test_colliding_names_change_nothing(saved: Path, name: str) -> None:
    model = build("vit")
    before = snapshot(model)
    with pytest.raises(ValueError, match="adapter name"):
        arc_peft.inject_arc(model, ARC, name=name)
    assert_unchanged(model, before)
    with pytest.raises(ValueError, match="adapter name"):
        arc_peft.load_adapter(model, saved, name=name)
    assert_unchanged(model, before)


def test_hyphenated_task_names(saved: Path, tmp_path: Path) -> None:
    model = adapted()
    arc_peft.load_adapter(model, saved, name="cifar-100")
    arc_peft.set_active_adapter(model, "cifar-100")
    x = inputs("vit")
    with torch.no_grad():
        expected = model(x)
        arc_peft.set_active_adapter(model, "default")
        with arc_peft.mixed_batch(model, ["cifar-100", "cifar-100"]):
            assert torch.equal(model(x), expected)
    out = tmp_path / "again.safetensors"
    arc_peft.save_adapter(model, out, name="cifar-100")
    assert arc_peft.read_adapter_info(out).name == "cifar-100"


def test_info_str_never_raises(saved: Path) -> None:
    info = arc_peft.read_adapter_info(saved)
    odd = dataclasses.replace(info, backbone={"widths": 5}, head={"shapes": 3})
    assert str(odd).startswith(str(saved))


# -- saves ---------------------------------------------------------------------------------------


def _temp_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_stale_temporary_files_are_swept(saved: Path) -> None:
    from arc_peft.io.atomic import _host_tag

    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    dead_pid = int(dead.stdout)
    folder, host = saved.parent, _host_tag()
    names = {
        "dead": f".{saved.name}.{host}-{dead_pid}-{'a' * 12}.tmp",
        "old": f".{saved.name}.ffffffff-{os.getpid()}-{'b' * 12}.tmp",
        "live": f".{saved.name}.{host}-{os.getpid()}-{'c' * 12}.tmp",
        "other": f".other.safetensors.{host}-{dead_pid}-{'d' * 12}.tmp",
    }
    for name in names.values():
        (folder / name).write_bytes(b"partial")
    old = time.time() - 3600
    os.utime(folder / names["old"], (old, old))
    arc_peft.save_adapter(adapted(), saved)
    assert _temp_files(folder) == sorted([names["live"], names["other"]])


@pytest.mark.parametrize("where", ["open", "fdopen", "replace"])
def test_interrupt_at_any_step_leaves_no_temporary_file(saved: Path, monkeypatch, where) -> None:
    """Ctrl-C as the temporary file is created (after the system call, before its result is
    stored), while it is written, or as it is moved: the old file stays, nothing is left."""
    before = saved.read_bytes()
    real = getattr(os, where)

    def interrupted(*args, **kwargs):
        if where == "open" and str(args[0]).endswith(".tmp"):
            real(*args, **kwargs)  # the file now exists
        if where != "open" or str(args[0]).endswith(".tmp"):
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(os, where, interrupted)
    with pytest.raises(KeyboardInterrupt):
        arc_peft.save_adapter(adapted(seed=1), saved)
    monkeypatch.undo()
    assert saved.read_bytes() == before
    assert _temp_files(saved.parent) == []


def test_long_names_modes_and_symlinks(tmp_path: Path) -> None:
    model = adapted()
    long = tmp_path / ("n" * (255 - len(".safetensors")) + ".safetensors")
    arc_peft.save_adapter(model, long)
    assert arc_peft.read_adapter_info(long).num_tensors > 0

    private = tmp_path / "private.safetensors"
    arc_peft.save_adapter(model, private)
    os.chmod(private, 0o600)
    arc_peft.save_adapter(adapted(seed=1), private)
    assert private.stat().st_mode & 0o777 == 0o600

    real = tmp_path / "store" / "real.safetensors"
    real.parent.mkdir()
    arc_peft.save_adapter(model, real)
    link = tmp_path / "link.safetensors"
    link.symlink_to(real)
    arc_peft.save_adapter(adapted(seed=1), link)
    assert link.is_symlink() and link.read_bytes() == real.read_bytes()
    assert _temp_files(real.parent) == [] and _temp_files(tmp_path) == []


def test_kill_during_save_leaves_a_valid_file_and_sweepable_temporaries(saved: Path) -> None:
    """SIGKILL a process that saves in a loop: the file is always the old or a new valid one,
    and the next save removes what the killed process left."""
    script = textwrap.dedent(f"""
        import sys, torch, arc_peft
        from models import build
        model = build("vit"); arc_peft.inject_arc(model, arc_peft.ARCConfig(rank=4))
        print("ready", flush=True)
        i = 0
        while True:
            with torch.no_grad():
                next(iter(arc_peft.adapter_parameters(model).values())).add_(1)
            arc_peft.save_adapter(model, {str(saved)!r}); i += 1
    """)
    for delay in (0.05, 0.13, 0.29, 0.41):
        proc = subprocess.Popen([sys.executable, "-c", script], env=ENV, stdout=subprocess.PIPE)
        assert proc.stdout.readline().strip() == b"ready"
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        info = arc_peft.read_adapter_info(saved)  # never torn
        arc_peft.load_adapter(build("vit"), saved)
        assert info.num_tensors > 0
    arc_peft.save_adapter(adapted(), saved)
    assert _temp_files(saved.parent) == []


# -- models: pickling, wrappers, freezing --------------------------------------------------------


@pytest.mark.parametrize("method", ["arc", "adaptmlp"])
@pytest.mark.parametrize("name", MATRIX)
def test_pickle_and_deepcopy_round_trip(name: str, method: str) -> None:
    config = ARC if method == "arc" else AdaptMLPConfig(bottleneck=4, dropout=0.0)
    model = adapted(name, config)
    arc_peft.inject_arc(model, config, name="other")
    arc_peft.freeze_backbone(model)
    model.eval()
    x = inputs(name)
    with torch.no_grad():
        expected = model(x)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    for clone in (torch.load(buffer, weights_only=False), copy.deepcopy(model)):
        assert clone.state_dict().keys() == model.state_dict().keys()
        assert arc_peft.adapter_configs(clone) == arc_peft.adapter_configs(model)
        with torch.no_grad():
            assert torch.equal(clone(x), expected)
            arc_peft.set_active_adapter(clone, "other")  # the clone's slots are its own
            assert not torch.equal(clone(x), expected) or method == "adaptmlp"
        with torch.no_grad():
            assert torch.equal(model(x), expected)


def _reference_bytes(tmp_path: Path) -> bytes:
    path = tmp_path / "plain.safetensors"
    arc_peft.save_adapter(adapted(), path)
    return path.read_bytes()


def test_save_through_wrappers_writes_the_plain_model(tmp_path: Path) -> None:
    expected = _reference_bytes(tmp_path)
    model = adapted()
    for wrapped in (
        torch.compile(model, backend="eager"),
        nn.DataParallel(model),
        torch.compile(nn.DataParallel(model), backend="eager"),
    ):
        path = tmp_path / "wrapped.safetensors"
        arc_peft.save_adapter(wrapped, path)
        assert path.read_bytes() == expected
        # Into a wrapped model that already has the adapter (only its weights are replaced).
        fresh = build("vit")
        arc_peft.inject_arc(fresh, ARC)
        wrapper = nn.DataParallel(fresh)
        assert arc_peft.load_adapter(wrapper, path) is wrapper
        for key, value in model.state_dict().items():
            assert torch.equal(fresh.state_dict()[key], value), key
        arc_peft.load_adapter(torch.compile(fresh, backend="eager"), path)


def test_injecting_into_wrapped_or_compiled_models_is_loud(saved: Path) -> None:
    torch._dynamo.reset()
    for wrapper in (lambda m: torch.compile(m, backend="eager"), nn.DataParallel):
        model = build("vit")
        wrapped = wrapper(model)
        with pytest.raises(ValueError, match="wrapped in .*Add adapters to the plain model"):
            arc_peft.inject_arc(wrapped, ARC)
        with pytest.raises(ValueError, match="wrapped in"):
            arc_peft.load_adapter(wrapped, saved)
        assert arc_peft.adapter_configs(model) == {}
    model = build("vit")
    compiled = torch.compile(model, backend="eager")
    with torch.no_grad():
        compiled(inputs("vit"))
    with pytest.warns(UserWarning, match="compiled model does not see adapters added after"):
        arc_peft.inject_arc(model, ARC)
    torch._dynamo.reset()


def test_only_the_compiled_model_is_flagged() -> None:
    """Compiled code for VisionTransformer.forward exists once any ViT ran compiled; a different
    ViT that was never compiled still takes adapters without a warning (issue 17)."""
    torch._dynamo.reset()
    compiled_one, other = build("vit"), build("vit")
    compiled = torch.compile(compiled_one, backend="eager")
    with torch.no_grad():
        compiled(inputs("vit"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning fails the test
        arc_peft.inject_arc(other, ARC)
    with pytest.warns(UserWarning, match="compiled model does not see adapters added after"):
        arc_peft.inject_arc(compiled_one, ARC)
    del compiled
    torch._dynamo.reset()


def test_modules_trained_with_also_are_saved_and_loaded(tmp_path: Path) -> None:
    model = adapted()
    compiled = torch.compile(model, backend="eager")  # names are the plain model's
    assert arc_peft.freeze_backbone(compiled, also=["norm", model.blocks[1].norm2]) is compiled
    with torch.no_grad():
        model.norm.weight.mul_(1.5)
        model.blocks[1].norm2.bias.add_(0.2)
    path = tmp_path / "a.safetensors"
    arc_peft.save_adapter(model, path)
    info = arc_peft.read_adapter_info(path)
    assert info.trained["modules"] == ["norm", "blocks.1.norm2"]
    assert info.trained_parameters == 4 * 32 and "trained" in str(info)
    fresh = arc_peft.load_adapter(build("vit"), path)
    x = inputs("vit")
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)


def test_save_refuses_trainable_parameters_it_would_lose(tmp_path: Path) -> None:
    model = adapted()
    arc_peft.freeze_backbone(model)
    model.blocks[0].norm1.weight.requires_grad_(True)
    with pytest.raises(ValueError, match=r"blocks\.0\.norm1\.weight are trainable but would not"):
        arc_peft.save_adapter(model, tmp_path / "a.safetensors")
    assert not (tmp_path / "a.safetensors").exists()
    arc_peft.save_adapter(adapted(), tmp_path / "unfrozen.safetensors")  # no freeze: no inference


def _xcit() -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model(
        "xcit_nano_12_p16_224",
        pretrained=False,
        num_classes=5,
        img_size=32,
        depth=2,
        embed_dim=32,
        num_heads=2,
        cls_attn_layers=1,
    )


def test_frozen_batchnorm_keeps_its_statistics_in_train_mode(tmp_path: Path) -> None:
    model = _xcit()
    arc_peft.inject_arc(model, ARC)
    arc_peft.freeze_backbone(model)
    model.train()
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert norms and not any(m.training for m in norms)
    assert model.blocks[0].training  # only the running-statistics norms are pinned
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model(torch.randn(4, 3, 32, 32)).sum().backward()
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert changed == []
    clone = copy.deepcopy(model)
    clone.train()
    assert not any(m.training for m in clone.modules() if isinstance(m, nn.BatchNorm2d))

    # Trained on purpose (also=...): the norm runs in training mode again, and is saved.
    bn = norms[0]
    arc_peft.freeze_backbone(model, also=[bn])
    model.train()
    assert bn.training and not norms[1].training
    path = tmp_path / "bn.safetensors"
    arc_peft.save_adapter(model, path)
    assert any(
        k.endswith("running_mean") for k in arc_peft.read_adapter_info(path).trained["shapes"]
    )


# -- second pass: task heads, identity, folders ---------------------------------------------------


def _with_head(src: Path, dst: Path, head: dict[str, torch.Tensor], module: str = "head") -> Path:
    """``src`` with its stored head replaced by ``head`` (keys relative to ``module``)."""

    def meta(m):
        m["head"] = json.dumps(
            {"module": module, "shapes": {f"{module}.{k}": list(v.shape) for k, v in head.items()}}
        )

    def tensors(t):
        for key in [k for k in t if k.startswith(f"{module}.")]:
            del t[key]
        t.update({f"{module}.{k}": v for k, v in head.items()})

    return rewrite(src, dst, meta=meta, tensors=tensors)


def test_repeated_or_nested_trained_modules_are_refused_in_linear_time(tmp_path: Path) -> None:
    """A path listed 20,000 times cost paths × keys (0.8 MB took 51 s); "" rebuilt the whole
    state dict per repeat. Each stored tensor now belongs to exactly one listed module."""
    model = adapted()
    arc_peft.freeze_backbone(model, also=["norm", "blocks.1", "blocks.1.norm2"])
    path = tmp_path / "a.safetensors"
    arc_peft.save_adapter(model, path)
    assert arc_peft.read_adapter_info(path).trained["modules"] == ["norm", "blocks.1"]
    for modules, match in [
        ([""] * 20_000, "twice"),
        (["norm"] * 20_000, "twice"),
        (["norm", "blocks.1", "blocks"], "inside it"),
        (["norm"], "outside the trained modules"),
    ]:

        def edit(meta, modules=modules):
            meta["trained"] = json.dumps({**json.loads(meta["trained"]), "modules": modules})

        bad = rewrite(path, tmp_path / "bad.safetensors", meta=edit)
        start = time.perf_counter()
        with pytest.raises(AdapterFileError, match=match):
            arc_peft.read_adapter_info(bad)
        rejected(adapted(), bad, match, name="other")
        assert time.perf_counter() - start < 5


def test_many_head_entries_cost_linear_time(saved: Path, tmp_path: Path) -> None:
    """19,000 zero-size head tensors (1.7 MB) took 48 s: the set of head keys was rebuilt for
    every entry."""
    count = 19_000

    def many(header):
        for i in range(count):
            header[f"head.x{i}"] = {"dtype": "U8", "shape": [0], "data_offsets": [0, 0]}
        head = json.loads(header["__metadata__"]["head"])
        head["shapes"].update({f"head.x{i}": [0] for i in range(count)})
        header["__metadata__"]["head"] = json.dumps(head)

    bad = edit_header(saved, tmp_path / "many.safetensors", many)
    start = time.perf_counter()
    rejected(build("vit"), bad, "stored head does not fit")
    assert time.perf_counter() - start < 10


@pytest.mark.parametrize(
    "head, match",
    [
        ({"bias": torch.zeros(600_000, dtype=torch.float8_e4m3fn)}, "weight is missing"),
        ({"weight": torch.zeros(1, 32), "bias": torch.zeros(10)}, r"bias \[10\]"),
        ({"weight": torch.zeros(10, 32), "bias": torch.zeros(1)}, r"bias \[1\]"),
        ({"weight": torch.zeros(7, 32), "bias": torch.zeros(())}, r"bias \[\]"),
        ({"weight": torch.zeros(7)}, r"weight is \[7\]"),
        ({"weight": torch.zeros(5, 32, 2), "bias": torch.zeros(5)}, r"weight is \[5, 32, 2\]"),
        ({"weight": torch.zeros(5, 7), "bias": torch.zeros(5)}, "takes 32 features"),
        ({"weight": torch.zeros(2**20, 0), "bias": torch.zeros(2**20)}, "takes 32 features"),
        ({"weight": torch.zeros(0, 32), "bias": torch.zeros(0)}, "outputs >= 1"),
        ({"weight": torch.zeros(5, 32), "extra": torch.zeros(5)}, "extra"),
    ],
)
def test_task_heads_load_with_exactly_the_files_shapes_or_are_refused(
    saved: Path, tmp_path: Path, monkeypatch, head: dict, match: str
) -> None:
    """Heads that become an adapter's own (another adapter is on the model): a bias-only head
    of N classes built Linear(32, N) before it was refused (632 KB -> +1.8 GB); a [1, 32]
    weight with a [10] bias loaded as ten identical rows; a [5, 7] weight was accepted. Each
    is refused from the header, before the data is read."""
    bad = _with_head(saved, tmp_path / "bad.safetensors", head)

    def never(*args, **kwargs):
        raise AssertionError("the data was read before the head was checked")

    monkeypatch.setattr(arc_peft.io.loading, "read_tensors", never)
    rejected(adapted(), bad, match, name="other")


def test_identity_head_takes_only_a_linear_layer_of_its_width(saved: Path, tmp_path: Path) -> None:
    def headless() -> nn.Module:
        torch.manual_seed(0)
        model = timm.create_model("vit_tiny_patch16_224", num_classes=0, **_TINY_VIT)
        arc_peft.inject_arc(model, ARC)
        return model

    bad = _with_head(saved, tmp_path / "bad.safetensors", {"weight": torch.zeros(5, 7)})
    rejected(headless(), bad, r"would hold weight \[5, 32\]", name="other")
    good = _with_head(saved, tmp_path / "good.safetensors", {"weight": torch.randn(5, 32)})
    model = arc_peft.load_adapter(headless(), good, name="other", activate=True)
    assert model(inputs("vit")).shape == (2, 5)


_TINY_VIT = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)


@pytest.mark.parametrize(
    "dtype, value", [(torch.float32, float("nan")), (torch.float32, float("inf")),
                     (torch.float64, 1e300)]
)  # fmt: skip
def test_non_finite_values_in_a_files_own_head_are_refused(
    saved: Path, tmp_path: Path, dtype, value: float
) -> None:
    weight = torch.randn(7, 32, dtype=dtype)
    weight[3, 4] = value
    head = {"weight": weight, "bias": weight[:, 0].clone()}
    bad = _with_head(saved, tmp_path / "bad.safetensors", head)
    rejected(adapted(), bad, r"head\.weight holds NaN or infinite", name="other")


def test_loading_leaves_the_rng_and_the_models_attributes_alone(
    saved: Path, tmp_path: Path
) -> None:
    """A head of another shape is built (its initial weights drawn, then replaced): the global
    RNG advanced. A refused load left the site plan it computed in model.__dict__."""
    other = _with_head(
        saved, tmp_path / "seven.safetensors", {"weight": torch.randn(7, 32), "bias": torch.ones(7)}
    )
    model = adapted()
    torch.manual_seed(123)
    arc_peft.load_adapter(model, other, name="seven")
    assert torch.equal(torch.rand(4), torch.manual_seed(123) and torch.rand(4))

    model = build("vit")
    before = dict(model.__dict__)
    bad = rewrite(
        saved, tmp_path / "bad.safetensors", tensors=lambda t: t.pop("blocks.1.arc_peft.mlp.bias")
    )
    torch.manual_seed(5)
    rejected(model, bad, "missing adapter key")
    assert torch.equal(torch.rand(4), torch.manual_seed(5) and torch.rand(4))
    assert model.__dict__.keys() == before.keys()
    assert all(model.__dict__[k] is v for k, v in before.items())


def test_configs_with_sizes_torch_cannot_allocate_are_value_errors() -> None:
    for make in (lambda: ARCConfig(rank=2**62), lambda: AdaptMLPConfig(bottleneck=2**62)):
        with pytest.raises(ValueError, match=r"an int in \[1, 2147483647\]"):
            make()


@pytest.mark.parametrize(
    "head, match",
    [
        ({"weight": torch.zeros(2**40, 0)}, r"not a classifier's"),  # zero bytes, 2**40 classes
        ({"weight": torch.zeros(())}, r"not a classifier's"),
        ({"weight": torch.zeros(7, 32), "bias": torch.zeros(8)}, r"not a classifier's"),
        ({"weight": torch.zeros(600_000, 1, dtype=torch.float8_e4m3fn)}, "takes 1 features"),
    ],
)
def test_create_model_checks_the_head_before_building_it(
    saved: Path, tmp_path: Path, head: dict, match: str
) -> None:
    """create_model passed the head's first dimension to timm as num_classes: 2**40 classes
    from a zero-byte tensor tried to allocate 844 TB and raised a RuntimeError."""
    bad = _with_head(saved, tmp_path / "bad.safetensors", head)
    torch.manual_seed(0)
    with pytest.raises(AdapterFileError, match=match):
        arc_peft.create_model(bad, pretrained=False, **_TINY_VIT)
    assert cli.main(["check", str(bad), "--model", "vit_tiny_patch16_224",
                              "--model-kwargs", json.dumps(_TINY_VIT)]) == 1  # fmt: skip


@pytest.mark.parametrize(
    "model_id",
    [
        {"library": "timm", "architecture": "local-dir:/tmp/elsewhere"},
        {"library": "timm", "architecture": "hf-hub:attacker/x"},
        {"library": "timm", "architecture": "vit_tiny_patch16_224", "tag": "x:y"},
        {"library": "timm", "architecture": "vit_tiny_patch16_224", "tag": "not_a_tag"},
        {"library": "timm", "architecture": "no_such_model"},
        {"library": "timm", "architecture": ["vit_tiny_patch16_224"]},
    ],
)
def test_create_model_builds_only_models_of_timms_registry(
    saved: Path, tmp_path: Path, monkeypatch, model_id: dict
) -> None:
    """A file's identity naming "local-dir:/path" made timm read that folder's config.json and
    torch.load its weights; "hf-hub:attacker/x" queried a second repository."""
    bad = rewrite(saved, tmp_path / "bad.safetensors",
                  meta=lambda m: m.update(model=json.dumps(model_id)))  # fmt: skip

    def never(*args, **kwargs):
        raise AssertionError("timm.create_model was called")

    monkeypatch.setattr(timm, "create_model", never)
    with pytest.raises(AdapterFileError, match="not in this timm's registry"):
        arc_peft.create_model(bad, pretrained=False)


# -- save_adapter_folder: one complete save at the folder's name, whatever happens ------------

_SAVER = """
import sys, time, torch, arc_peft
from models import build
folder, writer = sys.argv[1], sys.argv[2]
model = build("vit"); arc_peft.inject_arc(model, arc_peft.ARCConfig(rank=4))
print("ready", flush=True)
i, end = 0, time.time() + float(sys.argv[3])
while time.time() < end:
    with torch.no_grad():
        next(iter(arc_peft.adapter_parameters(model).values())).add_(1)
    meta = {"metrics": {"i": i}, "writer": writer}
    arc_peft.save_adapter_folder(model, folder, metadata=meta); i += 1
"""


def _folder_version(folder: Path) -> tuple | None:
    """``(writer, i)`` of the save the folder holds, read through one descriptor of the folder
    (a snapshot: a swap after it was opened does not change what it names); raises if the
    three files are not of one save; ``None`` if that folder was removed while being read."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:

        def read(name: str) -> bytes:
            handle = os.open(name, os.O_RDONLY, dir_fd=fd)
            with os.fdopen(handle, "rb") as f:
                return f.read()

        try:
            raw, config, card = (read(n) for n in ("adapter.safetensors",
                                                   "adapter_config.json", "README.md"))  # fmt: skip
        except FileNotFoundError:  # an old folder being removed after a swap
            return None
    finally:
        os.close(fd)
    size = int.from_bytes(raw[:8], "little")
    user = json.loads(json.loads(raw[8 : 8 + size])["__metadata__"]["user"])
    assert json.loads(config)["metadata"] == user
    assert json.loads(config)["file_size"] == len(raw)
    assert f"| i | {user['metrics']['i']} |" in card.decode()
    return user["writer"], user["metrics"]["i"]


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.endswith((".tmp", ".tmpdir")))


def test_folder_save_replaces_links_and_refuses_other_files(tmp_path: Path) -> None:
    """Config and card were written with open("w") through any planted link (overwriting a
    file outside the folder); a directory in the way failed after adapter.safetensors was
    already replaced."""
    model = adapted()
    folder = tmp_path / "repo"
    arc_peft.save_adapter_folder(model, folder, metadata={"metrics": {"i": 0}, "writer": "a"})
    outside = tmp_path / "outside.txt"
    outside.write_text("keep me")
    (folder / "adapter_config.json").unlink()
    (folder / "adapter_config.json").symlink_to(outside)
    (folder / "README.md").unlink()
    (folder / "README.md").mkdir()  # a directory in the way
    arc_peft.save_adapter_folder(model, folder, metadata={"metrics": {"i": 1}, "writer": "a"})
    assert outside.read_text() == "keep me"
    assert _folder_version(folder) == ("a", 1)
    assert not (folder / "adapter_config.json").is_symlink()

    target = tmp_path / "target"
    target.mkdir()
    link = tmp_path / "link"
    link.symlink_to(target, target_is_directory=True)
    arc_peft.save_adapter_folder(model, link, metadata={"metrics": {"i": 2}, "writer": "a"})
    assert not link.is_symlink() and list(target.iterdir()) == []
    assert _folder_version(link) == ("a", 2)

    (folder / "notes.txt").write_text("mine")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    with pytest.raises(ValueError, match=r"holds \['notes.txt'\].*folder of its own"):
        arc_peft.save_adapter_folder(model, folder)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    file = tmp_path / "file"
    file.write_text("x")
    with pytest.raises(FileExistsError):
        arc_peft.save_adapter_folder(model, file)
    assert _leftovers(tmp_path) == []


def test_killed_folder_saves_leave_one_complete_save(tmp_path: Path) -> None:
    """SIGKILL a process saving a folder in a loop (91 of 200 kills left it inconsistent):
    the folder always holds one complete save, and the next save removes what was left."""
    folder = tmp_path / "repo"
    arc_peft.save_adapter_folder(adapted(), folder, metadata={"metrics": {"i": -1}, "writer": "0"})
    for delay in (0.05, 0.13, 0.29, 0.41, 0.67):
        proc = subprocess.Popen(
            [sys.executable, "-c", _SAVER, str(folder), "k", "60"], env=ENV, stdout=subprocess.PIPE
        )
        assert proc.stdout.readline().strip() == b"ready"
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert _folder_version(folder) is not None
    arc_peft.save_adapter_folder(adapted(), folder, metadata={"metrics": {"i": 9}, "writer": "0"})
    assert _folder_version(folder) == ("0", 9)
    assert _leftovers(tmp_path) == []


def test_concurrent_folder_saves_and_readers_never_see_a_mix(tmp_path: Path) -> None:
    """Two processes saving the same folder while this one reads it: every read is one
    complete save (a reader saw 22,404 undecodable configs in 203,884 reads; 2 of 200 races
    left the folder permanently mixed)."""
    folder = tmp_path / "repo"
    arc_peft.save_adapter_folder(adapted(), folder, metadata={"metrics": {"i": -1}, "writer": "0"})
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _SAVER, str(folder), w, "6"], env=ENV, stdout=subprocess.PIPE
        )
        for w in ("a", "b")
    ]
    for proc in procs:
        assert proc.stdout.readline().strip() == b"ready"
    seen = set()
    while any(p.poll() is None for p in procs):
        version = _folder_version(folder)  # raises on a mixed folder
        if version is not None:
            seen.add(version)
    assert all(p.wait() == 0 for p in procs)
    assert {w for w, _ in seen} >= {"a", "b"}, seen  # both saved while we read
    assert _folder_version(folder) is not None
    assert _leftovers(tmp_path) == []


# -- printing a file's text; writing only what reads back; files changing while read -----------

_FORGERS = ["\n", "\r", "\x85", "\u2028", "\x0b", "\x0c", "\x1c", "\x1b[2J"]


@pytest.mark.parametrize("forger", _FORGERS)
def test_inspect_never_prints_a_files_own_rows(
    saved: Path, tmp_path: Path, capsys, forger: str
) -> None:
    """Line breaks in a version, dtype, architecture, head key or trained-module name started
    rows of their own (a forged "model timm vit_huge_patch14_224 (tag VERIFIED)")."""
    fake = f"{forger}  model       timm vit_huge_patch14_224 (tag VERIFIED)"

    def edit(header):
        meta = header["__metadata__"]
        meta["arc_peft_version"] += fake
        meta["dtype"] += fake
        model = json.loads(meta["model"])
        meta["model"] = json.dumps({**model, "architecture": model["architecture"] + fake})
        backbone = json.loads(meta["backbone"])
        meta["backbone"] = json.dumps({**backbone, "architecture": "x" + fake})

    bad = edit_header(saved, tmp_path / f"forged{forger.strip()}.safetensors", edit)
    assert cli.main(["inspect", str(bad)]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()  # splits at every line boundary a terminal or editor may honour
    assert not any(line.lstrip().startswith("model       timm vit_huge") for line in lines)
    assert "\x1b" not in out and len(lines) == len(
        str(arc_peft.read_adapter_info(saved)).split("\n")
    )
    assert cli.main(["compare", str(bad), str(saved)]) == 0
    assert "\x1b" not in capsys.readouterr().out


def test_error_messages_escape_the_files_text(saved: Path, tmp_path: Path) -> None:
    """Library exception messages (and so tracebacks) carried raw ESC from the file."""

    def edit(meta):
        del meta["model"]
        backbone = json.loads(meta["backbone"])
        meta["backbone"] = json.dumps({**backbone, "architecture": "x\x1b[2J\nforged"})

    bad = rewrite(saved, tmp_path / "bad.safetensors", meta=edit)
    error = rejected(build("vit"), bad, "made for another backbone")
    assert "\x1b" not in str(error) and "\n" not in str(error) and "\\x1b[2J\\n" in str(error)


def test_deep_metadata_is_refused_on_save_and_on_read(saved: Path, tmp_path: Path, capsys):
    """save_adapter wrote what read_adapter_info refused (4.5 MB of metadata, nesting at ~990
    levels); `inspect --json` hit the recursion limit on valid files nested 500 deep."""
    deep: object = 1
    for _ in range(500):
        deep = [deep]
    model = adapted()
    for metadata, match in [
        ({"deep": deep}, "nests deeper than 64"),
        ({"big": "x" * (4_500_000)}, "header claims"),
        ({f"k{i}": i for i in range(300_000)}, "header claims"),
    ]:
        out = tmp_path / "new.safetensors"
        with pytest.raises(ValueError, match=f"could not read this file back.*{match}"):
            arc_peft.save_adapter(model, out, metadata=metadata)
        assert not out.exists()
    bad = rewrite(saved, tmp_path / "deep.safetensors",
                  meta=lambda m: m.update(user=json.dumps({"deep": deep})))  # fmt: skip
    with pytest.raises(AdapterFileError, match="nests deeper than 64"):
        arc_peft.read_adapter_info(bad)
    assert cli.main(["inspect", str(bad), "--json"]) == 1
    assert "nests deeper" in capsys.readouterr().err
    shallow = {"a": [[[{"b": [1, 2]}]]]}
    arc_peft.save_adapter(model, out, metadata=shallow)
    assert arc_peft.read_adapter_info(out).metadata == shallow


@pytest.mark.parametrize("change", ["append", "rewrite-header", "truncate"])
def test_a_file_changing_while_it_is_read_is_refused_cleanly(
    saved: Path, tmp_path: Path, monkeypatch, change: str
) -> None:
    """A writer appending to the file or rewriting it in place between the header check and
    the data read: refused, the model (and its attributes) exactly as they were."""
    other = tmp_path / "other.safetensors"
    arc_peft.save_adapter(adapted(seed=3), other, metadata={"x": "y" * 40})
    real = arc_peft.io.loading.read_tensors

    def changing(handle, header):
        with open(saved, "r+b") as f:
            if change == "append":
                f.seek(0, os.SEEK_END)
                f.write(b"\0" * 64)
            elif change == "rewrite-header":
                f.write(other.read_bytes()[: header.data_start])
            else:
                f.truncate(header.file_size - 8)
        return real(handle, header)

    monkeypatch.setattr(arc_peft.io.loading, "read_tensors", changing)
    model = adapted(seed=1)  # it holds "default": the load replaces its weights
    before = dict(model.__dict__)
    rejected(model, saved, "changed while it was being read")
    assert model.__dict__.keys() == before.keys()
    assert all(model.__dict__[k] is v for k, v in before.items())


def test_identity_checks_catch_accidents_and_say_they_stop_no_attacker(saved: Path) -> None:
    """A vit_tiny file into deit_tiny (every width equal) is refused; a file edited to drop its
    identity is not, which docs/file-format.md says plainly."""
    rejected(build("deit"), saved, "made for another model")
    text = " ".join((ROOT / "docs" / "file-format.md").read_text().split())
    assert "Identity checks stop accidents, not attackers." in text
    assert "with its `model` field removed" in text


def test_folder_save_refuses_to_replace_the_working_directory(tmp_path: Path, monkeypatch):
    folder = tmp_path / "repo"
    arc_peft.save_adapter_folder(adapted(), folder)
    monkeypatch.chdir(folder)
    with pytest.raises(ValueError, match="current working directory"):
        arc_peft.save_adapter_folder(adapted(), ".")
    assert Path.cwd() == folder and folder.is_dir()


def test_create_model_checks_the_head_width_without_the_meta_device(saved: Path, monkeypatch):
    """A timm constructor that cannot run on the meta device: the headless copy is built on
    the CPU instead (the model's own size), and the result is the same."""
    real = timm.create_model

    def no_meta(*args, **kwargs):
        if torch.empty(0).device.type == "meta":
            raise NotImplementedError("this constructor computes on its tensors")
        return real(*args, **kwargs)

    monkeypatch.setattr(timm, "create_model", no_meta)
    torch.manual_seed(0)
    model = arc_peft.create_model(saved, pretrained=False, **_TINY_VIT).eval()
    classes = arc_peft.read_adapter_info(saved).head["shapes"]["head.weight"][0]
    with torch.no_grad():
        assert model(inputs("vit")).shape == (2, classes)


def test_damaged_tensor_data_is_refused_by_its_checksum(saved: Path, tmp_path: Path) -> None:
    raw = bytearray(saved.read_bytes())
    start = 8 + int.from_bytes(raw[:8], "little")
    assert re.search(rb'"data_sha256":"[0-9a-f]{64}"', bytes(raw[:start]))
    damaged = tmp_path / "damaged.safetensors"
    middle = start + (len(raw) - start) // 2
    raw[middle : middle + 100] = bytes(100)  # zeroed pages: still a well-formed safetensors file
    damaged.write_bytes(bytes(raw))
    error = rejected(build("vit"), damaged, "does not match the checksum")
    assert "save it again or fetch a fresh copy" in str(error)
    # The header alone is intact: describing the file still works.
    assert arc_peft.read_adapter_info(damaged).method == "arc"


def test_a_malformed_checksum_is_corrupt_metadata(saved: Path, tmp_path: Path) -> None:
    def edit(header):
        header["__metadata__"]["data_sha256"] = "not-a-digest"

    bad = edit_header(saved, tmp_path / "bad.safetensors", edit)
    rejected(build("vit"), bad, "data_sha256='not-a-digest' is not a SHA-256")


def test_files_without_a_checksum_still_load(saved: Path, tmp_path: Path) -> None:
    def edit(header):
        del header["__metadata__"]["data_sha256"]

    old = edit_header(saved, tmp_path / "old.safetensors", edit)
    model = build("vit")
    arc_peft.load_adapter(model, old)
    x = inputs("vit")
    with torch.no_grad():
        assert torch.equal(model.eval()(x), adapted().eval()(x))
