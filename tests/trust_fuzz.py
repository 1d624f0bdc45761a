"""A seeded fuzzer for adapter files: mutations of valid files, each of which must either load
or raise :class:`~arc_peft.AdapterFileError` with the model left bit-identical.

Run by ``tests/test_trust.py`` in a fresh process (so that its peak memory is its own), or by
hand: ``python tests/trust_fuzz.py --seed 0 --cases 400`` prints a JSON summary with the slowest
case and the peak memory growth.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import safetensors.torch
import torch
from torch import nn

import arc_peft
from arc_peft import AdapterFileError
from arc_peft.io.saving import _serialize

sys.path.insert(0, str(Path(__file__).parent))
from models import build, randomise_adapters

TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)  # models.build("vit")
METHODS = {
    "arc": arc_peft.ARCConfig(rank=4),
    "adaptmlp": arc_peft.AdaptMLPConfig(bottleneck=4, scale="learnable", layernorm="in"),
}

# Values a hostile header may put anywhere: wrong types, huge numbers, odd text, deep nesting.
HOSTILE = [
    None, True, -1, 0, 1, 4.5, 10**6, 10**9, 10**30, "", "x", "²", "①", "9" * 5000, "\ud800",
    "\x00", [], [1], ["F32"], {}, {"a": 1}, [[[[[[[[[[[]]]]]]]]]]], "[]", "{}", "null",
]  # fmt: skip
CONFIG_EDITS = {
    "rank": [0, -1, 10**6, 10**9, "4", 4.5, None, True],
    "bottleneck": [0, 10**6, 10**9, "4"],
    "blocks": [[99], [], "x", [0, 0], [-99], [True]],
    "positions": [["x"], [], "attn", ["attn", "attn"]],
    "method": ["lora", None, 3],
    "dropout": [2.0, -1, "x"],
    "target_modules": [["nothing.*"], "x"],
}
DTYPES = ["F16", "BF16", "F64", "F8_E4M3", "F8_E5M2", "I64", "U8", "BOOL", "X", ["F32"], 5]


def read_raw(raw: bytes) -> tuple[dict, bytes]:
    size = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8 : 8 + size]), raw[8 + size :]


def with_header(header: dict, data: bytes) -> bytes:
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + data


def _tensor_keys(header: dict) -> list[str]:
    return sorted(k for k in header if k != "__metadata__")


def _edit_header(rng: random.Random, raw: bytes) -> tuple[str, bytes]:
    header, data = read_raw(raw)
    meta = header["__metadata__"]
    kind = rng.choice(["meta", "config", "backbone", "head", "entry", "dtype", "count"])
    if kind == "meta":
        field = rng.choice([*sorted(meta), "trained"])
        value = rng.choice(HOSTILE)
        meta[field] = value if isinstance(value, str) and rng.random() < 0.7 else json.dumps(value)
    elif kind == "config":
        config = json.loads(meta["config"])
        field = rng.choice(sorted(CONFIG_EDITS))
        config[field] = rng.choice(CONFIG_EDITS[field])
        meta["config"] = json.dumps(config)
    elif kind == "backbone":
        backbone = json.loads(meta["backbone"])
        field = rng.choice(["architecture", "num_blocks", "widths"])
        backbone[field] = rng.choice([*HOSTILE, {"attn": [1], "mlp": "x"}, {"attn": [[1]]}])
        meta["backbone"] = json.dumps(backbone)
    elif kind == "head":
        meta["head"] = json.dumps(
            rng.choice([{"module": "head", "shapes": {"head.weight": [5, 99]}}, [], "x", 5])
        )
    elif kind == "entry":
        entry = header[rng.choice(_tensor_keys(header))]
        field = rng.choice(["shape", "data_offsets"])
        entry[field] = rng.choice([[10**6], [-1], "x", [4.0], [0, 10**12], [2**62, 2**62], []])
    elif kind == "dtype":
        header[rng.choice(_tensor_keys(header))]["dtype"] = rng.choice(DTYPES)
    else:  # many tiny tensors, or a claim of many
        for i in range(rng.choice([10, 1000, 30_000])):
            header[f"x{i}"] = {"dtype": "U8", "shape": [0], "data_offsets": [0, 0]}
    return f"edit-{kind}", with_header(header, data)


def _retype(rng: random.Random, raw: bytes) -> tuple[str, bytes]:
    """A well-formed file whose tensors have another dtype (and possibly a value the target
    dtype cannot hold)."""
    header, _ = read_raw(raw)
    tensors = safetensors.torch.load(raw)
    dtype = rng.choice([torch.float16, torch.bfloat16, torch.float64, torch.float8_e4m3fn])
    poison = rng.choice([None, 1e300, 7e4, 3.4e38, float("nan")])
    key = rng.choice(sorted(tensors))
    converted = {k: v.double() for k, v in tensors.items()}
    if poison is not None:
        converted[key].view(-1)[0] = poison
    converted = {k: v.to(dtype) for k, v in converted.items()}
    return f"dtype-{str(dtype)[6:]}", _serialize(converted, header["__metadata__"])


def mutate(rng: random.Random, raw: bytes) -> tuple[str, bytes]:
    size = int.from_bytes(raw[:8], "little")
    kind = rng.choice(["flip", "truncate", "edit", "edit", "retype", "prefix"])
    if kind == "flip":
        out = bytearray(raw)
        for _ in range(rng.choice([1, 2, 8])):
            out[rng.randrange(0, 8 + size)] ^= 1 << rng.randrange(8)
        return "flip-header", bytes(out)
    if kind == "truncate":
        return "truncate", raw[: rng.randrange(0, len(raw))]
    if kind == "prefix":  # a length prefix claiming a huge header
        claim = rng.choice([2**20 * 59, 2**40, 2**63, size + 1])
        return "huge-claim", claim.to_bytes(8, "little") + raw[8:]
    if kind == "retype":
        return _retype(rng, raw)
    return _edit_header(rng, raw)


def _set_config(raw: bytes, field: str, value: object) -> bytes:
    header, data = read_raw(raw)
    config = json.loads(header["__metadata__"]["config"])
    config[field] = value
    header["__metadata__"]["config"] = json.dumps(config)
    return with_header(header, data)


def fixed_cases(folder: Path, sources: list) -> list[tuple[str, Path]]:
    """The resource-exhaustion cases: huge claims in small files, huge files, endless files."""
    by_name = {name: raw for name, raw, _ in sources}
    arc, mlp = by_name["arc-head"], by_name["adaptmlp-head"]
    cases = []

    def write(label: str, data: bytes, grow_to: int = 0) -> None:
        path = folder / f"{label}.safetensors"
        path.write_bytes(data)
        if grow_to:  # sparse: the file system stores none of the zeros
            with open(path, "r+b") as handle:
                handle.truncate(grow_to)
        cases.append((f"fixed-{label}", path))

    write("rank-1e6", _set_config(arc, "rank", 10**6))
    write("rank-1e9", _set_config(arc, "rank", 10**9))
    write("bottleneck-1e6", _set_config(mlp, "bottleneck", 10**6))
    write("blocks-out-of-range", _set_config(arc, "blocks", [7]))
    write("adapter-then-1.5GB", arc, grow_to=1_500_000_000)
    write("header-claims-59MB", (59 * 2**20).to_bytes(8, "little") + b"{", grow_to=60 * 2**20)
    write("zeros-1.5GB", b"", grow_to=1_500_000_000)
    fifo = folder / "fifo.safetensors"
    if hasattr(os, "mkfifo"):
        os.mkfifo(fifo)
        cases.append(("fixed-fifo", fifo))
    if Path("/dev/zero").exists():
        cases.append(("fixed-dev-zero", Path("/dev/zero")))
    return cases


def _head(raw: bytes, head: dict[str, torch.Tensor]) -> bytes:
    """``raw`` with its stored head replaced by ``head`` (keys relative to ``head``)."""
    header, _ = read_raw(raw)
    meta = header["__metadata__"]
    tensors = {k: v for k, v in safetensors.torch.load(raw).items() if not k.startswith("head.")}
    tensors.update({f"head.{k}": v for k, v in head.items()})
    shapes = {f"head.{k}": list(v.shape) for k, v in head.items()}
    meta["head"] = json.dumps({"module": "head", "shapes": shapes})
    return _serialize(tensors, meta)


def _meta(raw: bytes, **fields: object) -> bytes:
    header, data = read_raw(raw)
    header["__metadata__"].update({k: json.dumps(v) for k, v in fields.items()})
    return with_header(header, data)


def crafted_cases(folder: Path, sources: list) -> list[tuple[str, Path]]:
    """The second trust pass's cases (issue 20): repeated trained modules, many head entries,
    task heads of inconsistent or huge shapes or non-finite values, identities naming other
    sources, forged text, deep metadata."""
    by_name = {name: raw for name, raw, _ in sources}
    arc, trained = by_name["arc-head"], by_name["arc-trained"]
    header, data = read_raw(trained)
    trained_meta = json.loads(header["__metadata__"]["trained"])
    cases = []

    def write(label: str, raw: bytes) -> None:
        path = folder / f"crafted-{label}.safetensors"
        path.write_bytes(raw)
        cases.append((f"crafted-{label}", path))

    for label, modules in [
        ("empty-path-x20000", [""] * 20_000),
        ("norm-x20000", ["norm"] * 20_000),
    ]:
        write(label, _meta(trained, trained={**trained_meta, "modules": modules}))
    header, data = read_raw(arc)
    head = json.loads(header["__metadata__"]["head"])
    for i in range(19_000):
        header[f"head.x{i}"] = {"dtype": "U8", "shape": [0], "data_offsets": [0, 0]}
        head["shapes"][f"head.x{i}"] = [0]
    header["__metadata__"]["head"] = json.dumps(head)
    write("head-19000-empty", with_header(header, data))
    heads = {
        "bias-only-600k": {"bias": torch.zeros(600_000, dtype=torch.float8_e4m3fn)},
        "weight-1-bias-10": {"weight": torch.ones(1, 32), "bias": torch.zeros(10)},
        "weight-5x7": {"weight": torch.ones(5, 7), "bias": torch.zeros(5)},
        "bias-scalar": {"weight": torch.ones(7, 32), "bias": torch.zeros(())},
        "weight-1d": {"weight": torch.ones(7)},
        "weight-3d": {"weight": torch.ones(5, 32, 2), "bias": torch.zeros(5)},
        "weight-2**40x0": {"weight": torch.zeros(2**40, 0)},
        "weight-scalar": {"weight": torch.zeros(())},
        "nan": {"weight": torch.full((7, 32), float("nan")), "bias": torch.zeros(7)},
        "f64-1e300": {"weight": torch.full((7, 32), 1e300, dtype=torch.float64)},
    }
    for label, tensors in heads.items():
        write(f"head-{label}", _head(arc, tensors))
    model = json.loads(read_raw(arc)[0]["__metadata__"]["model"])
    for label, arch in [("local-dir", f"local-dir:{folder}"), ("hf-hub", "hf-hub:attacker/x")]:
        write(f"model-{label}", _meta(arc, model={**model, "architecture": arch}))
    write("rank-2**62", _set_config(arc, "rank", 2**62))
    forged = "\n  model       timm vit_huge_patch14_224 (tag VERIFIED)\x1b[2J"
    write("forged-text", _meta(arc, model={**model, "architecture": "x" + forged}))
    deep: object = 1
    for _ in range(500):
        deep = [deep]
    write("deep-metadata", _meta(arc, user={"deep": deep}))
    return cases


def snapshot(model: nn.Module) -> tuple:
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    attrs = dict(model.__dict__)
    return state, arc_peft.adapter_configs(model), arc_peft.active_adapter(model), attrs


def unchanged(model: nn.Module, before: tuple) -> bool:
    state, configs, active, attrs = before
    now = model.state_dict()
    return (
        list(now) == list(state)
        and all(torch.equal(now[k], v) for k, v in state.items())
        and arc_peft.adapter_configs(model) == configs
        and arc_peft.active_adapter(model) == active
        and model.__dict__.keys() == attrs.keys()
        and all(model.__dict__[k] is v for k, v in attrs.items())
    )


def _sources(folder: Path) -> list[tuple[str, bytes, Callable[[], nn.Module]]]:
    """Valid files for every method, with and without head, and the models to load them into."""
    out = []
    for method, config in METHODS.items():
        model = build("vit")
        arc_peft.inject_arc(model, config)
        randomise_adapters(model, 0)
        for head in (True, False):
            path = folder / f"{method}-{head}.safetensors"
            arc_peft.save_adapter(model, path, include_head=head)
            out.append((f"{method}-{'head' if head else 'nohead'}", path.read_bytes(), config))
    model = build("vit")
    arc_peft.inject_arc(model, METHODS["arc"])
    arc_peft.freeze_backbone(model, also=["norm"])
    path = folder / "arc-trained.safetensors"
    arc_peft.save_adapter(model, path)
    out.append(("arc-trained", path.read_bytes(), METHODS["arc"]))
    return out


def run(seed: int, cases: int) -> dict:
    rng = random.Random(seed)
    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        sources = _sources(folder)
        plain = build("vit")
        arc_peft.site_plan(plain)  # probe once, as any earlier call would
        injected = {}
        for method, config in METHODS.items():
            injected[method] = build("vit")
            arc_peft.inject_arc(injected[method], config)
        peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        outcomes: dict[str, int] = {}
        failures: list[str] = []
        slowest = (0.0, "")
        path = folder / "case.safetensors"

        errors: dict[str, int] = {}

        def outcome(call: str, exc: BaseException | None) -> None:
            key = f"{call}: {type(exc).__name__ if exc is not None else 'ok'}"
            errors[key] = errors.get(key, 0) + 1

        def attempt(label: str, kind: str, path: Path, target: nn.Module, create: bool = False):
            nonlocal slowest
            before = snapshot(target)
            rng = torch.get_rng_state()
            start = time.perf_counter()
            try:
                str(arc_peft.read_adapter_info(path))
                info = "info"
                outcome("read_adapter_info", None)
            except AdapterFileError as exc:
                info = "refused"
                outcome("read_adapter_info", exc)
            except Exception as exc:
                failures.append(f"{label}: read_adapter_info raised {type(exc).__name__}: {exc}")
                info = "error"
                outcome("read_adapter_info", exc)
            try:
                arc_peft.load_adapter(target, path, name="fuzz")
                result = "loaded"
                outcome("load_adapter", None)
                arc_peft.delete_adapter(target, "fuzz")
            except AdapterFileError as exc:
                result = "refused"
                outcome("load_adapter", exc)
                if not unchanged(target, before):
                    failures.append(f"{label}: refused but the model changed")
                if not torch.equal(torch.get_rng_state(), rng):
                    failures.append(f"{label}: refused but the global RNG advanced")
            except Exception as exc:
                failures.append(f"{label}: load_adapter raised {type(exc).__name__}: {exc}")
                result = "error"
                outcome("load_adapter", exc)
            if create:
                try:
                    arc_peft.create_model(path, pretrained=False, **TINY)
                    outcome("create_model", None)
                except AdapterFileError as exc:
                    outcome("create_model", exc)
                except Exception as exc:
                    failures.append(f"{label}: create_model raised {type(exc).__name__}: {exc}")
                    outcome("create_model", exc)
            slowest = max(slowest, (time.perf_counter() - start, label))
            key = f"{kind}: info {info}, load {result}"
            outcomes[key] = outcomes.get(key, 0) + 1

        for label, fixed in fixed_cases(folder, sources):
            attempt(label, label, fixed, plain)
        for label, crafted in crafted_cases(folder, sources):
            # into a plain model (the head goes into the model's own) and into one that holds
            # another adapter (the head becomes the loaded adapter's own)
            attempt(label, label, crafted, plain, create=True)
            attempt(f"{label} (beside another)", label, crafted, injected["arc"])
        for case in range(cases):
            source_name, raw, _ = rng.choice(sources)
            kind, data = mutate(rng, raw)
            path.write_bytes(data)
            target = plain if rng.random() < 0.5 else injected[source_name.split("-")[0]]
            attempt(f"case {case} ({source_name}, {kind})", kind, path, target)
        peak_growth_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before) / 1024
    return {
        "cases": cases,
        "failures": failures[:20],
        "outcomes": dict(sorted(outcomes.items())),
        "exceptions": dict(sorted(errors.items())),
        "slowest_s": round(slowest[0], 4),
        "slowest_case": slowest[1],
        "peak_rss_growth_mb": round(peak_growth_mb, 1),
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cases", type=int, default=400)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(json.dumps(run(args.seed, args.cases), indent=1))
