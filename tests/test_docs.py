"""The documentation stays true to the code: the supported-models table is the registry's, and
the MkDocs site builds without a warning.

Run this file as a script to regenerate the table: ``python tests/test_docs.py``.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODELS_PAGE = ROOT / "docs" / "models.md"
# Pages that carry the generated supported-models table between the markers below.
TABLE_PAGES = (MODELS_PAGE, ROOT / "README.md")
BEGIN = "<!-- BEGIN supported-models (generated: python tests/test_docs.py) -->"
END = "<!-- END supported-models -->"


def _render(page: str, path: Path = MODELS_PAGE) -> str:
    """``page`` with the text between the markers replaced by the registry's table."""
    from arc_peft.discovery.models_table import supported_models_markdown

    if page.count(BEGIN) != 1 or page.count(END) != 1:
        raise ValueError(f"{path} must hold the markers {BEGIN!r} and {END!r} once each")
    head, rest = page.split(BEGIN)
    _, tail = rest.split(END)
    return f"{head}{BEGIN}\n{supported_models_markdown()}{END}{tail}"


@pytest.mark.parametrize("path", TABLE_PAGES, ids=lambda p: p.name)
def test_supported_models_table_in_sync(path: Path) -> None:
    page = path.read_text()
    assert page == _render(page, path), f"{path.name} is out of date: run python tests/test_docs.py"


def test_table_lists_every_builtin_target() -> None:
    import arc_peft
    from arc_peft.discovery.models_table import supported_models_markdown

    table = supported_models_markdown()
    builtins = [t for t in arc_peft.registered_targets() if t.source != "user"]
    rows = [line for line in table.splitlines() if line.startswith("| `")]
    assert len(rows) == len(builtins)
    for target in builtins:
        cls = target.module_type
        assert f"`{cls.__module__}.{cls.__qualname__}`" in table


def test_table_follows_registrations() -> None:
    from torch import nn

    import arc_peft
    from arc_peft.discovery import models_table, targets

    class DocsProbeAttention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.qkv = nn.Linear(4, 12)

        def forward(self, x):
            return x

    arc_peft.register_target(DocsProbeAttention, position="attn")
    try:
        assert "DocsProbeAttention" not in models_table.supported_models_markdown()
        assert "DocsProbeAttention" in models_table.supported_models_markdown(builtin_only=False)
    finally:
        del targets._REGISTRY[DocsProbeAttention]


def test_nav_lists_every_page() -> None:
    config = (ROOT / "mkdocs.yml").read_text()
    listed = set(re.findall(r":\s*([\w-]+\.md)\s*$", config, flags=re.MULTILINE))
    pages = {p.name for p in (ROOT / "docs").glob("*.md")}
    assert pages == listed, f"docs/ pages {sorted(pages)} vs mkdocs.yml nav {sorted(listed)}"


@pytest.mark.skipif(shutil.which("mkdocs") is None, reason="mkdocs is not installed")
def test_mkdocs_build_strict(tmp_path: Path) -> None:
    command = ["mkdocs", "build", "--strict", "--quiet", "--site-dir", str(tmp_path / "site")]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert (tmp_path / "site" / "api" / "index.html").is_file()


if __name__ == "__main__":
    for path in TABLE_PAGES:
        path.write_text(_render(path.read_text(), path))
        print(f"updated {path}", file=sys.stderr)


RECIPES = ROOT / "docs" / "recipes.md"


def _recipe_blocks() -> list[tuple[str, str | None]]:
    """``(code, required module or None)`` of every python block of docs/recipes.md; a block
    preceded by ``<!-- requires: NAME -->`` needs that optional package."""
    pattern = r"(?:<!-- requires: (\w+) -->\n)?```python\n(.*?)```"
    return [(code, need or None) for need, code in re.findall(pattern, RECIPES.read_text(), re.S)]


@pytest.mark.parametrize("index", range(1, len(_recipe_blocks())))
def test_recipe_runs_as_written(index: int, tmp_path: Path, monkeypatch) -> None:
    blocks = _recipe_blocks()
    code, need = blocks[index]
    if need is not None:
        pytest.importorskip(need)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(blocks[0][0], f"{RECIPES.name}[setup]", "exec"), namespace)
    exec(compile(code, f"{RECIPES.name}[{index}]", "exec"), namespace)
