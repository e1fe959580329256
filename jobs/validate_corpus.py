"""Check a finished token corpus against its manifest and print a summary.

    python jobs/validate_corpus.py corpus/        # exit status 0 when valid, 1 when problems are found

Checks: every manifest file present and no stray data files; rows per input shard equal the manifest's counts;
read = written / copies + failed; metadata and schema of every file; token ids < codebook size; lengths equal
num_tokens; no duplicate (key, aug); _errors.parquet row count. Prints rows, label histogram, bytes/token.
"""

from __future__ import annotations

import argparse

from jobs.common import fail, parse_args, run_main


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="validate_corpus", description="Check a FlexTok token corpus; print a summary.")
    p.add_argument("corpus_dir", nargs="?", help="corpus folder URL")
    p.add_argument("--corpus", help="corpus folder URL (same as the positional argument)")
    p.add_argument("--top-labels", type=int, default=10, help="label histogram: how many labels to list (default 10)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parse_args(build_parser(), argv)
    path = args.corpus_dir or args.corpus
    if not path:
        fail("give the corpus folder (positional or --corpus)")
    from pipeline.data.corpus import validate_corpus

    try:
        v = validate_corpus(path)
    except (OSError, ValueError, KeyError) as e:
        fail(f"{path}: cannot read the corpus ({type(e).__name__}: {e})")
    nulls = v.labels.pop(None, 0)
    print(f"corpus {path}")
    print(f"  rows {v.rows}  files {v.files}  input shards {v.shards}  records read {v.read}  bad records {v.failed}")
    print(f"  tokens {v.tokens}  bytes on disk {v.bytes_on_disk}  bytes/token {v.bytes_per_token:.4f}")
    print(f"  labels: {len(v.labels)} classes, {nulls} rows without label")
    for label, count in v.labels.most_common(args.top_labels):
        print(f"    {label:>6}  {count}")
    if v.problems:
        print(f"INVALID: {len(v.problems)} problem(s)")
        for problem in v.problems:
            print(f"  - {problem}")
        return 1
    print("OK")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main(main))
