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


def test_inspect_verify_checks_the_data_against_its_checksum(
    adapter_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    assert main(["inspect", str(adapter_file)]) == 0
    assert "not checked (arc-peft inspect --verify)" in capsys.readouterr().out
    assert main(["inspect", str(adapter_file), "--verify"]) == 0
    assert ", verified" in capsys.readouterr().out
    assert arc_peft.read_adapter_info(adapter_file, verify=True).data_verified

    damaged = tmp_path / "damaged.safetensors"
    raw = bytearray(adapter_file.read_bytes())
    raw[-3] ^= 0x40  # one bit of the last tensor's data: the header still reads
    damaged.write_bytes(bytes(raw))
    assert main(["inspect", str(damaged)]) == 0  # the header alone cannot tell
    capsys.readouterr()
    assert main(["inspect", str(damaged), "--verify"]) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and "does not match the checksum" in captured.err
    with pytest.raises(arc_peft.AdapterFileError, match="does not match the checksum"):
        arc_peft.read_adapter_info(damaged, verify=True)


@pytest.mark.parametrize("change", ["grown", "truncated"])
def test_verify_refuses_a_file_changed_after_its_header_was_read(
    adapter_file: Path, tmp_path: Path, change: str
) -> None:
    from arc_peft.io.format import FileProblem, read_header, verify_data

    path = tmp_path / "changing.safetensors"
    shutil.copyfile(adapter_file, path)
    with open(path, "rb") as handle:
        header = read_header(handle)
        with open(path, "r+b") as writer:  # another process writes meanwhile
            if change == "grown":
                writer.seek(0, os.SEEK_END)
                writer.write(b"\0")
            else:
                writer.truncate(header.file_size - 1)
        with pytest.raises(FileProblem, match="changed while it was being read"):
            verify_data(handle, header)


def test_inspect_verify_says_when_a_file_stores_no_checksum(
    capsys: pytest.CaptureFixture,
) -> None:
    old = Path(__file__).parent / "data" / "v010_arc.safetensors"  # written by arc_peft 0.1.0
    assert main(["inspect", str(old), "--verify"]) == 0
    assert "no checksum stored" in capsys.readouterr().out
    info = arc_peft.read_adapter_info(old, verify=True)
    assert info.data_sha256 is None and not info.data_verified


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


def _run(*args: str) -> subprocess.CompletedProcess:
    env = dict(
        os.environ,
        PYTHONWARNINGS="ignore",
        PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
    )
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, timeout=300, env=env
    )


ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("verify", [[], ["--verify"]], ids=["header", "verify"])
def test_python_m_inspect_imports_no_torch(adapter_file: Path, verify: list[str]) -> None:
    """Reading a header (and hashing the data) needs no torch, timm or torchvision: that is what
    makes it fast."""
    script = (
        "import sys, runpy; sys.argv = ['arc-peft', 'inspect', *sys.argv[1:]]\n"
        "try:\n    runpy.run_module('arc_peft', run_name='__main__')\n"
        "except SystemExit as exit:\n    code = exit.code\n"
        "heavy = sorted(m for m in ('torch', 'timm', 'torchvision', 'transformers') if m in sys.modules)\n"  # noqa: E501
        "print('heavy:', heavy, 'code:', code)\n"
    )
    done = _run("-c", script, str(adapter_file), *verify)
    assert done.returncode == 0, done.stderr
    assert "heavy: [] code: 0" in done.stdout
    assert "VisionTransformer, 2 blocks" in done.stdout
    plain = _run("-m", "arc_peft", "inspect", str(adapter_file))
    assert plain.returncode == 0 and "VisionTransformer, 2 blocks" in plain.stdout


def test_inspect_several_files_and_compact_json(
    adapter_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    other = tmp_path / "other.safetensors"
    model = build("swin", num_classes=3)
    arc_peft.inject_arc(model, arc_peft.ARCConfig(rank=2))
    arc_peft.save_adapter(model, other, metadata={"dataset": "pets", "metrics": {"top1": 88.5}})
    assert main(["inspect", str(adapter_file), str(other)]) == 0
    out = capsys.readouterr().out
    assert out.count("written by") == 2 and "[dataset]   pets" in out
    assert main(["inspect", str(adapter_file), str(other), "--json"]) == 0
    text = capsys.readouterr().out
    data = json.loads(text)
    assert [d["path"] for d in data] == [str(adapter_file), str(other)]
    assert '"attn": [32, 32]' in text  # a list of widths on one line
    assert main(["compare", str(adapter_file), str(other)]) == 0
    table = capsys.readouterr().out.splitlines()
    row = next(line for line in table if " classes " in line)
    assert row.startswith("*") and row.split()[-2:] == ["7", "3"]
    assert next(line for line in table if " method " in line).startswith(" ")
    assert "top1=88.5" in next(line for line in table if " metrics " in line)


def test_unprintable_metadata_is_escaped(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "odd.safetensors"
    model = build("vit")
    arc_peft.inject_arc(model, arc_peft.ARCConfig(rank=2))
    arc_peft.save_adapter(model, path, metadata={"note": "bad \udcff and \x1b[31m red\nline"})
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "bad \\udcff and \\x1b[31m red\\nline" in out
    out.encode("utf-8")  # printable anywhere: no lone surrogate, no escape sequence
    assert "\x1b" not in out
    assert main(["inspect", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["metadata"]["note"].startswith("bad \udcff")


def test_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "multi\nline.safetensors"
    path.write_bytes(b"\x00" * 3)
    assert main(["inspect", str(path)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("arc-peft inspect: error:")


def test_check_a_file_against_a_timm_model(adapter_file: Path, capsys) -> None:
    tiny = '{"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}'
    ok = ["check", str(adapter_file), "--model", "vit_tiny_patch16_224", "--model-kwargs", tiny]
    assert main(ok) == 0
    assert "fits vit_tiny_patch16_224" in capsys.readouterr().out
    assert main([*ok[:3], "deit_tiny_patch16_224", *ok[4:]]) == 1
    err = capsys.readouterr().err
    assert "made for another model" in err and err.count("\n") == 1
    assert main([*ok[:3], "vit_small_patch16_224"]) == 1  # other widths, too
    assert "another backbone" in capsys.readouterr().err


def test_a_glob_with_other_files_reports_each_and_describes_the_rest(
    adapter_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    import safetensors.torch
    import torch

    other = tmp_path / "weights.safetensors"  # a safetensors file that is no adapter
    safetensors.torch.save_file({"w": torch.zeros(2)}, str(other))
    for command in ("inspect", "compare"):
        assert main([command, str(other), str(adapter_file)]) == 1
        out, err = capsys.readouterr()
        assert "not an arc_peft adapter file" in err and err.count("\n") == 1
        assert str(adapter_file) in out  # the valid file is still described
    assert main(["compare", str(other), str(adapter_file), "--json"]) == 1
    rows = json.loads(capsys.readouterr().out)
    assert [r["file"] for r in rows] == [str(adapter_file)]


def test_compare_json_numbers_are_numbers(adapter_file: Path, capsys) -> None:
    assert main(["compare", str(adapter_file), str(adapter_file), "--json"]) == 0
    row = json.loads(capsys.readouterr().out)[0]
    assert row["adapter params"] == ADAPTER_PARAMS and row["head params"] == HEAD_PARAMS
    assert row["classes"] == 7 and row["blocks"] == 2 and isinstance(row["size"], int)
    assert row["dataset"] is None
    assert main(["compare", str(adapter_file), str(adapter_file)]) == 0
    assert f"{ADAPTER_PARAMS:,}" in capsys.readouterr().out  # the table keeps its separators


def test_check_suggests_model_names_and_has_the_flag_its_advice_names(
    adapter_file: Path, capsys
) -> None:
    tiny = '{"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}'
    assert main(["check", str(adapter_file), "--model", "vit_tiny_patch16_22"]) == 1
    err = capsys.readouterr().err
    assert "is not a timm model; did you mean" in err and "vit_tiny_patch16_224" in err
    other = ["check", str(adapter_file), "--model", "deit_tiny_patch16_224", "--model-kwargs", tiny]
    assert main(other) == 1
    assert "--no-check-model" in capsys.readouterr().err
    assert main([*other, "--no-check-model"]) == 0  # the advice, followed, works


def test_a_closed_pipe_is_not_an_error(adapter_file: Path) -> None:
    script = (
        "import sys; from arc_peft.cli import main; "
        f"sys.exit(main(['inspect'] + [{str(adapter_file)!r}] * 200))"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), ""]))
    proc = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
    )
    proc.stdout.readline()
    proc.stdout.close()  # as `| head -1` does
    _, err = proc.communicate(timeout=120)
    assert b"Broken pipe" not in err and b"Traceback" not in err, err
