"""`flextok`: one command line for every job.

    flextok pretokenize --config configs/pretokenize.yaml --batch-size 32
    flextok eval sweep --help

Each subcommand hands its remaining arguments to the job module's `main(argv)`, so it takes exactly the
options of `python jobs/<module>.py` (including `--config YAML` with flag overrides). Job modules are
imported only when their command runs, which keeps `flextok --help` fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType
from typing import NoReturn

from jobs.common import JobError, run_main

# command words -> (job module, one-line summary)
COMMANDS: dict[tuple[str, ...], tuple[str, str]] = {
    ("demo",): ("jobs.demo", "the end-to-end demo on the ImageNet sample: local Ray, CPU, a report folder"),
    ("shards",): ("jobs.make_shards", "image folder (+ labels CSV) -> webdataset shards"),
    ("pretokenize",): ("jobs.pretokenize", "images -> FlexTok token corpus in Parquet (Ray Data)"),
    ("validate",): ("jobs.validate_corpus", "check a token corpus: schema, ids, counts, manifest"),
    ("train", "tokenizer"): ("jobs.train_tokenizer", "train a FlexTok tokenizer (Ray Train)"),
    ("train", "ar"): ("jobs.train_ar", "train the class-conditional AR model on a token corpus (Ray Train)"),
    ("train", "length-predictor"): ("jobs.train_length_predictor", "fit the PSNR-curve length predictor (adaptive k)"),
    ("eval", "fid"): ("jobs.eval_fid", "FID of a folder/shards of images against reference statistics"),
    ("eval", "sweep"): ("jobs.eval_sweep", "reconstruction sweep: rFID and images for each token count k"),
    ("eval", "generate"): ("jobs.eval_generate", "generation sweep: gFID and samples of the AR model per k"),
    ("inception", "convert"): ("jobs.inception_convert", "convert the TF-FID Inception weights for torch-fidelity"),
}

PROG = "flextok"


def usage(prefix: tuple[str, ...] = ()) -> str:
    """Help text listing the commands under `prefix` (all of them when empty)."""
    rows = [(" ".join(words), summary) for words, (_, summary) in COMMANDS.items() if words[: len(prefix)] == prefix]
    width = max(len(name) for name, _ in rows)
    head = " ".join((PROG, *prefix))
    lines = [
        f"usage: {head} COMMAND [options]   ({head} COMMAND --help for a command's options)",
        "",
        "commands:",
        *(f"  {name.ljust(width)}  {summary}" for name, summary in rows),
        "",
        "Every command reads `--config FILE.yaml` (option names as keys); flags on the command line win.",
    ]
    return "\n".join(lines)


def resolve(argv: list[str]) -> tuple[tuple[str, ...] | None, list[str]]:
    """Split argv into (command words, the job's arguments); None when no command matches."""
    for n in (2, 1):
        words = tuple(argv[:n])
        if words in COMMANDS:
            return words, argv[n:]
    return None, argv


@contextmanager
def program_name(module: ModuleType, prog: str) -> Iterator[None]:
    """Name the parser the job's `main` builds `flextok eval sweep`, and make its usage errors one line."""
    build = module.build_parser

    def build_named() -> argparse.ArgumentParser:
        parser = build()
        parser.prog = prog

        def one_line_error(message: str) -> NoReturn:
            raise JobError(f"{message} (see '{prog} --help')")

        parser.error = one_line_error
        return parser

    module.build_parser = build_named
    try:
        yield
    finally:
        module.build_parser = build


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    words, rest = resolve(argv)
    if words is None:
        groups = {w[0] for w in COMMANDS if len(w) > 1}
        if argv and argv[0] in groups and (len(argv) == 1 or argv[1] in ("-h", "--help")):
            print(usage((argv[0],)))
            return 0 if len(argv) > 1 else 2
        if not argv or argv[0] in ("-h", "--help"):
            print(usage())
            return 0 if argv else 2
        known = ", ".join(" ".join(w) for w in COMMANDS)
        print(f"error: unknown command '{' '.join(argv[:2])}' (commands: {known})", file=sys.stderr)
        return 2

    module_name = COMMANDS[words][0]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name != module_name:
            raise
        print(f"error: '{PROG} {' '.join(words)}' is not available: {module_name} is missing", file=sys.stderr)
        return 2
    with program_name(module, f"{PROG} {' '.join(words)}"):
        try:
            return run_main(module.main, rest)
        except SystemExit as e:  # argparse's --help
            return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)


if __name__ == "__main__":
    raise SystemExit(main())
