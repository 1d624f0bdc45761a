"""The README is the front door: its usage example must run as written.

(Its supported-models table is kept in sync by tests/test_docs.py.)
"""

import re
from pathlib import Path

import arc_peft

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_usage_example_runs_as_written(tmp_path, monkeypatch, capsys):
    usage = README.read_text().split("## Usage", 1)[1]
    code = _python_blocks(usage)[0]
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    printed = capsys.readouterr().out
    summary = "trainable 173K of 86M (0.20%) | adapters 96,432 | head 76,900"
    assert f"{summary} | sites adapted: attn 12, mlp 12" in printed
    model = namespace["model"]
    assert arc_peft.adapter_configs(model) == {}  # merged: a plain backbone again
    assert (tmp_path / "task.safetensors").is_file()
