from __future__ import annotations

import subprocess
import sys

from click.testing import CliRunner

from vitlab.cli import cli


def run(*args: str):
    return CliRunner().invoke(cli, list(args))


def test_models_lists_names_counts_and_flops() -> None:
    r = run("models", "vit_tiny_patch16_224")
    assert r.exit_code == 0, r.output
    assert "vit_tiny_patch16_224" in r.output and "5,717,416" in r.output
    assert "2.51" in r.output  # GFLOPs at 224 (multiply-add = 2)


def test_info() -> None:
    r = run("info", "vit_tiny_patch4_28")
    assert r.exit_code == 0
    assert "5,353,738" in r.output and "(1, 28, 28)" in r.output and "patch_size=4" in r.output


def test_unknown_name_is_a_one_line_error_with_suggestions() -> None:
    r = run("info", "vit_tiny_patch4_27")
    assert r.exit_code == 2
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: unknown model 'vit_tiny_patch4_27'")
    assert "vit_tiny_patch4_28" in lines[0]
    assert run("models", "nothing*").exit_code == 2


def test_console_script_runs_as_module() -> None:
    out = subprocess.run([sys.executable, "-m", "vitlab", "info", "nope"], capture_output=True, text=True)
    assert out.returncode == 2
    assert out.stderr.strip().startswith("error: unknown model 'nope'") and "Traceback" not in out.stderr
