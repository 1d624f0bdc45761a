"""docs/integrations.md runs as written: every python block, each in a fresh namespace in a fresh
folder. A block whose tool is not installed is skipped; one marked ``<!-- slow -->`` (a real
training run) is run with ``-m slow``."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest

PAGE = Path(__file__).resolve().parents[1] / "docs" / "integrations.md"
OPTIONAL = ("accelerate", "lightning", "onnx", "onnxruntime", "peft", "transformers")


def _blocks() -> list:
    text = PAGE.read_text()
    params = []
    for match in re.finditer(r"(<!-- slow -->\n)?```python\n(.*?)```", text, flags=re.S):
        code = match.group(2)
        line = text[: match.start(2)].count("\n") + 1
        marks = [pytest.mark.slow] if match.group(1) else []
        params.append(pytest.param(code, id=f"line{line}", marks=marks))
    return params


def test_page_has_the_recipes():
    headings = re.findall(r"^## (.+)$", PAGE.read_text(), flags=re.M)
    for topic in ("Trainer", "Lightning", "accelerate", "EMA", "ONNX", "backbone checkpoint"):
        assert any(topic in h for h in headings), topic
    assert len(_blocks()) >= 7


@pytest.mark.parametrize("code", _blocks())
def test_block_runs(code, tmp_path, monkeypatch):
    imported = set(re.findall(r"^(?:import|from) (\w+)", code, flags=re.M))
    for name in sorted(imported & set(OPTIONAL)):
        pytest.importorskip(name)
    monkeypatch.chdir(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tools' own deprecation chatter
        exec(compile(code, str(PAGE), "exec"), {"__name__": "docs_block"})
