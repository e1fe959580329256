"""The `flextok` command line: every subcommand's --help, one-line errors, lazy imports."""

from __future__ import annotations

import argparse
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

from jobs import cli

REPO = Path(__file__).resolve().parents[1]
COMMANDS = list(cli.COMMANDS)
IDS = [" ".join(words) for words in COMMANDS]


def test_top_level_help_lists_every_command(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for words in COMMANDS:
        assert " ".join(words) in out


def test_group_help_lists_only_its_subcommands(capsys):
    assert cli.main(["eval", "--help"]) == 0
    out = capsys.readouterr().out
    assert "eval sweep" in out and "eval generate" in out and "train ar" not in out


@pytest.mark.parametrize("words", COMMANDS, ids=IDS)
def test_subcommand_help(words, capsys):
    assert cli.main([*words, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: flextok {' '.join(words)}")
    assert "--config" in out


def typed_option(parser: argparse.ArgumentParser) -> str:
    """An option that 'lots' is a bad value for: a number, else an on/off flag."""
    numeric = [a for a in parser._actions if a.option_strings and a.type in (int, float)]
    flags = [a for a in parser._actions if isinstance(a, argparse._StoreTrueAction)]
    return (numeric or flags)[0].option_strings[-1].lstrip("-")


@pytest.mark.parametrize("words", COMMANDS, ids=IDS)
def test_bad_config_value_is_a_one_line_error(words, tmp_path, capsys):
    parser = importlib.import_module(cli.COMMANDS[words][0]).build_parser()
    key = typed_option(parser)
    config = tmp_path / "bad.yaml"
    config.write_text(f"{key}: lots\n")
    assert cli.main([*words, "--config", str(config)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and key in err[0] and "lots" in err[0]


def test_unknown_config_key_is_a_one_line_error(tmp_path, capsys):
    config = tmp_path / "typo.yaml"
    config.write_text("num-step: 3\n")
    assert cli.main(["demo", "--config", str(config)]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "unknown option 'num-step'" in line


def test_bad_flag_is_a_one_line_error(capsys):
    assert cli.main(["pretokenize", "--batch-size", "lots"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "--batch-size" in line and "'lots'" in line and "flextok pretokenize --help" in line


def test_unknown_command_is_a_one_line_error(capsys):
    assert cli.main(["pretokenise", "--help"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "unknown command 'pretokenise" in line and "pretokenize" in line


def test_help_does_not_import_job_dependencies():
    """`flextok --help` answers without loading torch or ray (job modules are imported lazily)."""
    code = (
        "import sys; from jobs.cli import main; main(['--help']); "
        "heavy = sorted({'torch', 'ray', 'flextok', 'pipeline'} & set(sys.modules)); "
        "assert not heavy, heavy"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_console_script_runs_a_subcommand():
    flextok = Path(sys.executable).parent / "flextok"
    result = subprocess.run([str(flextok), "demo", "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: flextok demo")


def test_the_pretokenize_config_names_the_local_sample():
    """configs/pretokenize.yaml (named in the job's docstring) parses with the job's own parser."""
    from jobs.common import parse_args
    from jobs.pretokenize import build_parser

    repo = Path(__file__).resolve().parents[1]
    args = parse_args(build_parser(), ["--config", str(repo / "configs" / "pretokenize.yaml")])
    assert args.input == ["../shared/data/imagenet-sample"] and args.model == "out/tokenizer-tiny"
    assert (repo / args.input[0] / "labels.csv").is_file()
