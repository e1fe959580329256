"""What every job shares: `--config YAML` defaults under command-line overrides, and one-line errors.

A job module defines `build_parser() -> argparse.ArgumentParser` and `main(argv=None) -> int`. Its YAML
config holds the same long option names (dashes or underscores), e.g. `batch-size: 64`; a flag given on
the command line wins. Unknown keys and bad values are one-line errors that say what to fix.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any, NoReturn

import yaml


class JobError(Exception):
    """An error the user can fix; printed as one line, exit status 2."""


def fail(message: str) -> NoReturn:
    raise JobError(message)


FLAGS = {"inputs": "--input"}  # config fields whose flag is not `--` + the field with dashes


def user_message(e: Exception) -> str:
    """The library's one-line message, with each setting a SettingError names shown as the job's flag
    (`num_tokens` -> `--num-tokens`); the library itself names config fields, not flags."""
    from flextok.errors import SettingError  # imported here: it loads torch, which --help does not need

    text = str(e)
    for name in e.settings if isinstance(e, SettingError) else ():
        flag = FLAGS.get(name, "--" + name.replace("_", "-"))
        text = re.sub(rf"(?<![\w./:'-]){re.escape(name)}(?![\w./:'-])", flag, text)
    return text


def add_config_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="YAML file of option defaults (command-line flags override)")


def load_config_defaults(parser: argparse.ArgumentParser, path: Path) -> dict[str, Any]:
    """YAML keys -> parser defaults; each value is checked by the option's own type/choices."""
    if not path.is_file():
        fail(f"--config {path}: no such file")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        fail(f"--config {path}: not valid YAML ({str(e).splitlines()[0]})")
    if not isinstance(data, dict):
        fail(f"--config {path}: expected a mapping of option names to values")
    actions = {a.dest: a for a in parser._actions if a.dest not in ("help", "config")}
    defaults: dict[str, Any] = {}
    for key, value in data.items():
        dest = str(key).replace("-", "_")
        if dest not in actions:
            options = ", ".join(sorted(d.replace("_", "-") for d in actions))
            fail(f"--config {path}: unknown option '{key}' (known: {options})")
        defaults[dest] = _coerce(actions[dest], value, path, key)
    return defaults


def _coerce(action: argparse.Action, value: Any, path: Path, key: str) -> Any:
    def one(v: Any) -> Any:
        if action.type is not None and v is not None:
            try:
                v = action.type(v if not isinstance(v, bool | int | float) or action.type is not str else str(v))
            except (TypeError, ValueError, argparse.ArgumentTypeError) as e:
                fail(f"--config {path}: bad value for '{key}': {value!r} ({e})")
        if action.choices is not None and v not in action.choices:
            fail(f"--config {path}: '{key}' must be one of {list(action.choices)}, got {v!r}")
        return v

    if isinstance(value, list):
        return [one(v) for v in value]
    if isinstance(action, argparse._StoreTrueAction | argparse._StoreFalseAction) and not isinstance(value, bool):
        fail(f"--config {path}: '{key}' must be true or false, got {value!r}")
    return one(value)


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse argv, with `--config` YAML values as defaults under the command line."""
    if not any(a.dest == "config" for a in parser._actions):
        add_config_flag(parser)
    pre, _ = parser.parse_known_args(argv)
    if pre.config is not None:
        parser.set_defaults(**load_config_defaults(parser, pre.config))
    return parser.parse_args(argv)


def worker_error_line(error: BaseException) -> str | None:
    """The one line of a fixable error raised in a Ray actor or worker (today: pipeline.devices.NoCudaError),
    found in the wrapped traceback Ray hands the driver; None for any other error."""
    found = re.search(r"NoCudaError: ([^\n]+)", str(error))
    return found.group(1).strip() if found else None


def run_main(main_fn, argv: list[str] | None = None) -> int:
    """Call a job's body; turn JobError, the library's input errors (flextok.errors.UserInputError: bad
    checkpoint, bad input, bad corpus) and a worker's NoCudaError into one line on stderr and exit status 2. The
    process's malloc is tuned first (pipeline.malloc: every job process runs without mmap churn)."""
    from pipeline.malloc import tune_this_process

    tune_this_process()
    try:
        return int(main_fn(argv) or 0)
    except JobError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        from flextok.errors import UserInputError  # imported here: it loads torch, which --help does not need

        line = user_message(e) if isinstance(e, UserInputError) else worker_error_line(e)
        if line is None:
            raise
        print(f"error: {line}", file=sys.stderr)
        return 2
