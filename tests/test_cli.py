from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import REPO
from vasa.cli import build_parser, main

# The option of every command that names what it writes; `verify` writes nothing (it prints JSON), nor does
# `serve` (it prints its address and serves). A command added or removed must be listed here, so that its help
# is checked too.
OUTPUT_OPTION = {
    "sample": "--out", "ingest": "--out", "preprocess": "--out", "train-latent": "--out",
    "extract-motion": "--out", "train-motion": "--out", "export": "--out", "generate": "--out", "demo": "--out",
    "audit": "--out", "pin-shards": "--out", "train-judges": "--out", "score": "--out", "evaluate": "--out",
    "takedown": "--denylist", "retrain": "--records", "verify": None, "serve": None, "plan": None,
}  # fmt: skip


def test_help_explains_every_stage(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert "sample" in text and "stage" in text
    commands = build_parser()._subparsers._group_actions[0].choices
    assert sorted(commands) == sorted(OUTPUT_OPTION), "a command without an entry in OUTPUT_OPTION (or the reverse)"
    for name, parser in commands.items():
        help_text = parser.format_help()
        assert len(parser.description) > 80, f"`vasa {name} --help` says too little"
        option = OUTPUT_OPTION[name]
        if option is None:  # prints its result: no output option at all
            assert "--out" not in help_text and "print" in parser.description.lower(), f"`vasa {name} --help`"
            continue
        action = next((a for a in parser._actions if option in a.option_strings), None)
        assert action is not None and option in help_text, f"`vasa {name} --help` does not name {option}"
        assert action.help and len(action.help) > 10, f"`vasa {name} --help` does not say what {option} is"


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


def test_preprocess_with_a_mistyped_manifest_exits_2_and_touches_nothing(tmp_path, capsys):
    """Issue 8 section 1: a mistyped --manifest is an error, not an empty manifest that wipes OUT."""
    out = tmp_path / "shards"
    out.mkdir()
    files = {
        "train-0-0000.tar": b"a shard",
        "train-0-0000.stats.json": b"{}",
        "index.json": b'{"splits": {"train": {"shards": [{"shard": "train-0-0000.tar"}]}}}',
        "failures.parquet": b"PAR1",
        "my_backup.tar": b"a user's own file",
    }
    for name, data in files.items():
        (out / name).write_bytes(data)
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    typo = tmp_path / "ingest" / "manifst.parquet"
    args = [
        "--params",
        str(REPO / "params.yaml"),
        "preprocess",
        "--manifest",
        str(typo),
        "--out",
        str(out),
        "--cache",
        str(tmp_path / "cache"),
    ]
    assert main(args) == 2
    assert f"manifest not found: {typo}" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == files
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamps
    assert not (tmp_path / "cache").exists()


def test_preprocess_help_names_the_safety_flag():
    result = subprocess.run([sys.executable, "-m", "vasa.cli", "preprocess", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "--allow-empty" in result.stdout
