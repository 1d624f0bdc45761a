"""The ``arc-peft`` console script: ``inspect`` in text and JSON, and clean failures."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import arc_peft
from arc_peft.cli import main

from models import build


@pytest.fixture(scope="module")
def adapter_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    model = build("vit", num_classes=7)
    arc_peft.inject_arc(model, arc_peft.ARCConfig(rank=4, positions=("attn",)))
    path = tmp_path_factory.mktemp("cli") / "task.safetensors"
    arc_peft.save_adapter(model, path)
    return path


# ARC_att, D=32, r=4, 2 blocks: D·r + L·(r + D); head 7·32 + 7.
ADAPTER_PARAMS = 32 * 4 + 2 * (4 + 32)
HEAD_PARAMS = 7 * 32 + 7


def test_inspect_prints_a_summary(adapter_file: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["inspect", str(adapter_file)]) == 0
    out = capsys.readouterr().out
    assert str(adapter_file) in out
    assert "rank=4" in out and "positions=('attn',)" in out
    assert f"{ADAPTER_PARAMS:,} parameters" in out
    assert f"{HEAD_PARAMS:,} parameters" in out
    assert "VisionTransformer, 2 blocks" in out


def test_inspect_json(adapter_file: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["inspect", str(adapter_file), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["method"] == "arc"
    assert arc_peft.config_from_dict(data["config"]) == arc_peft.ARCConfig(
        rank=4, positions=("attn",)
    )
    assert data["adapter_parameters"] == ADAPTER_PARAMS
    assert data["head_parameters"] == HEAD_PARAMS
    assert data["head"]["shapes"] == {"head.bias": [7], "head.weight": [7, 32]}
    assert data["backbone"]["num_blocks"] == 2
    assert data["format_version"] == 1
    assert data["arc_peft_version"] == arc_peft.__version__


@pytest.mark.parametrize(
    "content, message", [(b"\x00" * 3, "truncated"), (b"definitely not safetensors", "not a")]
)
def test_bad_file_fails_cleanly(
    tmp_path: Path, capsys: pytest.CaptureFixture, content: bytes, message: str
) -> None:
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    assert main(["inspect", str(path)]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert message in captured.err and "Traceback" not in captured.err
    assert main(["inspect", str(tmp_path / "missing.safetensors")]) == 1
    assert "No such file" in capsys.readouterr().err


def test_usage_errors(capsys: pytest.CaptureFixture) -> None:
    assert main([]) == 2
    assert "inspect" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["inspect"])  # argparse: missing FILE
    assert exc.value.code == 2


def _console_script() -> str:
    # The venv's bin folder first: PATH may point at another installation.
    local = Path(sys.executable).with_name("arc-peft")
    found = str(local) if local.exists() else shutil.which("arc-peft")
    if found is None:
        pytest.skip("the arc-peft console script is not installed (pip install -e .)")
    return found


def test_console_script(adapter_file: Path) -> None:
    script = _console_script()
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    ok = subprocess.run(
        [script, "inspect", str(adapter_file), "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["adapter_parameters"] == ADAPTER_PARAMS
