from __future__ import annotations

import subprocess
import sys

import pytest

from vasa.cli import build_parser, main


def test_help_explains_every_stage(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert "sample" in text and "stage" in text
    for name, parser in build_parser()._subparsers._group_actions[0].choices.items():
        help_text = parser.format_help()
        assert len(parser.description) > 80, f"`vasa {name} --help` says too little"
        assert "--out" in help_text or name != "sample"


def test_console_script_runs():
    result = subprocess.run([sys.executable, "-m", "vasa.cli", "sample", "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    assert "provenance" in result.stdout


def test_bad_params_exit_2_with_message(tmp_path, capsys):
    bad = tmp_path / "params.yaml"
    bad.write_text("sample: {seed: 0, extra: 1}\n")
    assert main(["--params", str(bad), "sample", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "sample.extra: unknown key" in err
    assert not (tmp_path / "out").exists()
