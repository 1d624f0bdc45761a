"""Which timm / torchvision vision transformers arc_peft adapts, checked by building them.

For every model, randomly initialised (never downloaded):

1. ``arc_peft.site_plan(model, refresh=True)``: the attention / MLP sites and what is left out;
2. for each method, ``inject_arc(copy, ARCConfig(rank=4))`` and
   ``inject_arc(copy, AdaptMLPConfig(bottleneck=8))``, then one forward with every adapter made
   non-zero: each injected adapter must run (counted by forward hooks on the adapter layers), and
   the output must change. An adapter counts as running only when a forward on real tensors ran
   it: on the ``meta`` device nothing is counted.

A model "has attention" when its probe forward issues an attention op (SDPA,
``multi_head_attention_forward`` or a product of two activations): that is found with a forward
on the ``meta`` device, which costs no arithmetic. A family is a timm model module
(``timm.models.<family>``), so a family added to timm is checked without naming it here; its
representative is its smallest entrypoint (fewest parameters) that has attention, and it is
always run on real tensors (the CPU), however large: a family is counted as adapted only when
every adapter of both methods ran there.

Usage::

    python scripts/coverage.py                 # one model per family, writes docs/models.md
    python scripts/coverage.py --all           # every entrypoint with attention (long: run it in
                                               # the background); results in --out, resumable
    python scripts/coverage.py --only cait xcit # some families only, printed, no docs
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import signal
import sys
import time
import traceback
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import arc_peft  # noqa: E402
from arc_peft.discovery import sites as _discover  # noqa: E402
from arc_peft.discovery.graph import Finder  # noqa: E402
from arc_peft.methods.adaptmlp.layers import AdaptMLP  # noqa: E402
from arc_peft.methods.arc.layers import ARC  # noqa: E402

DOCS = ROOT / "docs" / "models.md"
CACHE = Path(os.environ.get("ARC_PEFT_COVERAGE_CACHE", "/tmp/arc_peft_coverage"))
BEGIN = "<!-- BEGIN coverage (generated: python scripts/coverage.py) -->"
END = "<!-- END coverage -->"
TIMEOUT = 300  # seconds per model (build + probe + inject + forward), on a busy machine too
# parameters: in ``--all``, larger models are checked on the meta device (structure only: no
# adapter is counted as running there); a family's representative always runs for real
REAL_LIMIT = 120e6

# The methods checked, with the layer type that counts as one of their adapters. allow_partial:
# a site left out is reported in the row (and makes it not OK) while the others are still run.
METHODS = {
    "ARC": (lambda: arc_peft.ARCConfig(rank=4, allow_partial=True), ARC),
    "AdaptMLP": (lambda: arc_peft.AdaptMLPConfig(bottleneck=8, allow_partial=True), AdaptMLP),
}
ADDS_OUTPUT = {"AdaptMLP"}  # adds to the site's output: left out where no forward reaches it

TORCHVISION = [
    "vit_b_16", "vit_b_32", "vit_l_16", "vit_l_32", "vit_h_14", "swin_t", "swin_s", "swin_b",
    "swin_v2_t", "swin_v2_s", "swin_v2_b", "maxvit_t",
]  # fmt: skip


class Timeout(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds: float):
    def handler(signum, frame):
        raise Timeout(f"took more than {seconds:.0f} s")

    old = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


# -- building -------------------------------------------------------------------------------------


def families() -> dict[str, list[str]]:
    """timm entrypoints grouped by model module."""
    import timm
    from timm.models import model_entrypoint

    found: dict[str, list[str]] = defaultdict(list)
    for name in timm.list_models():
        found[model_entrypoint(name).__module__.rsplit(".", 1)[-1]].append(name)
    return dict(sorted(found.items()))


def build(name: str, device: str = "cpu", **kwargs: Any) -> torch.nn.Module:
    torch.manual_seed(0)
    with torch.device(device):
        if name.startswith("torchvision."):
            import torchvision.models as tvm

            model = getattr(tvm, name.split(".", 1)[1])(weights=None, **kwargs)
        else:
            import timm

            model = timm.create_model(name, pretrained=False, **kwargs)
    return model.eval()


def num_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


class _Capture:
    """Keeps the Recording of the probe that ``site_plan`` runs (so it is not run twice)."""

    def __init__(self) -> None:
        self.last = None

    def __enter__(self):
        self.original = _discover.record

        def capture(*args, **kwargs):
            self.last = self.original(*args, **kwargs)
            return self.last

        _discover.record = capture
        return self

    def __exit__(self, *exc):
        _discover.record = self.original


def attention_owners(rec) -> list[str]:
    """Paths of the innermost modules issuing attention ops (independent of site discovery)."""
    finder = Finder(rec)
    owners = []
    for index in range(len(rec.ops)):
        if finder.is_attention(index):
            path = rec.calls[rec.ops[index].call].path
            if path not in owners:
                owners.append(path)
    # q @ k and attn @ v issued by one module count once; nested owners count at the outermost
    return [p for p in owners if not any(p.startswith(o + ".") for o in owners if o != p)]


def census(name: str) -> dict:
    """Parameters and number of attention ops of ``name``, from a meta-device forward."""
    from arc_peft.discovery.inputs import example_input
    from arc_peft.discovery.probe import record

    out: dict[str, Any] = {"entrypoint": name}
    # some models need real data (data-dependent ops): then the census runs on the CPU
    for device in ("meta", "cpu"):
        try:
            with time_limit(TIMEOUT):
                model = build(name, device)
                out["params"] = num_params(model)
                rec = record(model, example_input(model))
                finder = Finder(rec)
                out["attn_ops"] = sum(finder.is_attention(i) for i in range(len(rec.ops)))
                out.pop("meta_error", None)
                return out
        except Exception as exc:
            out[f"{device}_error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
    return out


# -- checking -------------------------------------------------------------------------------------


def check(name: str, device: str = "cpu", **kwargs: Any) -> dict:
    """Plan, inject and run ``name``; the row of the coverage table."""
    row: dict[str, Any] = {"entrypoint": name, "device": device}
    if kwargs:
        row["kwargs"] = {k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()}
    start = time.time()
    try:
        with time_limit(TIMEOUT):
            model = build(name, device, **kwargs)
            row["params"] = num_params(model)
            with _Capture() as cap:
                t = time.time()
                plan = arc_peft.site_plan(model, refresh=True)
                row["plan_s"] = round(time.time() - t, 3)
            rec = cap.last
            owners = attention_owners(rec)
            row["attn_modules"] = len(owners)
            row["attn"] = sum(s.position == "attn" for s in plan.sites)
            row["mlp"] = sum(s.position == "mlp" for s in plan.sites)
            row["blocks"] = plan.num_blocks
            row["attn_kinds"] = sorted(
                {s.kind.rsplit(".", 1)[-1] for s in plan.sites if s.position == "attn"}
            )
            row["mlp_kinds"] = sorted(
                {s.kind.rsplit(".", 1)[-1] for s in plan.sites if s.position == "mlp"}
            )
            row["left_out"] = [
                {"path": i.path, "kind": i.kind.rsplit(".", 1)[-1], "reason": i.reason,
                 "on_purpose": i.on_purpose}
                for i in plan.left_out
            ]  # fmt: skip
            row["no_output"] = [
                {"path": s.path, "kind": s.kind.rsplit(".", 1)[-1], "reason": s.no_output}
                for s in plan.sites
                if s.no_output and s.position == "mlp"
            ]
            # every attention module is either a site's owner or left out on purpose
            covered = set()
            site_paths = [s.path for s in plan.sites if s.position == "attn"]
            for o in owners:
                for sp in site_paths:
                    if o == sp or o.startswith(sp + ".") or sp.startswith(o + ".") or sp == "":
                        covered.add(o)
                for item in plan.left_out:
                    if item.on_purpose and (o == item.path or o.startswith(item.path + ".")):
                        covered.add(o)
            row["uncovered"] = [o for o in owners if o not in covered]
            if device != "meta":
                # zero-initialised branches (res-post-norm weights, head) hide any change
                with torch.no_grad():
                    for p in model.parameters():
                        # and layer scales of 1e-6 (EdgeNeXt): the change would be ~1e-7
                        if p.is_floating_point() and p.numel() and p.abs().max() < 1e-4:
                            p.normal_(0, 0.02)
            row["methods"] = {method: run_method(model, method, plan, device) for method in METHODS}
    except Exception as exc:
        row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
        row["trace"] = traceback.format_exc()[-1500:]
    row["seconds"] = round(time.time() - start, 2)
    row["ok"] = ok(row)
    return row


def run_method(model: torch.nn.Module, method: str, plan: Any, device: str) -> dict:
    """Inject ``method`` into a copy of ``model`` and run it with every adapter non-zero: how
    many adapters were injected, how many a real forward ran, whether the output changed."""
    make_config, layer = METHODS[method]
    config = make_config()
    left = [i.path for i in plan.left_out if not i.on_purpose and i.position in config.positions]
    if method in ADDS_OUTPUT:
        left += [s.path for s in plan.sites if s.position in config.positions and s.no_output]
    out: dict[str, Any] = {"left_out": left}
    try:
        adapted = copy.deepcopy(model)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # what is left out is in the row
            arc_peft.inject_arc(adapted, config)
    except arc_peft.UnsupportedModelError as exc:
        if "no site to adapt" in str(exc):  # AdaptMLP on a model without MLP sites
            out["none"] = True
            return out
        out["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
        return out
    except Exception as exc:
        out["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
        return out
    adapters = [m for m in adapted.modules() if isinstance(m, layer)]  # the site layers
    out["adapters"] = len(adapters)
    calls: dict[int, int] = defaultdict(int)

    def count(module: torch.nn.Module, args: Any, output: Any) -> None:
        calls[id(module)] += 1

    handles = [m.register_forward_hook(count) for m in adapters]
    g = torch.Generator().manual_seed(1)
    for p in arc_peft.adapter_parameters(adapted).values():
        with torch.no_grad():
            p.copy_(0.3 * torch.randn(p.shape, generator=g).to(p))
    x = arc_peft.discovery.inputs.example_input(model, batch=2)
    # the features, not the logits: some heads start at zero (Hiera)
    features = hasattr(model, "forward_features")
    try:
        with torch.no_grad():
            y = adapted.forward_features(x) if features else adapted(x)
            if features and len(calls) < len(adapters):  # a site in the head (CLIP pool)
                features = False
                y = adapted(x)
    finally:
        for h in handles:
            h.remove()
    if device == "meta":  # nothing ran: meta tensors carry no values
        return out
    out["adapters_run"] = len(calls)
    with torch.no_grad():
        y0 = model.forward_features(x) if features else model(x)
    y, y0 = _first(y), _first(y0)
    # relative: a layer scale of 1e-5 (FastViT) makes the change small, not zero
    diff = (y.float() - y0.float()).abs().max().item()
    out["rel_change"] = diff / max(y0.float().abs().max().item(), 1e-12)
    out["changed"] = out["rel_change"] > 1e-6
    out["finite"] = bool(torch.isfinite(y).all())
    if method == "ARC":
        out["merge"] = merge_status(adapted, x, y, features)
    return out


def method_ok(result: dict) -> bool:
    """Every site of the method adapted and every adapter injected ran on real tensors and
    changed the output; a model without a site for the method (no MLP for AdaptMLP) passes."""
    if result.get("none"):
        return True
    if "error" in result or result.get("left_out") or "adapters_run" not in result:
        return False
    if result["adapters_run"] != result.get("adapters"):
        return False
    return result.get("changed", False) and result.get("finite", False)


def merge_status(adapted: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, features: bool) -> str:
    """``"exact"`` when merging the (non-zero) ARC adapter reproduces the adapted output,
    ``"refused: <reason>"`` when the merge says it cannot, ``"WRONG ..."`` otherwise (a bug).

    Judged against the adapted model in float64: a random model can amplify float32 rounding
    (TinyViT: 9e-4), and the merged model must be as close to the truth as the unmerged one."""

    def run(model: torch.nn.Module, inputs: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return _first(model.forward_features(inputs) if features else model(inputs)).double()

    reference = run(copy.deepcopy(adapted).double(), x.double())
    scale = max(reference.abs().max().item(), 1e-12)
    unmerged_err = (y.double() - reference).abs().max().item() / scale
    try:
        arc_peft.merge_adapter(adapted)
    except arc_peft.MergeError as exc:
        reason = str(exc).split(": ", 1)[-1]
        return f"refused: {reason[:160]}"
    err = (run(adapted, x) - reference).abs().max().item() / scale
    if err <= max(1e-4, 10 * unmerged_err):
        return "exact"
    return f"WRONG: merged output differs by {err:.1e} (relative; unmerged {unmerged_err:.1e})"


def _first(y: Any) -> torch.Tensor:
    if isinstance(y, torch.Tensor):
        return y
    if isinstance(y, dict):
        y = list(y.values())
    if hasattr(y, "last_hidden_state"):
        return y.last_hidden_state
    return _first(y[0])


def ok(row: dict) -> bool:
    """Fully adapted: no error, every attention module adapted (or pooling, on purpose), and
    under each method every site adapted and every adapter run by a real forward, changing the
    output (so a row checked on the meta device is never OK)."""
    if "error" in row or not row.get("attn") or row.get("uncovered"):
        return False
    if any(not i["on_purpose"] for i in row.get("left_out", ())):
        return False
    methods = row.get("methods", {})
    return set(methods) == set(METHODS) and all(method_ok(m) for m in methods.values())


def structure_ok(row: dict) -> bool:
    """What the meta device can check: every attention module is a site or pooling on
    purpose, every site's hooks are reached, every adapter injected."""
    if "error" in row or not row.get("attn") or row.get("uncovered"):
        return False
    if any(not i["on_purpose"] for i in row.get("left_out", ())):
        return False
    methods = row.get("methods", {})
    return all("error" not in m for m in methods.values())


# -- driving --------------------------------------------------------------------------------------


def load_census(names: list[str], workers: int) -> dict[str, dict]:
    CACHE.mkdir(exist_ok=True)
    path = CACHE / "census.jsonl"
    done: dict[str, dict] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            item = json.loads(line)
            done[item["entrypoint"]] = item
    todo = [n for n in names if n not in done]
    if todo:
        print(f"census: {len(todo)} entrypoints on the meta device", file=sys.stderr)
        for item in _map(census, todo, workers):
            done[item["entrypoint"]] = item
            with path.open("a") as f:
                f.write(json.dumps(item) + "\n")
    return done


def _map(fn, items, workers):
    if workers <= 1:
        for item in items:
            yield fn(item)
        return
    import multiprocessing as mp

    with mp.get_context("fork").Pool(workers, maxtasksperchild=20) as pool:
        yield from pool.imap_unordered(fn, items)


def _check_auto(name: str, real: bool = False) -> dict:
    """Real device when ``real`` or small enough (adapters counted, output checked), the meta
    device otherwise (structure only)."""
    device = "cpu"
    if not real:
        info = census(name)
        device = "cpu" if info.get("params", 0) <= REAL_LIMIT else "meta"
    row = check(name, device)
    if device == "meta" and "error" in row:  # some models need real data (data-dependent ops)
        row2 = check(name, "cpu")
        if "error" not in row2:
            row = row2
    return row


def _check_real(name: str) -> dict:
    return _check_auto(name, real=True)


def family_rows(
    fams: dict[str, list[str]],
    census_: dict[str, dict],
    torchvision: bool = True,
    progress: Path | None = None,
    workers: int = 1,
) -> list[dict]:
    """One row per timm family with attention (its smallest entrypoint that has self-attention,
    run on real tensors), then torchvision's vision transformers. Rows already in ``progress``
    (a JSON-lines file each new row is appended to) are not checked again."""
    done: dict[str, dict] = {}
    if progress is not None and progress.exists():
        for line in progress.read_text().splitlines():
            item = json.loads(line)
            done[item["key"]] = item
    jobs: list[tuple[str, Any]] = []
    for family, names in fams.items():
        if family in done:
            continue
        with_attn = [census_[n] for n in names if census_.get(n, {}).get("attn_ops")]
        failed_meta = [n for n in names if "cpu_error" in census_.get(n, {})]
        if not with_attn and len(failed_meta) == len(names):
            # no probe forward ran at all (CSATv2's wrong probe input hid a whole family): its
            # row says why, rather than the family silently not being counted
            print(f"{family}: no entrypoint ran: {census_[names[0]]}", file=sys.stderr)
            jobs.append((family, (len(names), [census_[n] for n in names])))
            continue
        if with_attn:
            jobs.append((family, (len(names), with_attn)))
    for name in TORCHVISION if torchvision else ():
        if "torchvision." + name not in done:
            jobs.append(("torchvision." + name, None))
    for row in _map(_job_row, jobs, workers):
        if row is None:
            continue
        done[row["key"]] = row
        detail = f"{row.get('error', '')} {row.get('uncovered', '')} {ran_cells(row)}"
        print(f"{row['key']}: {row['entrypoint']} ok={row['ok']} attn={row.get('attn')} "
              f"mlp={row.get('mlp')} {detail}", file=sys.stderr, flush=True)  # fmt: skip
        if progress is not None:
            with progress.open("a") as f:
                f.write(json.dumps(row) + "\n")
    keys = [f for f in fams if f in done] + [
        "torchvision." + n for n in (TORCHVISION if torchvision else ())
    ]
    return [done[k] for k in keys if k in done]


def _job_row(job: tuple[str, Any]) -> dict | None:
    """The row of one timm family (``(family, (entrypoints, census of those with attention))``)
    or one torchvision model (``(name, None)``); ``None`` for a family whose only attention is
    attention pooling."""
    key, info = job
    if info is None:
        row = _check_auto(key)
        row["family"] = "torchvision"
        row["key"] = key
        return row
    n_names, with_attn = info
    # the smallest entrypoint with self-attention (not only an attention-pooling head)
    for candidate in sorted(with_attn, key=lambda c: c.get("params", 0))[:5]:
        print(f"{key}: {candidate['entrypoint']}", file=sys.stderr, flush=True)
        row = _check_real(candidate["entrypoint"])
        if not pooling_only(row):
            break
    if pooling_only(row):
        return None
    row["family"] = key
    row["key"] = key
    row["entrypoints"] = n_names
    row["entrypoints_attn"] = len(with_attn)
    return row


def _cell_left(row: dict) -> str:
    grouped: dict[tuple, int] = defaultdict(int)
    for i in row.get("left_out", []):
        grouped[(i["kind"], i["reason"], i["on_purpose"])] += 1
    parts = [f"{n}× `{k}`{' (on purpose)' if p else ''}: {r}" for (k, r, p), n in grouped.items()]
    dead: dict[str, list[str]] = defaultdict(list)
    for i in row.get("no_output", []):
        dead[i["kind"]].append(i["path"])
    parts += [
        f"{len(paths)}× `{k}` MLP site where no adapter adding to the output runs (AdaptMLP left "
        f"out): a forward never reaches its output end (`{paths[0]}` ...)"
        for k, paths in dead.items()
    ]
    return "; ".join(parts)


def markdown(rows: list[dict], all_summary: str | None) -> str:
    import timm
    import torchvision

    fam = [r for r in rows if r["family"] != "torchvision"]
    tv = [r for r in rows if r["family"] == "torchvision"]
    n_ok = sum(r["ok"] for r in fam)
    lines = [
        "## Coverage: every timm family with attention",
        "",
        "*Generated by `scripts/coverage.py`: do not edit by hand. Rerun with",
        "`python scripts/coverage.py` (one model per family, a few minutes on a CPU; it rewrites",
        "this section) after `python scripts/coverage.py --all` (every entrypoint, hours; results",
        "cached in `$ARC_PEFT_COVERAGE_CACHE`, default `/tmp/arc_peft_coverage`).*",
        "",
        "arc_peft finds adapter sites by probing one forward pass (see [Concepts](concepts.md)),",
        "so it adapts architectures nobody registered. This page is the evidence: every timm",
        "model family whose forward issues self-attention, built randomly initialised",
        f"(timm {timm.__version__}, torchvision {torchvision.__version__}, torch",
        f"{torch.__version__}), with `arc_peft.site_plan`, then, for each method,",
        "`inject_arc(ARCConfig(rank=4))` and `inject_arc(AdaptMLPConfig(bottleneck=8))` and one",
        "forward on real tensors (the CPU) with every adapter non-zero, forward hooks counting",
        "the adapter layers that run. **OK** means: no error, every module issuing attention ops",
        "is an attention site (or attention pooling, left out on purpose), under both methods",
        "every site is adapted and every injected adapter ran in that forward, and the output",
        "changed. *Ran* is adapters run / adapters injected; a model on the meta device counts",
        "no adapter as running.",
        "",
        f"**timm families with attention: {n_ok} / {len(fam)} fully adapted** (the smallest",
        "entrypoint of each family that has attention, a family being a `timm.models` module).",
        "torchvision models too large to run here are checked on the meta device: *sites only*",
        "(every attention module a site and every site's hooks reached, no adapter counted).",
        "",
    ]
    if all_summary:
        lines += [all_summary, ""]
    lines += [
        "| Family | Entrypoint | Params | OK | Attention sites | MLP sites | ARC ran "
        "| AdaptMLP ran | ARC merge | Left out / error |",
        "|---|---|---:|:-:|---:|---:|---:|---:|---|---|",
    ]
    for r in fam + tv:
        note = r.get("error", "") or _cell_left(r)
        if r.get("uncovered"):
            note += f" not adapted: {', '.join(r['uncovered'][:3])}"
        if r.get("device") == "meta":
            note += " (checked on the meta device: no adapter counted as running)"
        for method, result in r.get("methods", {}).items():
            if result.get("error"):
                note += f" {method}: {result['error']}"
        note = note.replace("|", "\\|").replace("\n", " ")
        params = f"{r['params'] / 1e6:.1f}M" if "params" in r else ""
        kinds = ", ".join(r.get("attn_kinds", []))
        mkinds = ", ".join(r.get("mlp_kinds", []))
        merge = r.get("methods", {}).get("ARC", {}).get("merge", "not checked")
        merge = _short(merge).replace("|", "\\|").replace("\n", " ")
        arc, mlp = ran_cells(r)
        verdict = "yes" if r["ok"] else "**no**"
        if r.get("device") == "meta" and structure_ok(r):
            verdict = "sites only"
        lines.append(
            f"| {r['family']} | `{r['entrypoint']}` | {params} | {verdict} "
            f"| {r.get('attn', '')} ({kinds}) | {r.get('mlp', '')} ({mkinds}) | {arc} | {mlp} "
            f"| {merge} | {note} |"
        )
    lines.append("")
    return "\n".join(lines)


def ran_cells(row: dict) -> tuple[str, ...]:
    """``adapters run / injected`` per method, for the table."""
    cells = []
    for method in METHODS:
        result = row.get("methods", {}).get(method, {})
        if result.get("none"):
            cell = "no site"
        elif "error" in result:
            cell = "error"
        elif "adapters_run" not in result:
            cell = f"? / {result.get('adapters', '?')}"
        else:
            cell = f"{result['adapters_run']} / {result['adapters']}"
        if result.get("left_out"):
            cell += f" ({len(result['left_out'])} left out)"
        cells.append(cell)
    return tuple(cells)


def pooling_only(row: dict) -> bool:
    """The model's only attention is attention pooling (a ResNet's CLIP pool, left out on
    purpose): no self-attention to adapt, so not counted."""
    items = row.get("left_out", [])
    return row.get("attn") == 0 and bool(items) and all(i["on_purpose"] for i in items)


def _short(merge: str) -> str:
    """A merge status without the advice part of the refusal message."""
    if "(max difference" in merge:
        merge = merge[: merge.index(")", merge.index("(max difference")) + 1]
    return merge.split(", so the adapter")[0].split(". ")[0]


def all_summary_text(path: Path) -> str | None:
    if not path.exists():
        return None
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    pooling = [r["entrypoint"] for r in rows if pooling_only(r)]
    rows = [r for r in rows if not pooling_only(r)]
    if not rows:
        return None
    real = [r for r in rows if r.get("device") != "meta"]
    meta = [r for r in rows if r.get("device") == "meta"]
    n_ok = sum(r["ok"] for r in real)
    bad = [r for r in real if not r["ok"]] + [r for r in meta if not structure_ok(r)]
    text = (
        f"**Every timm entrypoint with attention (`--all`): {n_ok} / {len(real)} run on real "
        f"tensors adapted ({100 * n_ok / max(len(real), 1):.1f} %)"
    )
    if meta:
        text += (
            f"; {sum(structure_ok(r) for r in meta)} / {len(meta)} larger ones checked on the "
            "meta device only (sites and hooks, no adapter counted as running)"
        )
    text += ".**"
    if pooling:
        text += (
            f" Not counted: {len(pooling)} whose only attention is attention pooling, left out"
            f" on purpose ({', '.join(f'`{p}`' for p in pooling[:8])}"
            f"{' ...' if len(pooling) > 8 else ''})."
        )
    if bad:
        text += " Not adapted: " + ", ".join(
            f"`{r['entrypoint']}` ({(r.get('error') or 'partial')[:80]})" for r in bad[:40]
        )
        if len(bad) > 40:
            text += f" and {len(bad) - 40} more"
    return text


def main() -> None:
    global REAL_LIMIT, TIMEOUT
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--all", action="store_true", help="check every entrypoint with attention")
    parser.add_argument("--only", nargs="*", help="families (or entrypoints) to check")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", default=str(CACHE / "all.jsonl"))
    parser.add_argument("--no-docs", action="store_true")
    parser.add_argument(
        "--timeout", type=float, default=TIMEOUT, help="seconds per model (default %(default)s)"
    )
    parser.add_argument(
        "--real-limit", type=float, default=120e6,
        help="models with more parameters are checked on the meta device (no output check)",
    )  # fmt: skip
    parser.add_argument(
        "--docs-only", action="store_true",
        help="rewrite docs/models.md from the cached results of the last runs",
    )  # fmt: skip
    args = parser.parse_args()
    REAL_LIMIT, TIMEOUT = args.real_limit, args.timeout
    if args.docs_only:
        rows = json.loads((CACHE / "families.json").read_text())
        write_docs(markdown(rows, all_summary_text(Path(args.out))))
        return
    torch.set_num_threads(1 if args.workers > 1 else torch.get_num_threads())
    fams = families()
    if args.only:
        picked = {f: n for f, n in fams.items() if f in args.only}
        names = [n for ns in fams.values() for n in ns if n in args.only]
        cen = load_census([n for ns in picked.values() for n in ns], args.workers)
        for name in names:
            print(json.dumps(_check_auto(name), indent=1))
        for row in family_rows(picked, cen, torchvision="torchvision" in args.only):
            row.pop("trace", None) if row["ok"] else None
            print(json.dumps(row, indent=1))
        return
    all_names = [n for ns in fams.values() for n in ns]
    cen = load_census(all_names, args.workers)
    if args.all:
        out = Path(args.out)
        out.parent.mkdir(exist_ok=True)
        done = set()
        if out.exists():
            done = {json.loads(line)["entrypoint"] for line in out.read_text().splitlines()}
        todo = [n for n in all_names if cen[n].get("attn_ops") and n not in done]
        print(f"--all: {len(todo)} entrypoints to check", file=sys.stderr)
        for row in _map(_check_auto, todo, args.workers):
            row.pop("trace", None)
            with out.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(f"{row['entrypoint']}: ok={row['ok']} {row.get('error', '')[:100]}",
                  file=sys.stderr, flush=True)  # fmt: skip
        print(all_summary_text(out))
        return
    rows = family_rows(fams, cen, progress=CACHE / "families.jsonl", workers=args.workers)
    (CACHE / "families.json").write_text(json.dumps(rows, indent=1))
    if not args.no_docs:
        write_docs(markdown(rows, all_summary_text(Path(args.out))))


def write_docs(section: str) -> None:
    page = DOCS.read_text()
    if BEGIN in page:
        head, rest = page.split(BEGIN, 1)
        tail = rest.split(END, 1)[1]
    else:
        head, tail = page.rstrip("\n") + "\n\n", ""
    DOCS.write_text(f"{head}{BEGIN}\n{section}{END}{tail}")
    print(f"wrote {DOCS}", file=sys.stderr)


if __name__ == "__main__":
    os.environ.setdefault("TIMM_FUSED_ATTN", "1")
    main()
