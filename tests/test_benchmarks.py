"""benchmarks/run.py keeps working: ``--quick`` runs every section on a tiny model (no timed
asserts — speed figures live in benchmarks/results, not in tests)."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import arc_peft

RUN_PY = Path(__file__).resolve().parents[1] / "benchmarks" / "run.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("arc_peft_benchmarks_run", RUN_PY)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


@pytest.fixture(scope="module")
def quick(bench, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    threads = torch.get_num_threads()
    try:
        results = bench.main(["--quick", "--repeats", "1", "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    return results, out


def _finite_positive(value: float) -> bool:
    return isinstance(value, float) and math.isfinite(value) and value > 0


def test_quick_writes_table_plot_and_json(quick):
    results, out = quick
    assert (out / "benchmarks.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (out / "results.md").read_text()
    for heading in (
        "## Inference",
        "## Training step",
        "## Scaling",
        "## Adapter files",
        "## Multi-task",
    ):
        assert heading in table
    assert f"torch {torch.__version__}" in table  # stamped with the versions
    stored = json.loads((out / "results.json").read_text())
    assert stored["environment"]["torch"] == torch.__version__
    assert set(stored) >= {"inference", "training", "scaling", "files", "multitask"}
    assert "compile" not in results  # --quick leaves torch.compile out


def test_quick_inference_rows(quick, bench):
    rows = quick[0]["inference"]
    expected = set(bench.INFER_METHODS) - (set() if bench.has_peft() else {"lora"})
    for batch in (1, 4):
        got = {r["method"]: r for r in rows if r["batch"] == batch}
        assert set(got) == expected
        assert got["plain"]["ratio_plain"] == 1.0
        assert all(_finite_positive(r["ratio_plain"]) for r in got.values())


def test_quick_training_rows(quick, bench):
    rows = {r["method"]: r for r in quick[0]["training"]}
    expected = set(bench.TRAIN_METHODS) - (set() if bench.has_peft() else {"lora"})
    assert set(rows) == expected
    assert rows["full"]["ratio_full"] == 1.0 and rows["floor"]["ratio_floor"] == 1.0
    assert all(_finite_positive(r["ratio_full"]) for r in rows.values())
    assert all("mem_default_mib" in r for r in rows.values())
    # The floor trains only the head, full fine-tuning everything, ARC adapters + head.
    assert rows["floor"]["trainable"] == rows["linear"]["trainable"]
    assert rows["linear"]["trainable"] < rows["arc"]["trainable"] < rows["full"]["trainable"]


def test_quick_other_sections(quick):
    results = quick[0]
    assert {r["axis"] for r in results["scaling"]} == {"tokens", "depth", "width", "rank"}
    files = results["files"]
    assert files["file_bytes"] > 4 * files["adapter_params"]  # float32 weights + header
    multi = results["multitask"]
    for key in ("merged_vs_plain", "unmerged_vs_plain", "mixed_vs_one_by_one"):
        assert _finite_positive(multi[key])


def test_methods_are_what_they_claim(bench):
    """The benchmarked models: merged ARC computes what unmerged ARC does, LoRA trains only
    its low-rank factors and the head."""
    settings = bench.parse_args(["--quick"])
    x, _ = bench.make_batch(settings, 2)
    arc = bench.build("vit_tiny_patch16_224", "arc", settings)
    bench._randomise_adapters(arc)
    merged = bench.build("vit_tiny_patch16_224", "arc_merged", settings)
    assert not arc_peft.slots.iter_slots(merged)  # no hooks left
    with torch.no_grad():
        torch.testing.assert_close(merged.eval()(x), arc.eval()(x), rtol=1e-4, atol=1e-5)
        plain = bench.build("vit_tiny_patch16_224", "plain", settings).eval()
        assert not torch.allclose(plain(x), arc(x))
    if bench.has_peft():
        lora = bench.build("vit_tiny_patch16_224", "lora", settings)
        trainable = [n for n, p in lora.named_parameters() if p.requires_grad]
        head = {f"head.{n}" for n, _ in lora.head.named_parameters()}
        lora_params = set(trainable) - head
        assert lora_params and head <= set(trainable)
        lora_modules = {
            id(p)
            for m in bench._lora_modules(lora)
            for part in (m.lora_A, m.lora_B)
            for p in part.parameters()
        }
        named = dict(lora.named_parameters())
        assert {id(named[n]) for n in lora_params} == lora_modules


def test_lora_rows_skipped_without_peft(bench, monkeypatch, tmp_path):
    monkeypatch.setattr(bench, "has_peft", lambda: False)
    threads = torch.get_num_threads()
    try:
        results = bench.main(
            ["--quick", "--repeats", "1", "--sections", "inference", "--out", str(tmp_path)]
        )
    finally:
        torch.set_num_threads(threads)
    assert "lora" not in {r["method"] for r in results["inference"]}
    assert any("peft is not installed" in note for note in results["notes"])
    assert "peft is not installed" in (tmp_path / "results.md").read_text()


def test_unknown_section_is_rejected(bench):
    with pytest.raises(SystemExit):
        bench.parse_args(["--sections", "inference,speed"])


@pytest.mark.slow
def test_memory_in_fresh_processes(tmp_path):
    """The fork-server path of the full run (slow: the server imports torch afresh)."""
    cmd = [
        sys.executable,
        str(RUN_PY),
        "--quick",
        "--repeats",
        "1",
        "--sections",
        "training",
        "--memory",
        "fresh",
        "--out",
        str(tmp_path),
    ]
    subprocess.run(cmd, check=True, timeout=600)
    rows = json.loads((tmp_path / "results.json").read_text())["training"]
    assert all(math.isfinite(r["mem_live_mib"]) and r["mem_live_mib"] > 0 for r in rows)


def test_render_combines_runs(quick, bench, tmp_path):
    results, out = quick
    part = json.loads((out / "results.json").read_text())
    only_files = {k: v for k, v in part.items() if k not in ("training", "scaling")}
    only_training = {k: v for k, v in part.items() if k not in ("files", "inference")}
    (tmp_path / "a.json").write_text(json.dumps(only_files))
    (tmp_path / "b.json").write_text(json.dumps(only_training))
    combined = bench.main(
        ["--render", str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--out", str(tmp_path)]
    )
    # Compared as JSON: a NaN ratio (zero in-process memory growth) is not equal to itself.
    assert json.dumps(combined["training"]) == json.dumps(part["training"])
    assert json.dumps(combined["files"]) == json.dumps(part["files"])
    assert [r["method"] for r in combined["training"]] == [r["method"] for r in results["training"]]
    assert " && " in combined["command"]
    assert "## Training step" in (tmp_path / "results.md").read_text()
