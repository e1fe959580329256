"""Every job command line in README.md and docs/*.md parses with that job's own argument parser, and has what
the job requires; every configs/*.yaml key is an option of the job it configures.

Found: lines of fenced code blocks (backslash continuations joined, comments dropped) and inline code spans
with at least one option, that run `flextok ...`, `.venv/bin/flextok ...`, `python jobs/X.py ...` or
`ray job submit ... -- python jobs/X.py ...`. Placeholders (BUCKET, <submission id>, ...) are plain values;
`[--opt value]` marks an optional part; a trailing `...` elides the rest (then required options are not
checked); a `--config` path with a placeholder is left out (its keys cannot count).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest

from jobs.cli import COMMANDS, resolve
from jobs.common import JobError, load_config_defaults, parse_args, run_main

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]

# What each job cannot run without: groups of alternatives (parser dests), one of each group must be given.
# `test_required_table_is_what_the_jobs_enforce` checks every entry against the job's own main().
REQUIRED: dict[str, list[tuple[str, ...]]] = {
    "jobs.demo": [],
    "jobs.make_shards": [("input",), ("output",)],
    "jobs.pretokenize": [("model",), ("input",), ("output",)],
    "jobs.validate_corpus": [("corpus_dir", "corpus")],
    "jobs.train_tokenizer": [("input",), ("output",)],
    "jobs.train_ar": [("corpus",), ("output",)],
    "jobs.eval_fid": [("real",), ("fake", "save_stats")],
    "jobs.eval_sweep": [("model",), ("input",), ("output",)],
    "jobs.eval_generate": [("ar_model",), ("model",), ("reference_stats",), ("output",)],
    "jobs.inception_convert": [],
    "jobs.train_length_predictor": [("model",), ("table",), ("output",)],
}
PLACEHOLDER = re.compile(r"<[^>]*>|\b[A-Z][A-Z_]{2,}\b")


@dataclass
class Command:
    where: str  # file:line
    text: str
    module: str | None  # None: the command names no job
    argv: list[str]
    elided: bool  # ends in `...`


def command_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, text) of fenced code block lines (continuations joined) and of inline code spans."""
    out, fence, pending, start = [], None, "", 0
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.lstrip().startswith("```"):
            fence = None if fence is not None else line.strip()[3:]
            continue
        if fence is not None and fence in ("", "bash", "sh", "shell", "console"):
            if not pending:
                start = n
            if line.rstrip().endswith("\\"):
                pending += line.rstrip()[:-1] + " "
                continue
            out.append((start, pending + line))
            pending = ""
        elif fence is None:
            out += [(n, span) for span in re.findall(r"`([^`]+)`", line) if " --" in span]
    return out


def job_argv(words: list[str]) -> tuple[str, list[str]] | None:
    """(job module, its arguments) for a command line that runs a job, else None."""
    while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):  # VAR=value prefixes
        words = words[1:]
    if words[:3] == ["ray", "job", "submit"]:
        words = words[words.index("--") + 1 :] if "--" in words else []
    if words and words[0].endswith("python") and len(words) > 1 and words[1].startswith("jobs/"):
        module = "jobs." + words[1].removeprefix("jobs/").removesuffix(".py")
        return module, words[2:]
    if words and words[0] in ("flextok", ".venv/bin/flextok"):
        found, rest = resolve(words[1:])
        return (COMMANDS[found][0] if found else "unknown command: " + " ".join(words[1:3])), rest
    return None


def find_commands(paths: list[Path]) -> list[Command]:
    found = []
    for path in paths:
        for n, text in command_lines(path):
            text = re.sub(r"^\[demo \d+/\d+\] [a-z ]+: ", "", text.strip())  # the demo's printed step lines
            try:
                words = shlex.split(text.replace("[", " ").replace("]", " "), comments=True)
            except ValueError:
                continue
            hit = job_argv(words)
            if hit is None or PLACEHOLDER.fullmatch(hit[0].removeprefix("jobs.")):
                continue
            module, argv = hit
            elided = bool(argv) and argv[-1] in ("...", "…")
            where = f"{path.relative_to(REPO) if path.is_relative_to(REPO) else path.name}:{n}"
            found.append(Command(where, text, module, argv[:-1] if elided else argv, elided))
    return found


COMMANDS_IN_DOCS = find_commands(DOCS)


def parse(module: str, argv: list[str]) -> argparse.Namespace | None:
    """The job's own parsing (with --config merged); None for --help. Usage errors raise ValueError."""
    parser = importlib.import_module(module).build_parser()

    def error(message: str):
        raise ValueError(message)

    parser.error = error
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            return parse_args(parser, argv)
    except SystemExit as e:  # --help prints and exits 0: the test process goes on
        assert e.code in (0, None) and ({"-h", "--help"} & set(argv)), f"exit {e.code}"
        return None


def without_placeholder_configs(argv: list[str]) -> list[str]:
    out, skip = [], False
    for i, word in enumerate(argv):
        if skip:
            skip = False
            continue
        if word == "--config" and i + 1 < len(argv) and PLACEHOLDER.search(argv[i + 1]):
            skip = True
            continue
        out.append(word)
    return out


def test_commands_are_found_in_code_blocks_and_inline_spans(tmp_path):
    doc = tmp_path / "x.md"
    doc.write_text(
        "Run `flextok eval fid --real a/ --fake b/` or `flextok shards` (no option: a name, not a command).\n"
        "```bash\n"
        "make demo   # not a job\n"
        "RAY_ADDRESS=http://h:8265 ray job submit --working-dir . -- python jobs/pretokenize.py \\\n"
        "    --model m --input 's3://BUCKET/*.tar' --output o   # a comment\n"
        ".venv/bin/flextok demo --gpus 1 ...\n"
        "```\n"
        "```python\nflextok = 1  # python blocks are not shell\n```\n"
    )
    found = [(c.where, c.module, c.argv, c.elided) for c in find_commands([doc])]
    assert found == [
        ("x.md:1", "jobs.eval_fid", ["--real", "a/", "--fake", "b/"], False),
        ("x.md:4", "jobs.pretokenize", ["--model", "m", "--input", "s3://BUCKET/*.tar", "--output", "o"], False),
        ("x.md:6", "jobs.demo", ["--gpus", "1"], True),
    ]


def test_the_docs_have_job_commands_of_every_kind():
    kinds = {c.text.split()[0] for c in COMMANDS_IN_DOCS}
    assert {"flextok", ".venv/bin/flextok", "python", "ray"} <= kinds, kinds
    assert len(COMMANDS_IN_DOCS) >= 20


@pytest.mark.parametrize("cmd", COMMANDS_IN_DOCS, ids=[c.where for c in COMMANDS_IN_DOCS])
def test_documented_command_parses_with_its_jobs_parser(cmd, monkeypatch):
    monkeypatch.chdir(REPO)  # --config paths are relative to the checkout
    assert cmd.module in REQUIRED, f"{cmd.where}: {cmd.module}: {cmd.text}"
    argv = without_placeholder_configs(cmd.argv)
    # `--model ...`: the elision may stand for the last option's value
    tries = [argv + ["VALUE"], argv] if cmd.elided and argv and argv[-1].startswith("--") else [argv]
    for i, attempt in enumerate(tries):
        try:
            args = parse(cmd.module, attempt)
            break
        except (ValueError, JobError) as e:
            if i == len(tries) - 1:
                pytest.fail(f"{cmd.where}: {e}\n  {cmd.text}")
    if args is None or cmd.elided:
        return
    for group in REQUIRED[cmd.module]:
        given = [getattr(args, dest, None) not in (None, [], "") for dest in group]
        assert any(given), f"{cmd.where}: missing {' or '.join(d.replace('_', '-') for d in group)}\n  {cmd.text}"


def placeholder_argv(module: str, leave_out: tuple[str, ...] = ()) -> list[str]:
    argv = []
    for group in REQUIRED[module]:
        if group != leave_out:
            dest = group[0]
            argv += ["VALUE"] if dest == "corpus_dir" else [f"--{dest.replace('_', '-')}", "VALUE"]
    return argv


@pytest.mark.parametrize("module, group", [(m, g) for m, groups in REQUIRED.items() for g in groups])
def test_required_table_is_what_the_jobs_enforce(module, group, capsys, tmp_path, monkeypatch):
    """Leaving out a group the table lists makes the job itself stop with one line naming it."""
    monkeypatch.chdir(tmp_path)
    main = importlib.import_module(module).main
    assert run_main(main, placeholder_argv(module, leave_out=group)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and any(f"--{d.replace('_', '-')}" in err for d in group), err


@pytest.mark.parametrize("config", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_config_keys_are_options_of_their_job(config):
    """configs/<job>.yaml or <job>_<name>.yaml configures jobs/<job>.py; an unknown key or bad value is an error."""
    named = (m.removeprefix("jobs.") for m in REQUIRED)
    jobs = sorted((f"jobs.{j}" for j in named if config.stem == j or config.stem.startswith(j + "_")), key=len)
    assert jobs, f"{config.name}: no job named by its file name"
    parser = importlib.import_module(jobs[-1]).build_parser()
    assert load_config_defaults(parser, config)
